"""Shared test helpers: prerequisites that fail (not skip) in CI, and leftover checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fsm.juicefs import mount_fstype

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, what: str) -> None:
    """Skip locally when a prerequisite is missing; in CI (CI=true) that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {what}", pytrace=False)
    pytest.skip(f"prerequisite missing: {what}")


def require_fuse() -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse (FUSE) is needed for real mounts")
    require(os.geteuid() == 0, "root is needed for FUSE mounts")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def mount_pids(mount_point: Path) -> list[int]:
    """The juicefs supervisor and FUSE-serving child, from <mp>/.config."""
    info = json.loads((mount_point / ".config").read_text())
    return [p for p in (info.get("Pid"), info.get("PPid")) if p]


def assert_nothing_left(base_dir: Path, pids: list[int]) -> None:
    """Nothing mounted at {base_dir}/data and none of the given processes alive."""
    assert mount_fstype(base_dir / "data") is None, f"{base_dir}/data is still mounted"
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"processes still alive after stop: {alive}"
