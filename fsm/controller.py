"""The controller: public asyncio API, and the chart's actions wired to the adapters.

`Lifecycle` (fsm.chart) decides what happens when; this class is its model and implements each
named action. Nothing here branches on the current state: what is allowed is asked of the chart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from . import checkpoints as cps
from . import leftovers, s3
from .chart import Lifecycle
from .checkpoints import Checkpoint, Operation
from .config import Config
from .errors import (
    CheckpointExists,
    CheckpointNotFound,
    FsmError,
    MissingPrerequisite,
    MountLost,
    NoSpace,
    NotReadyError,
    NotReplicated,
    ReplicationLost,
    StartError,
    StopError,
    ToolError,
)
from .juicefs import JuiceFSTool, remove_handover_files
from .litestream import LitestreamTool
from .logs import ensure_configured, get_logger, ms_since
from .proc import Child, holders, named
from .retry import classify_tool_error, with_s3_retries
from .timepoints import RestoreWindow, parse_time
from .timetravel import Browse, RollbackResult, TimeTravel, TravelOp

_MOUNT_EXIT_GRACE = 10.0
# A busy mount point gets this long to be left before the force unmount (DESIGN: a bounded
# wait before force/lazy).
_BUSY_WAIT = 5.0
_BUSY_RETRY = 0.25
# The FUSE device (a module constant so a test can point it at a path that does not exist).
FUSE_DEVICE = "/dev/fuse"
# Less free space than this where metadata.db lives fails the start (docs/faults.md).
MIN_FREE_MIB = 16
# JuiceFS stops caching (and writes through to storage) below this free ratio of cache/.
_CACHE_FREE_RATIO = 0.1
# litestream restarts: the first after this many seconds, doubling up to the maximum.
_RESTART_BACKOFF = 0.2
_RESTART_BACKOFF_MAX = 5.0
# After hurry(): how long a child gets between SIGTERM and SIGKILL.
_HURRIED_GRACE = 2.0
# How often a watched child is checked on while it runs (a mount stuck while dying).
_WATCH_POLL = 0.5
# The longest teardown waits for a cancelled action to unwind (it kills its child at once).
_ACTION_UNWIND = 10.0


@dataclass(frozen=True)
class Transition:
    source: str
    target: str
    event: str
    at: datetime
    duration_ms: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "event": self.event,
                "at": self.at.isoformat(), "duration_ms": self.duration_ms,
                "error": self.error}


Observer = Callable[[Transition], None]
# A long step's progress in words ("uploading 12 blocks (48.0 MiB) to the bucket").
ProgressObserver = Callable[[str], None]


_Action = Callable[..., Awaitable[Any]]


def _unwound_before_teardown(action: _Action) -> _Action:
    """Marks a chart action (an invoke) that a stop or a failure may cancel midway: teardown
    waits until it has unwound (its one-shot child killed and reaped, partial files removed)
    before it returns, so nothing of it outlives stop()."""
    @functools.wraps(action)
    async def tracked(self: JuiceFS, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._actions.add(task)
        try:
            return await action(self, *args, **kwargs)
        finally:
            self._actions.discard(task)
    return tracked


def _event_name(event: Any) -> str:
    name = str(getattr(event, "id", event) or "")
    # done.invoke.<state>.<random id>: keep the stable part.
    return ".".join(name.split(".")[:3]) if name.startswith("done.invoke.") else name


class JuiceFS:
    """One JuiceFS volume, from restore to stop. Use once: start(), operations, stop()."""

    def __init__(self, config: Config, *, juicefs: JuiceFSTool | None = None,
                 litestream: LitestreamTool | None = None) -> None:
        """`juicefs`/`litestream` replace the adapters (the property-based tests pass fakes)."""
        if not isinstance(config, Config):
            raise TypeError("JuiceFS() takes a fsm.Config")
        ensure_configured()
        self.config = config
        self.layout = config.layout
        self.log = get_logger(base_dir=str(config.base_dir), volume=config.volume_name)
        self.juicefs = juicefs or JuiceFSTool(config, self.log)
        self.litestream = litestream or LitestreamTool(config, self.log)
        self._mount: Child | None = None
        self._retired_mounts: list[Child] = []  # handed the mount over to a remount
        self._replicator: Child | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._actions: set[asyncio.Task[Any]] = set()  # see _unwound_before_teardown
        self._lock = leftovers.BaseDirLock(config)
        self._replication_up = asyncio.Event()  # litestream serves its control socket
        self._restart_times: deque[float] = deque()  # recent litestream restarts (monotonic)
        self._restarts = 0
        self._op_lock = asyncio.Lock()
        self._settled = asyncio.Event()  # start() may return: ready, failed or stopped
        self._stopped = asyncio.Event()
        self._error: BaseException | None = None
        self._failed_stage = ""
        self._stop_problems: list[str] = []
        self._hurried = asyncio.Event()
        self._leaf = "uninitialized"
        self._entered_at = time.monotonic()
        self._since = datetime.now(timezone.utc)
        self.history: deque[Transition] = deque(maxlen=config.history_size)
        self._observers: list[Observer] = []
        self._progress_observers: list[ProgressObserver] = []
        self._progress = ""
        self._time_travel = TimeTravel(self)
        self._chart = Lifecycle(model=self, state_field="_chart_configuration")

    # ---- public API -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The innermost active state id."""
        return self._leaf

    @property
    def since(self) -> datetime:
        return self._since

    @property
    def active_dir(self) -> Path:
        return self.layout.active_dir

    @property
    def error(self) -> BaseException | None:
        """The error that sent the controller to `failed`, if any."""
        return self._error

    @property
    def pids(self) -> dict[str, int | None]:
        return {"juicefs": self._mount.pid if self._mount and self._mount.running else None,
                "litestream": (self._replicator.pid
                               if self._replicator and self._replicator.running else None)}

    def own_process_groups(self) -> list[int]:
        """The children's process groups (each leads its own): juicefs mounts, browse mounts
        and litestream, with whatever they forked."""
        children = [self._mount, self._replicator, *self._retired_mounts,
                    *(b.child for b in self.browsing())]
        return [c.pid for c in children if c is not None and c.pid is not None]

    def add_observer(self, observer: Observer) -> None:
        """Call `observer(transition)` after every transition (sd_notify, status, tests)."""
        self._observers.append(observer)

    def add_progress_observer(self, observer: ProgressObserver) -> None:
        """Call `observer(text)` while a long step makes progress or waits: stop's upload of
        writeback data, a busy mount point (the daemon shows it as sd_notify STATUS)."""
        self._progress_observers.append(observer)

    async def start(self) -> None:
        """Restore, format if needed, replicate, mount; return once the volume is usable."""
        await self._activate()
        if self._allowed("start"):
            await self._chart.send("start")
        await self._settled.wait()
        if self.state != "ready":
            tail = getattr(self._error, "stderr_tail", "")
            raise StartError(self._failed_stage or self.state, self._error, tail)

    async def stop(self) -> None:
        """Flush, unmount, stop litestream. Idempotent; lets a running operation finish first."""
        await self._activate()
        async with self._op_lock:
            if self._allowed("stop"):
                await self._chart.send("stop")
            await self._stopped.wait()
        if self._stop_problems:
            raise StopError("stop left things behind: " + "; ".join(self._stop_problems))

    def hurry(self) -> None:
        """Escalate a stop (or failure clean-up) in progress, e.g. on a second SIGTERM: stop
        waiting for the writeback flush and force-unmount now; children get a SIGTERM and
        2 s before SIGKILL. Blocks not yet uploaded stay in the cache's
        rawstaging folder and are uploaded by the next mount."""
        if not self._hurried.is_set():
            self.log.warning("stop_hurried", state=self.state)
        self._hurried.set()

    async def __aenter__(self) -> JuiceFS:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def checkpoint(self, cp_id: str) -> Checkpoint:
        """Clone the active tree to checkpoints/<id>; returns once the metadata is replicated."""
        result: Checkpoint = await self._operate("checkpoint", cps.validate_id(cp_id))
        return result

    async def restore(self, cp_id: str) -> Checkpoint:
        """Replace the active tree with checkpoint <id>. The previous tree is kept as the
        returned checkpoint `pre-restore-<id>-<unix>`."""
        result: Checkpoint = await self._operate("restore", cps.validate_id(cp_id))
        return result

    async def delete_checkpoint(self, cp_id: str) -> None:
        await self._operate("delete_checkpoint", cps.validate_id(cp_id))

    async def list_checkpoints(self) -> list[Checkpoint]:
        async with self._op_lock:
            self._require("checkpoint", "list checkpoints")
            return await asyncio.to_thread(cps.list_in, self.layout.checkpoints_dir)

    # ---- time travel (fsm.timetravel; needs history_hours > 0) ----------------------------

    async def list_restore_points(self) -> RestoreWindow:
        """The history window the replica can actually restore (oldest, newest)."""
        self._time_travel.require_enabled("list restore points")
        async with self._op_lock:
            self._require("browse", "list restore points")
            return await self._time_travel.restore_points()

    async def browse(self, at: str | float | datetime) -> Browse:
        """Mount the whole volume as it was at `at`, read-only, at {base_dir}/history/<time>/;
        the live volume keeps running. OutsideWindow / BrokenRestorePoint before mounting."""
        self._time_travel.require_enabled("browse")
        result: Browse = await self._operate_with("browse", TravelOp(
            "browse", "", at=parse_time(at)))
        return result

    async def unbrowse(self, target: str | float | datetime | Path | Browse) -> Browse:
        """Unmount and delete a browse mount: by the Browse, its time, or its path."""
        if isinstance(target, Browse):
            key = str(target.mount_point)
        elif isinstance(target, Path):
            key = str(target)
        else:
            key = target if isinstance(target, str) else parse_time(target).isoformat()
        closed: Browse = await self._operate_with("unbrowse", TravelOp("unbrowse", "",
                                                                       target=key))
        return closed

    def browsing(self) -> list[Browse]:
        """The open browse mounts."""
        return self._time_travel.browsing()

    async def rollback(self, at: str | float | datetime) -> RollbackResult:
        """Roll the whole volume back to `at` (checkpoints included). The active tree it
        replaces is kept as checkpoint pre-rollback-<unix>; on failure nothing changes."""
        self._time_travel.require_enabled("roll back")
        result: RollbackResult = await self._operate_with("rollback", TravelOp(
            "rollback", "", at=parse_time(at)))
        return result

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self._since.isoformat(),
            "mode": self.config.mode,
            "base_dir": str(self.config.base_dir),
            "volume_name": self.config.volume_name,
            "pids": self.pids,
            "restarts": {"litestream": self._restarts},
            "error": str(self._error) if self._error else None,
            "progress": self._progress or None,
            "time_travel": self._time_travel.status(),
            "transitions": [t.to_json() for t in self.history],
        }

    # ---- helpers ----------------------------------------------------------------------------

    def _report(self, progress: str) -> None:
        self._progress = progress
        for observer in self._progress_observers:
            observer(progress)

    async def _activate(self) -> None:
        if not self._chart.configuration and not self._chart.is_terminated:
            await self._chart.activate_initial_state()

    def _allowed(self, event: str) -> bool:
        return any(e.id == event for e in self._chart.allowed_events)

    def _require(self, event: str, operation: str) -> None:
        if not self._allowed(event):
            raise NotReadyError(operation, self.state)

    async def _operate(self, event: str, cp_id: str) -> Any:
        return await self._operate_with(event, Operation(event, cp_id))

    async def _operate_with(self, event: str, op: Operation) -> Any:
        await self._activate()
        async with self._op_lock:
            self._require(event, event.replace("_", " "))
            await self._chart.send(event, op=op)
            return await op.outcome()

    def _cp_path(self, cp_id: str) -> Path:
        return self.layout.checkpoints_dir / cp_id

    # ---- chart observation ------------------------------------------------------------------

    def on_enter_state(self, state: Any, event: Any, error: BaseException | None = None,
                       data: Any = None) -> None:
        if state.states or _event_name(event) == "__initial__":
            return  # a compound parent (its leaf entry follows), or activation itself
        # A failed checkpoint/restore returns to ready with its error in the Operation (`data`).
        error = error or getattr(data, "error", None)
        now = time.monotonic()
        record = Transition(self._leaf, state.id, _event_name(event), datetime.now(timezone.utc),
                            round((now - self._entered_at) * 1000, 1),
                            str(error) if error else None)
        self._leaf, self._entered_at, self._since = state.id, now, record.at
        self._progress = ""
        self.history.append(record)
        self.log.info("transition", **{"from": record.source, "to": record.target,
                                       "trigger": record.event,
                                       "duration_ms": record.duration_ms},
                      **({"error": record.error} if record.error else {}))
        for observer in self._observers:
            observer(record)

    # ---- chart actions: start -----------------------------------------------------------------

    @_unwound_before_teardown
    async def restore_metadata(self) -> None:
        await self._prepare()
        # Which replica path is current (a rollback starts a new one); undo a rollback a crash
        # interrupted; clear browse mounts a crash left behind.
        await self._time_travel.before_start()
        self.litestream.write_config()
        if not self.config.local_mode:
            # Fails fast on wrong credentials or a missing bucket; waits out an outage.
            await self._with_s3("S3 bucket check", self._check_bucket, check_first=False)
            if await asyncio.to_thread(s3.keep_or_set_aside, self.config, self.log):
                await asyncio.to_thread(s3.make_private, self.layout)
                return
        elif self.layout.metadata_db.exists():
            self.log.info("metadata_kept", db=str(self.layout.metadata_db),
                          reason="local metadata.db present")
            return
        restored = await self._with_s3("metadata restore", self.litestream.restore)
        await asyncio.to_thread(s3.make_private, self.layout)
        self.log.info("metadata_restored" if restored else "metadata_replica_empty",
                      db=str(self.layout.metadata_db))

    async def _check_bucket(self) -> None:
        await s3.check_bucket(s3.target_of(self.config))

    async def _with_s3(self, what: str, step: Callable[[], Awaitable[Any]], *,
                       check_first: bool = True) -> Any:
        """Run a step that needs S3; in S3 mode, check the bucket before each attempt (ms,
        where the tools' own SDK retries take seconds to minutes) and retry while S3 is
        unavailable, up to s3_retry_deadline (fsm.retry)."""
        if self.config.local_mode:
            return await step()

        async def attempt() -> Any:
            if check_first:
                await self._check_bucket()
            try:
                return await step()
            except ToolError as exc:
                raise classify_tool_error(exc) from exc

        return await with_s3_retries(what, attempt, deadline=self.config.s3_retry_deadline,
                                     log=self.log)

    async def _prepare(self) -> None:
        """Prerequisites, this base_dir's lock, what a controller that died left behind
        (fsm.leftovers), then the directories and a free-space check."""
        await asyncio.to_thread(self._claim_base_dir)
        await leftovers.clear(self.config, self.log)
        await asyncio.to_thread(self._prepare_dirs)

    def _claim_base_dir(self) -> None:
        if not os.path.exists(FUSE_DEVICE):
            raise MissingPrerequisite(
                f"FUSE is not available: {FUSE_DEVICE} does not exist; load the fuse module "
                f"(modprobe fuse), or run the container with --device /dev/fuse "
                f"--cap-add SYS_ADMIN")
        if not shutil.which("umount"):
            raise MissingPrerequisite("umount was not found on PATH; install util-linux "
                                      "(Debian/Ubuntu: apt-get install util-linux)")
        self.layout.base_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def _prepare_dirs(self) -> None:
        lay = self.layout
        dirs = [lay.cache_dir, lay.mount_point]
        if self.config.local_mode:
            dirs += [lay.local_storage_dir, lay.litestream_replica_dir]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        self._check_space()

    def _check_space(self) -> None:
        """Refuse to start on a full disk (SQLite then fails in obscure ways, and in local mode
        the volume's blocks, stored there too, cannot be written: writes would hang). A
        nearly full cache/ only costs speed: JuiceFS then writes straight to storage."""
        base = shutil.disk_usage(self.layout.base_dir)
        if base.free < MIN_FREE_MIB << 20:
            raise NoSpace(
                f"the filesystem of {self.layout.base_dir} has only {base.free / (1 << 20):.1f} "
                f"MiB free; metadata.db{' and the volume blocks' if self.config.local_mode else ''}"
                f" live there: free at least {MIN_FREE_MIB} MiB and start again")
        cache = shutil.disk_usage(self.layout.cache_dir)
        if cache.free < cache.total * _CACHE_FREE_RATIO:
            self.log.warning(
                "cache_space_low", cache_dir=str(self.layout.cache_dir),
                free_mib=round(cache.free / (1 << 20), 1),
                total_mib=round(cache.total / (1 << 20), 1),
                effect="JuiceFS will not cache and writes go straight to storage (slower)")

    def needs_format(self) -> bool:
        return self.juicefs.read_format() is None

    @_unwound_before_teardown
    async def format_volume(self) -> None:
        # juicefs stores the credentials in the format: create the db owner-only first.
        db = self.layout.metadata_db
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            await self._with_s3("format", self.juicefs.format)
        except BaseException:
            if db.stat().st_size == 0:
                db.unlink()  # only the empty placeholder made above: nothing to keep
            raise
        await asyncio.to_thread(s3.make_private, self.layout)
        self.log.info("volume_formatted", volume=self.config.volume_name,
                      storage=self.config.mode)

    @_unwound_before_teardown
    async def start_replication(self) -> None:
        # Time travel: deleted data must outlive the history window (no-op when it is off).
        await self._time_travel.ensure_trash_days()
        await self._spawn_replicator()
        # Its control socket takes litestream ~25 ms: mount_volume waits for it alongside the
        # mount (~70 ms) rather than before it (bench/, BENCHMARKS.md).

    async def _spawn_replicator(self) -> Child:
        with contextlib.suppress(FileNotFoundError):
            self.layout.litestream_socket.unlink()  # a leftover would look like a live server
        child = self.litestream.replicate_child()
        self._replicator = child
        await child.start()
        self._remember_children()
        return child

    def _remember_children(self) -> None:
        """For the next start, should this process die (fsm.leftovers)."""
        leftovers.remember(self.config, [self._mount, self._replicator, *self._retired_mounts])

    @_unwound_before_teardown
    async def mount_volume(self) -> None:
        if self.juicefs.is_stale():
            self.log.warning("stale_mount_cleared", mount_point=str(self.layout.mount_point))
            await self.juicefs.lazy_unmount()
        child = self.juicefs.mount_child()
        self._mount = child
        await child.start()
        self._remember_children()
        replicator = self._replicator
        assert replicator is not None  # replicating comes before mounting
        seconds, _ = await _together(
            self.juicefs.wait_mounted(child, self.config.ready_timeout),
            self._replication_serving(replicator))
        self.log.info("mounted", mount_point=str(self.layout.mount_point), pid=child.pid,
                      duration_ms=round(seconds * 1000, 1))
        # mkdir through FUSE on a first start, no-ops later. Here, not on entering ready: ready
        # is re-entered after every operation, and these cost ~1 ms each time (bench/).
        self.layout.active_dir.mkdir(parents=True, exist_ok=True)
        self.layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._watch(child, "mount_lost", MountLost, self.juicefs.unstick)

    async def _replication_serving(self, replicator: Child) -> None:
        await self.litestream.wait_serving(replicator)
        self._replication_up.set()
        # Watched from here on: litestream exiting is restarted (or fails the volume).
        self._watch(replicator, "replication_lost", ReplicationLost, note=self._restart_note)

    def announce_ready(self) -> None:
        self._settled.set()

    def _watch(self, child: Child, event: str, error: type[FsmError],
               meanwhile: Callable[[Child], Awaitable[None]] | None = None,
               note: Callable[[], str] = str) -> None:
        """Send `event` when `child` exits; `meanwhile(child)` runs every 0.5 s until then;
        `note()` ends the error message."""
        async def watch() -> None:
            rc = await (_wait_checking(child, meanwhile) if meanwhile and child.running
                        else child.wait())
            await self._chart.send(event, error=error(
                f"{child.tool} (pid {child.pid}) exited with {rc} while in use{note()}:\n"
                f"{child.stderr_tail()}"))
        self._watchers = [t for t in self._watchers if not t.done()]
        self._watchers.append(asyncio.create_task(watch()))

    # ---- chart actions: litestream restarts ---------------------------------------------------

    def replication_restartable(self) -> bool:
        """Within the budget: fewer than replication_restarts restarts in the window."""
        return self._recent_restarts() < self.config.replication_restarts

    def _recent_restarts(self) -> int:
        """Restarts within the last replication_restart_window seconds (older ones dropped)."""
        now = time.monotonic()
        while self._restart_times and \
                now - self._restart_times[0] > self.config.replication_restart_window:
            self._restart_times.popleft()
        return len(self._restart_times)

    def _restart_note(self) -> str:
        return (f" ({self._recent_restarts()} restart(s) in the last "
                f"{self.config.replication_restart_window:g} s; replication_restarts="
                f"{self.config.replication_restarts} allowed)")

    def schedule_replication_restart(self, error: BaseException | None = None) -> None:
        self._replication_up.clear()
        self._restart_times.append(time.monotonic())
        attempt = len(self._restart_times)
        delay = min(_RESTART_BACKOFF_MAX, _RESTART_BACKOFF * 2 ** (attempt - 1))
        self.log.warning("replication_restart_scheduled", attempt=attempt,
                         limit=self.config.replication_restarts,
                         window_s=self.config.replication_restart_window, in_s=delay,
                         error=str(error))

        async def after_backoff() -> None:
            await asyncio.sleep(delay)
            await self._chart.send("restart_replication")
        self._watchers.append(asyncio.create_task(after_backoff()))

    async def respawn_replicator(self) -> None:
        child = await self._spawn_replicator()
        self._restarts += 1
        self.log.warning("replication_restarted", pid=child.pid, restarts=self._restarts)
        self._watch(child, "replication_lost", ReplicationLost, note=self._restart_note)
        self._watchers.append(asyncio.create_task(self._serving_again(child)))

    async def _serving_again(self, child: Child) -> None:
        try:
            await self.litestream.wait_serving(child)
        except ToolError as exc:
            if child.running:  # alive but not serving: end it, its watcher counts a restart
                self.log.error("replication_not_serving", pid=child.pid, error=str(exc))
                await child.kill()
            return
        self._replication_up.set()
        self.log.info("replication_serving", pid=child.pid)

    async def _sync(self) -> None:
        """The durability barrier, after a litestream restart in progress (bounded wait; the
        sync then reports a litestream that is still not back)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._replication_up.wait(),
                                   self.config.litestream_stop_timeout)
        await self.litestream.sync()

    async def _sync_made(self, done: str, result: Checkpoint) -> None:
        """The barrier after a change that is already made: its failure must say so, or the
        caller would repeat an operation that succeeded."""
        try:
            await self._sync()
        except FsmError as exc:
            self.log.error("not_replicated", what=done, error=str(exc))
            raise NotReplicated(
                f"{done}, but its replication could not be confirmed: {exc}. It is in the "
                f"local metadata.db and is replicated once litestream answers again (see "
                f"status()); do not repeat it", result) from exc

    # ---- chart actions: operations ----------------------------------------------------------

    @_unwound_before_teardown
    async def take_checkpoint(self, op: Operation) -> Operation:
        dst = self._cp_path(op.cp_id)
        with op.capture(f"checkpoint {op.cp_id!r}"):
            if dst.exists():
                raise CheckpointExists(f"checkpoint {op.cp_id!r} already exists; "
                                       f"delete it first or choose another id")
            await self.juicefs.clone(self.layout.active_root, dst)
            os.utime(dst)  # created_at: the clone copies the active tree's times
            op.result = Checkpoint.at(dst)
            self.log.info("checkpoint_created", id=op.cp_id)
            await self._sync_made(f"checkpoint {op.cp_id!r} was made", op.result)
        return op

    @_unwound_before_teardown
    async def restore_checkpoint_tree(self, op: Operation) -> Operation:
        src = self._cp_path(op.cp_id)
        active = self.layout.active_root
        with op.capture(f"restore of {op.cp_id!r}"):
            if not src.is_dir():
                raise CheckpointNotFound(
                    f"checkpoint {op.cp_id!r} does not exist; list them with "
                    f"list_checkpoints() or `juicefs-fsm checkpoints`")
            taken = {e.name for e in os.scandir(self.layout.checkpoints_dir)}
            aside = self._cp_path(cps.pre_restore_id(op.cp_id, taken))
            os.rename(active, aside)
            try:
                await self.juicefs.clone(src, active)
            except BaseException:
                await self._roll_back_restore(aside)
                raise
            os.utime(aside)
            op.result = Checkpoint.at(aside)
            self.log.info("checkpoint_restored", id=op.cp_id, kept_as=aside.name)
            await self._sync_made(f"checkpoint {op.cp_id!r} was restored (the previous tree "
                                  f"is kept as {aside.name!r})", op.result)
        return op

    async def _roll_back_restore(self, aside: Path) -> None:
        """Put the original active tree back; a half-made clone is moved away and removed."""
        active = self.layout.active_root
        if active.exists():
            partial = self.layout.mount_point / f".fsm-partial-{aside.name}"
            os.rename(active, partial)
            await self.juicefs.rmr(partial)
        os.rename(aside, active)
        self.log.warning("restore_rolled_back", kept=str(active))

    async def remove_checkpoint(self, op: Operation) -> None:
        path = self._cp_path(op.cp_id)
        with op.capture(f"delete of {op.cp_id!r}"):
            if not path.is_dir():
                raise CheckpointNotFound(f"checkpoint {op.cp_id!r} does not exist")
            await self.juicefs.rmr(path)
            await self.litestream.sync()
            self.log.info("checkpoint_deleted", id=op.cp_id)

    # ---- chart actions: time travel (fsm.timetravel) ----------------------------------------

    async def open_history(self, op: TravelOp) -> None:
        await self._time_travel.open(op)

    async def close_history(self, op: TravelOp) -> None:
        await self._time_travel.close(op)

    async def roll_back(self, op: TravelOp) -> TravelOp:
        return await self._time_travel.roll_back(op)

    def settle_operation(self, op: Operation | None = None, data: Operation | None = None) -> None:
        done = data or op
        if done is not None:
            done.settle()

    # ---- chart actions: stop and failure ----------------------------------------------------

    async def shut_down(self) -> None:
        self._stop_problems = await self._teardown()

    def record_stop_error(self, error: BaseException | None = None) -> None:
        self.log.error("stop_error", error=str(error), error_type=type(error).__name__)
        self._stop_problems.append(f"stopping failed: {error}")

    def announce_stopped(self) -> None:
        self._release_base_dir()
        self._settled.set()
        self._stopped.set()

    def _release_base_dir(self) -> None:
        """Once nothing of ours is left: forget the children and let base_dir go. Otherwise
        keep both, for a stop() that tries again or (should this process die) the next start."""
        if self._lock.held and not self._stop_problems:
            leftovers.forget(self.config)
            self._lock.release()

    async def clean_up(self, error: BaseException | None = None) -> None:
        self._error = error
        self._failed_stage = next(
            (t.source for t in reversed(self.history) if t.target == "failed"), self.state)
        self.log.error("failed", stage=self._failed_stage, error=str(error),
                       error_type=type(error).__name__)
        try:
            problems = await self._teardown()
        except (FsmError, OSError) as exc:
            problems = [f"clean-up failed: {exc}"]
        finally:
            self._settled.set()  # start() must return even if the clean-up itself failed
        if problems:
            self._stop_problems = problems
            self.log.error("cleanup_incomplete", problems=problems)
        self._release_base_dir()

    async def _teardown(self) -> list[str]:
        """Unmount (flushing writeback data), then stop litestream (its final sync)."""
        stopped = [t for t in self._actions if t is not asyncio.current_task()]
        if stopped:  # cancelled by leaving their state: let them unwind first
            await asyncio.wait(stopped, timeout=_ACTION_UNWIND)
        if not self._lock.held:
            return []  # base_dir never claimed (refused, or not started): nothing is ours
        # After mount_lost/replication_lost this runs inside that child's watcher task:
        # cancelling or awaiting itself would abort the clean-up (and recurse in gather).
        others = [t for t in self._watchers if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._watchers.clear()
        problems = await self._time_travel.close_all()  # browse mounts: owned children too
        problems += await self._unmount()
        if self._replicator is not None:
            problems += await self._final_sync()
            rc = await self._stop_child(self._replicator, self.config.litestream_stop_timeout)
            self.log.info("litestream_stopped", pid=self._replicator.pid, rc=rc)
        return problems

    async def _unmount(self) -> list[str]:
        mp = self.layout.mount_point
        if self._mount is None:
            return []  # never mounted: whatever is at data/ is not ours (fsm.leftovers)
        await self.juicefs.unstick(self._mount)  # else the stat below could hang forever
        unmounted = self.juicefs.is_mounted()
        if unmounted:
            await self._graceful_unmount()
        # pid is None when stop came before the mount process was spawned.
        if self._mount is not None and self._mount.pid is not None:
            # A mount still coming up (stop during `mounting`) was not unmounted, so it will
            # not exit by itself: SIGTERM it at once instead of waiting out the grace.
            grace = _MOUNT_EXIT_GRACE if unmounted else 0.0
            await self._unless_hurried(self._mount.exits_within(grace))
            if self._mount.running:
                await self._stop_child(self._mount, _MOUNT_EXIT_GRACE)
        for retired in self._retired_mounts:
            await self._stop_child(retired, _MOUNT_EXIT_GRACE)  # normally exited already
        for supervisor in [*self._retired_mounts, *([self._mount] if self._mount else [])]:
            remove_handover_files(supervisor.pid)
        if self.juicefs.is_mounted() or self.juicefs.is_stale():
            await _best_effort(self.juicefs.lazy_unmount(), self.log, "lazy_unmount")
        if self.juicefs.is_mounted() or self.juicefs.is_stale():
            return [f"{mp} is still mounted; run `umount -l {mp}`"]
        return []

    async def _graceful_unmount(self) -> None:
        started = time.monotonic()
        await self._unless_hurried(self._flush_writeback())
        try:
            if await self._unless_hurried(self._umount_flush()):
                self.log.info("unmounted", flush=True,
                              duration_ms=ms_since(started))
                return
            self.log.warning("unmount_flush_skipped", reason="stop hurried")
        except ToolError as exc:
            self.log.warning("unmount_flush_failed", error=str(exc))
        # Only after the bounded flush and busy wait: force ends the mount under programs still
        # inside, and what they have not flushed is lost; so it is the fallback.
        await _best_effort(self.juicefs.force_unmount(), self.log, "unmount_force")

    async def _umount_flush(self) -> None:
        """`juicefs umount --flush`. A busy mount point (a shell or program still inside) is
        retried for _BUSY_WAIT seconds, naming the processes that hold it: a program finishing
        its writes then gets a clean unmount instead of the force fallback."""
        deadline = time.monotonic() + _BUSY_WAIT
        for attempt in itertools.count():
            try:
                await self.juicefs.umount(flush=True, timeout=self.config.flush_timeout)
                return
            except ToolError as exc:
                if "busy" not in exc.stderr_tail or time.monotonic() >= deadline:
                    raise
                if attempt == 0:
                    inside = holders(self.layout.mount_point, self.own_process_groups())
                    self.log.warning("unmount_busy", wait_s=_BUSY_WAIT, holders=inside)
                    self._report(f"{self.layout.mount_point} is in use by "
                                 f"{named(inside, 'a program')}; unmounting it anyway in "
                                 f"{_BUSY_WAIT:g} s")
            await asyncio.sleep(_BUSY_RETRY)


    async def _final_sync(self) -> list[str]:
        """Replicate the last transactions before litestream stops: its own final sync on
        SIGTERM was seen to upload nothing when it had run for less than a second."""
        if self._replicator is None or not self._replicator.running:
            return []
        started = time.monotonic()
        replicator = self._replicator

        async def serving_then_sync() -> None:
            # Stopped during start, litestream may not serve its control socket yet.
            await self.litestream.wait_serving(replicator)
            await self.litestream.sync(timeout=self.config.litestream_stop_timeout)

        try:
            if await self._unless_hurried(serving_then_sync()):
                self.log.info("final_sync_done",
                              duration_ms=ms_since(started))
            else:
                # litestream's own final sync on SIGTERM still runs.
                self.log.warning("final_sync_skipped", reason="stop hurried")
            return []
        except FsmError as exc:
            self.log.warning("final_sync_failed", error=str(exc))
            return [f"the final metadata sync failed ({exc}); the local metadata.db has "
                    f"everything, start again to replicate it"]

    async def _flush_writeback(self) -> None:
        """Upload staged blocks now instead of after upload_delay: `umount --flush` alone sits
        the delay out (about two minutes for 60 s). JuiceFS's seamless remount hands the FUSE
        session to a second `juicefs mount` with --upload-delay 0, which uploads every staged
        block at once. Any failure leaves the plain `umount --flush` to do the job."""
        if self.config.effective_upload_delay <= 0 or self._mount is None:
            return
        started = time.monotonic()
        old = self._mount
        new = self.juicefs.mount_child(upload_delay=0)
        try:
            await new.start()
            self._mount, self._retired_mounts = new, [*self._retired_mounts, old]
            self._remember_children()
            await self.juicefs.wait_taken_over(new, self.config.ready_timeout)
            self.log.info("flush_remounted", pid=new.pid, old_pid=old.pid,
                          duration_ms=ms_since(started))
            await self._wait_uploaded(started)
        except (FsmError, OSError) as exc:
            self.log.warning("flush_remount_failed", error=str(exc))
            if not new.running and old.running:
                self._mount = old
                self._retired_mounts = [c for c in self._retired_mounts if c is not old] + [new]

    async def _wait_uploaded(self, started: float) -> None:
        """Until no block is staged (bounded by flush_timeout); progress as events."""
        last: dict[str, int] = {}
        logged = 0.0
        while True:
            left = await self.juicefs.staging()
            now = time.monotonic()
            done = left["blocks"] == 0 and left["writing"] == 0
            if done or (left != last and now - logged >= 0.5) or now - logged >= 5:
                self.log.info("flush_progress", blocks_left=left["blocks"],
                              bytes_left=left["bytes"], blocks_writing=left["writing"],
                              elapsed_ms=round((now - started) * 1000, 1))
                self._report(f"uploading writeback data: {left['blocks']} blocks "
                             f"({left['bytes'] / 2**20:.1f} MiB) left")
                last, logged = left, now
            if done:
                self.log.info("flush_done", duration_ms=round((now - started) * 1000, 1))
                return
            if now - started > self.config.flush_timeout:
                self.log.warning("flush_incomplete", blocks_left=left["blocks"],
                                 bytes_left=left["bytes"], timeout_s=self.config.flush_timeout)
                return
            await asyncio.sleep(0.1)

    async def _stop_child(self, child: Child, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`, or after _HURRIED_GRACE once hurried."""
        if await self._unless_hurried(child.terminate(timeout)):
            return child.returncode
        return await child.terminate(_HURRIED_GRACE)

    async def _unless_hurried(self, step: Awaitable[Any]) -> bool:
        """Await `step` (its errors propagate); cancel it if hurry() comes first.
        True when `step` finished."""
        task = asyncio.ensure_future(step)
        hurried = asyncio.ensure_future(self._hurried.wait())
        try:
            await asyncio.wait({task, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
            finished = task.done()
            if not finished:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if finished:
            task.result()
        return finished


async def _wait_checking(child: Child, check: Callable[[Child], Awaitable[None]]) -> int:
    """child.wait(), running `check(child)` every _WATCH_POLL seconds until it returns."""
    exited = asyncio.ensure_future(child.wait())
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=_WATCH_POLL)
            if done:
                return exited.result()
            await check(child)
    finally:
        exited.cancel()  # no-op once done


async def _together(*steps: Awaitable[Any]) -> list[Any]:
    """Await the steps concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # no-op once done; all of them if we are being cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
    return [task.result() for task in tasks]


async def _best_effort(step: Any, log: Any, name: str) -> None:
    """Run a fallback step of teardown: a failure is logged and the next fallback runs."""
    try:
        await step
    except FsmError as exc:
        log.warning(f"{name}_failed", error=str(exc))
