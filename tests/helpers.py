"""Shared test helpers: prerequisites that fail (not skip) in CI, and leftover checks."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fsm import Config, JuiceFS
from fsm.juicefs import juicefs_mount_points, mount_fstype

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


def mounts_under(base_dir: Path) -> list[Path]:
    return [mp for mp in juicefs_mount_points() if str(mp).startswith(f"{base_dir}/")]


@contextlib.asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[JuiceFS]:
    """A started volume; stopped even if the test fails, then nothing of it may be left mounted
    (browse mounts included) or running."""
    require_fuse()
    jfs = JuiceFS(cfg)
    pids: list[int] = []
    try:
        await jfs.start()
        pids = [p for p in jfs.pids.values() if p]
        yield jfs
    finally:
        pids += [b.child.pid for b in jfs.browsing() if b.child.pid]
        await jfs.stop()
    assert_nothing_left(Path(cfg.base_dir), pids)
    assert mounts_under(Path(cfg.base_dir)) == []
