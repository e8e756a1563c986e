"""What a controller that died without stopping leaves behind, and how the next start clears it.

A controller killed with SIGKILL (or OOM-killed) cannot stop its children: they run in their own
sessions, so its juicefs mount and litestream keep running, orphaned, and data/ stays mounted.
Starting another mount over it would double-mount the volume, and a second litestream would
replicate the same database twice. So:

- The controller holds an exclusive flock() on `{base_dir}/fsm.lock` from start to stop. The
  kernel drops it when the process dies, so a held lock means a live controller (refused: two
  controllers on one volume corrupt it), and a free lock means any leftovers are orphans.
- It records its children (pid and start time) in `{base_dir}/fsm.state.json` (mode 0600) and
  removes the record once a stop leaves nothing behind.
- The next start, holding the lock, clears what is left: a live orphan mount is unmounted with
  `juicefs umount --flush` (nothing written is lost) and its processes (from `<mp>/.config`:
  juicefs rewrites its argv, so its command line cannot identify it) are waited for; a stale or
  hung mount is aborted and detached; a recorded litestream still running is sent SIGTERM (its
  final sync) after the mount is gone. A recorded pid is signalled only while its start time
  and executable (and, for litestream, its config path in the command line) still match.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from . import proc
from .config import Config
from .errors import BaseDirInUse, FsmError
from .juicefs import JuiceFSTool, remove_handover_files
from .litestream import write_private
from .logs import ms_since
from .proc import Child

# After the orphan mount is unmounted, how long its processes get to exit on their own.
_MOUNT_EXIT_WAIT = 10.0


@dataclass(frozen=True)
class ProcessRecord:
    tool: str
    pid: int
    start_ticks: int


class BaseDirLock:
    """The exclusive flock() on {base_dir}/fsm.lock, held from start to stop."""

    def __init__(self, config: Config) -> None:
        self.path = config.layout.lock_file
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise BaseDirInUse(
                f"{self.path.parent} is in use by another juicefs-fsm controller (pid "
                f"{holder}); stop it first, or use another base_dir") from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def remember(config: Config, children: list[Child | Any]) -> None:
    """Record the running children, for the next start if this controller dies. Only real
    processes this controller spawned are recorded (never another object's pid)."""
    records = []
    for child in children:
        pid = child.pid if isinstance(child, Child) and child.running else None
        ticks = proc.start_ticks(pid) if pid else None
        if pid and ticks is not None:
            records.append(ProcessRecord(child.tool, pid, ticks))
    text = json.dumps({"controller_pid": os.getpid(),
                       "children": [asdict(r) for r in records]}, indent=1)
    # No fsync: the record is about processes, and none survive a power loss.
    write_private(config.layout.state_file, text + "\n", durable=False)


def forget(config: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        config.layout.state_file.unlink()


def _recorded(config: Config, log: Any) -> list[ProcessRecord]:
    try:
        data = json.loads(config.layout.state_file.read_text())
        return [ProcessRecord(str(c["tool"]), int(c["pid"]), int(c["start_ticks"]))
                for c in data.get("children", [])]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("state_file_unreadable", path=str(config.layout.state_file), error=str(exc))
        return []


def _still_ours(config: Config, rec: ProcessRecord) -> bool:
    """The recorded process is still running (same start time) and is still that tool."""
    if not proc.alive(rec.pid, rec.start_ticks):
        return False
    if not proc.executable(rec.pid).startswith(rec.tool):
        return False
    if rec.tool == "litestream":
        return str(config.layout.litestream_config) in proc.cmdline(rec.pid)
    return True


async def clear(config: Config, log: Any, *, flush: bool = True) -> None:
    """Clear what a dead controller left for this base_dir (call with the lock held). Orphans
    are always real processes, so this uses the real juicefs adapter, not an injected one.
    `flush=False` (another machine has held the volume since, fsm.claim): nothing of theirs
    may reach the bucket any more, so the orphans are SIGKILLed, not asked to flush."""
    records = _recorded(config, log)
    await _clear_mount(config, JuiceFSTool(config, log), log, flush)
    # The mount first: its last metadata writes go into metadata.db before litestream's final
    # sync (on SIGTERM) replicates them.
    for tool in ("juicefs", "litestream"):
        for rec in records:
            if rec.tool == tool and _still_ours(config, rec):
                log.warning("orphan_found", tool=rec.tool, pid=rec.pid)
                grace = (config.litestream_stop_timeout if tool == "litestream"
                         else _MOUNT_EXIT_WAIT) if flush else 0.0
                if not await proc.end_process(rec.pid, rec.start_ticks, grace, log, rec.tool):
                    raise FsmError(f"orphaned {rec.tool} (pid {rec.pid}) from a previous run "
                                   f"survived SIGKILL; end it (kill -9 {rec.pid}) and start "
                                   f"again")
    for rec in records:
        if rec.tool == "juicefs":
            remove_handover_files(rec.pid)
    forget(config)


async def _clear_mount(config: Config, juicefs: JuiceFSTool, log: Any, flush: bool) -> None:
    state, info = await juicefs.mount_state()
    mp = config.layout.mount_point
    if state == "absent":
        return
    if state == "live" and (info.get("Format") or {}).get("Name") != config.volume_name:
        state = "other"  # a juicefs mount, but of another volume: not ours to unmount
    if state == "other":
        raise FsmError(f"{mp} is a mount point, but not a juicefs mount of this volume; "
                       f"unmount it (umount {mp}) and start again")
    log.warning("leftover_mount_found", mount_point=str(mp), mount_state=state)
    if state == "live" and flush:
        await _unmount_orphan(config, juicefs, info, log)
        return
    if state == "live":
        for pid, _ticks in _mount_processes(info):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # no flush: not one more upload
        log.warning("orphan_mount_killed", mount_point=str(mp),
                    reason="another machine has held the volume since")
        state = "hung"
    if state == "hung":
        await juicefs.abort_connection()
    await juicefs.lazy_unmount()
    log.info("leftover_mount_cleared", mount_point=str(mp), mount_state=state)


def _mount_processes(info: dict[str, Any]) -> list[tuple[int, int]]:
    """(pid, start ticks) of a live mount's supervisor and FUSE server, from its `.config`."""
    pids: list[tuple[int, int]] = []
    for key in ("PPid", "Pid"):
        pid = info.get(key)
        ticks = proc.start_ticks(pid) if isinstance(pid, int) else None
        if isinstance(pid, int) and ticks is not None and \
                proc.executable(pid).startswith("juicefs"):
            pids.append((pid, ticks))
    return pids


async def _unmount_orphan(config: Config, juicefs: JuiceFSTool, info: dict[str, Any],
                          log: Any) -> None:
    """A serving mount with no controller: unmount it flushing its writeback data, then make
    sure its processes (named by its `.config`) are gone."""
    pids = _mount_processes(info)
    started = time.monotonic()
    try:
        await juicefs.umount(flush=True, timeout=config.flush_timeout)
    except FsmError as exc:
        log.warning("orphan_unmount_flush_failed", error=str(exc))
        await juicefs.force_unmount()
    log.info("orphan_mount_unmounted", mount_point=str(config.layout.mount_point),
             pids=[p for p, _ in pids], duration_ms=ms_since(started))
    deadline = time.monotonic() + _MOUNT_EXIT_WAIT
    while any(proc.alive(p, t) for p, t in pids) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # not our children: /proc is all there is to watch
    for pid, ticks in pids:
        # Seen: after the unmount, an orphan's FUSE server ignored SIGTERM (SIGKILL follows).
        await proc.end_process(pid, ticks, 2.0, log, "juicefs")
