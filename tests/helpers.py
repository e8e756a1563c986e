"""Shared test helpers: prerequisites that fail (not skip) in CI, and leftover checks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

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


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll `condition()` (blocking) until it holds; fail naming `what` after `timeout` s.
    Returns the seconds it took. For process and mount state after a signal: the kernel
    finishes a kill, a reparenting or an unmount a moment after the call returns."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


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


@contextlib.contextmanager
def capture_events(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Every event of the library (the stdlib logger `fsm`, `level` and up) and of structlog
    loggers a test makes itself, in order, as event dicts with `log_level` (and `level`)."""
    events: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = dict(record.msg) if isinstance(record.msg, dict) else {
                "event": record.getMessage()}
            name = record.levelname.lower()
            events.append({**fields, "log_level": name, "level": name})

    def keep(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        events.append({**event, "log_level": method, "level": method})
        raise structlog.DropEvent

    library = logging.getLogger("fsm")
    handler, saved_level, saved_structlog = Keep(level), library.level, structlog.get_config()
    library.addHandler(handler)
    library.setLevel(level)
    structlog.configure(processors=[keep], cache_logger_on_first_use=False,
                        wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        yield events
    finally:
        structlog.configure(**saved_structlog)
        library.removeHandler(handler)
        library.setLevel(saved_level)


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Undo what `fsm.logs.configure` (run by `main(["run", ...])`) did to stdlib logging."""
    loggers = [logging.getLogger(), logging.getLogger("fsm")]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    try:
        yield
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            lg.handlers = handlers


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0,
                every: float = 0.05) -> float:
    """wait_until for async tests: polls without blocking the event loop (a FaultyLink, or the
    controller under test, runs on it). Returns the seconds it took."""
    import asyncio

    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


def read_bounded(path: Path, timeout: float) -> tuple[str, bytes | None, float]:
    """Read a file whole in a child process, so a read stuck in the kernel cannot hang the test:
    ("ok", content, seconds), ("absent", None, s), ("error", None, s) for an I/O error, or
    ("stuck", None, timeout) when it had not finished (the child is killed, and not waited
    for: a process in uninterruptible sleep cannot be reaped)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "try:\n"
            "    data = open(sys.argv[1], 'rb').read()\n"
            "except FileNotFoundError:\n"
            "    sys.exit(3)\n"
            "except OSError as e:\n"
            "    print(e, file=sys.stderr); sys.exit(4)\n"
            "sys.stdout.buffer.write(data)\n")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "stuck", None, timeout
    took = time.monotonic() - started
    if proc.returncode == 0:
        return "ok", out, took
    return ("absent" if proc.returncode == 3 else "error"), None, took
