"""The controller: the public asyncio API, and the chart's actions wired to the modules that
carry them out.

`Lifecycle` (fsm.chart) decides what happens when; this class is its model. Each action is one
line here, handed to the module that owns that part of the life: fsm.startup (the start steps),
fsm.replication (litestream), fsm.operations (checkpoints), fsm.history and fsm.rollback (time
travel), fsm.shutdown (the stop sequence). Nothing here branches on the current state: what is
allowed is asked of the chart.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from . import checkpoints as cps
from . import leftovers, metaengine, migrate
from .chart import Lifecycle
from .checkpoints import Checkpoint, Operation
from .children import Children, unwound_before_teardown
from .claim import Claim
from .config import Config
from .copies import Copies
from .errors import FsmError, LeaseHeld, LeaseLost, NotReadyError, StartError, StopError
from .history import Browse, TimeTravel, TravelOp
from .juicefs import JuiceFSTool, staged_blocks
from .litestream import LitestreamTool
from .logs import get_logger
from .operations import TreeOperations
from .pointintime import PointInTime
from .replication import Replication
from .retry import with_s3
from .rollback import Rollback, RollbackResult
from .shutdown import Shutdown
from .space import SpaceWatch
from .startup import Startup
from .takeover import Takeover
from .timepoints import RestoreWindow, parse_time
from .transitions import Observer, ProgressObserver, Transition, event_name


class JuiceFS:
    """One JuiceFS volume, from restore to stop. Use once: start(), operations, stop()."""

    def __init__(self, config: Config, *, juicefs: JuiceFSTool | None = None,
                 litestream: LitestreamTool | None = None) -> None:
        """`juicefs`/`litestream` replace the adapters (the property-based tests pass fakes)."""
        if not isinstance(config, Config):
            raise TypeError("JuiceFS() takes a fsm.Config")
        self.config = config
        self.layout = config.layout
        self.log = get_logger(base_dir=str(config.base_dir), volume=config.volume_name)
        self.juicefs = juicefs or JuiceFSTool(config, self.log)
        self.litestream = litestream or LitestreamTool(config, self.log)
        self._lock = leftovers.BaseDirLock(config)
        self._op_lock = asyncio.Lock()
        self._settled = asyncio.Event()  # start() may return: ready, failed or stopped
        self._stopped = asyncio.Event()
        self._error: BaseException | None = None
        self._failed_stage = ""
        self._stop_problems: list[str] = []
        self._leaf = "uninitialized"
        self._entered_at = time.monotonic()
        self._since = datetime.now(timezone.utc)
        self.history: deque[Transition] = deque(maxlen=config.history_size)
        self._observers: list[Observer] = []
        self._progress_observers: list[ProgressObserver] = []
        self._progress = ""
        self._wire()
        # The rollback's steps are actions of a listener (fsm.rollback), not one-line copies.
        self._chart = Lifecycle(model=self, state_field="_chart_configuration",
                                listeners=[self._rollback])

    def _wire(self) -> None:
        cfg, log, juicefs, litestream = self.config, self.log, self.juicefs, self.litestream
        self.children = Children(cfg)
        self._replication = Replication(cfg, litestream, self.children, self._send, log)
        point = PointInTime(cfg, litestream, juicefs, log)
        copies = Copies(juicefs, cfg.ready_timeout, self.own_process_groups, log)
        self._rollback: Rollback
        self._time_travel = TimeTravel(
            cfg, juicefs, litestream, point, copies,
            replicating=lambda: bool(self.pids["litestream"]),
            recover_rollback=lambda subpath: self._rollback.recover(subpath), log=log)
        self.children.extra_groups = self._time_travel.process_groups
        self._startup = Startup(cfg, juicefs, litestream, self.children, self._replication,
                                self._lock, self._time_travel, self._send, log)
        # Free space while mounted (fsm.space): said again while short (transitions clear it).
        self._space = SpaceWatch(
            cfg, lambda text: None if text == self._progress else self._report(text), log)
        self._startup.space = self._space
        self._shutdown = Shutdown(cfg, juicefs, litestream, self.children, self._time_travel,
                                  self._report, log)
        self._operations = TreeOperations(cfg, juicefs, self.children, self._replication, log)
        self._claim = Claim(cfg, self._send, log, fence=self._fence_now)
        self._startup.after_mount = self._claim.after_mount
        self._takeover = Takeover(cfg, litestream, point, self._claim, log)
        self._rollback = Rollback(cfg, juicefs, litestream, self._time_travel, point, copies,
                                  self.own_process_groups, self._teardown,
                                  self._startup.start_replication, self._startup.mount_volume,
                                  log)

    async def _send(self, event: str, **kwargs: Any) -> Any:
        return await self._chart.send(event, **kwargs)

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
        return self.children.pids

    def own_process_groups(self) -> list[int]:
        """The children's process groups (each leads its own): juicefs mounts, browse mounts
        and litestream, with whatever they forked."""
        return self.children.process_groups()

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
        if not self._shutdown.hurried.is_set():
            self.log.warning("stop_hurried", state=self.state)
        self._shutdown.hurried.set()

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

    # ---- time travel (fsm.history; needs history_hours > 0) ----------------------------

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
            "restarts": {"litestream": self._replication.restarts},
            "error": str(self._error) if self._error else None,
            "progress": self._progress or None,
            "time_travel": self._time_travel.status(),
            "lease": self._claim.status(),
            "takeover": self._takeover.report,
            "space": self._space.status(),
            "engine": (metaengine.display_of(self.config.meta_url) if self.config.meta_url
                       else "sqlite+litestream"),
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

    # ---- chart observation ------------------------------------------------------------------

    def on_enter_state(self, state: Any, event: Any, error: BaseException | None = None,
                       data: Any = None) -> None:
        if state.states or event_name(event) == "__initial__":
            return  # a compound parent (its leaf entry follows), or activation itself
        # A failed checkpoint/restore returns to ready with its error in the Operation (`data`).
        error = error or getattr(data, "error", None)
        now = time.monotonic()
        record = Transition(self._leaf, state.id, event_name(event), datetime.now(timezone.utc),
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

    # ---- chart actions: start (fsm.claim, fsm.startup, fsm.takeover) -------------------------

    @unwound_before_teardown
    async def claim_volume(self) -> None:
        await self._startup.claim_base_dir()
        if not self.config.meta_url:  # moved to a shared engine: refused
            await with_s3(self.config, self.log, "moved check",
                          lambda: migrate.check_not_moved(self.config))
        try:
            await self._claim.acquire()
        except LeaseHeld:
            await asyncio.to_thread(self._startup.undo_claim)
            raise
        await self._startup.prepare(superseded=self._claim.superseded)
        await self._claim.settle_local()
        if not self.config.meta_url:
            # Which replica path is current (a rollback or takeover starts a new one); undo a
            # rollback a crash interrupted; clear browse mounts a crash left behind.
            await self._time_travel.before_start()

    def shared_engine(self) -> bool:
        return bool(self.config.meta_url)

    def after_unclean_loss(self) -> bool:
        return self._claim.takeover is not None

    @unwound_before_teardown
    async def take_over(self) -> None:
        await self._takeover.run()

    async def restore_metadata(self) -> None:
        await self._startup.restore_metadata()

    def needs_format(self) -> bool:
        return self._startup.needs_format()

    async def format_volume(self) -> None:
        await self._startup.format_volume()

    async def start_replication(self) -> None:
        await self._startup.start_replication()

    async def mount_volume(self) -> None:
        await self._startup.mount_volume()

    def announce_ready(self) -> None:
        self._settled.set()

    # ---- chart actions: litestream restarts (fsm.replication) -------------------------------

    def replication_restartable(self) -> bool:
        return self._replication.restartable()

    def schedule_replication_restart(self, error: BaseException | None = None) -> None:
        self._replication.schedule_restart(error)

    async def respawn_replicator(self) -> None:
        await self._replication.respawn()

    # ---- chart actions: checkpoints (fsm.operations) ----------------------------------------

    async def take_checkpoint(self, op: Operation) -> Operation:
        return await self._operations.take(op)

    async def restore_checkpoint_tree(self, op: Operation) -> Operation:
        return await self._operations.restore(op)

    async def remove_checkpoint(self, op: Operation) -> None:
        await self._operations.delete(op)

    def settle_operation(self, op: Operation | None = None, data: Operation | None = None) -> None:
        done = data or op
        if done is not None:
            done.settle()

    # ---- chart actions: time travel (fsm.history, fsm.rollback) -----------------------------

    async def open_history(self, op: TravelOp) -> None:
        await self._time_travel.open(op)

    async def close_history(self, op: TravelOp) -> None:
        await self._time_travel.close(op)

    # ---- chart actions: stop and failure (fsm.shutdown) -------------------------------------

    async def shut_down(self) -> None:
        self._stop_problems += await self._teardown()
        # Only a stop that left everything in the bucket hands the volume over cleanly.
        await self._claim.release(clean=not self._stop_problems and
                                  not self._shutdown.data_left)

    def fence(self, error: BaseException | None = None) -> None:
        """The lease is lost: another machine may take the volume over from now on. Nothing of
        ours may write to the bucket again: SIGKILL litestream and the mount now (staged blocks
        stay in rawstaging; the next start here sets them aside if someone else took over),
        and no stop step may flush or sync (fsm.shutdown)."""
        killed = self._fence_now()
        self.log.error("fenced", error=str(error), killed=killed)

    def _fence_now(self) -> list[int]:
        self._shutdown.fenced = True
        return self.children.kill_all()

    async def lose_lease(self, reason: str) -> None:
        """The lease is gone (what fsm.claim's holder sends; tests call it): `lease_lost`."""
        await self._activate()
        await self._chart.send("lease_lost", error=LeaseLost(reason))

    def record_stop_error(self, error: BaseException | None = None) -> None:
        self.log.error("stop_error", error=str(error), error_type=type(error).__name__)
        self._stop_problems.append(f"stopping failed: {error}")

    def announce_stopped(self) -> None:
        self._release_base_dir()
        self._settled.set()
        self._stopped.set()

    def _release_base_dir(self) -> None:
        """Once nothing of ours is left running or mounted: forget the children and let
        base_dir go, so this process (or another) can start again, even if the stop reported
        data it could not upload. Otherwise keep both, for a stop() that tries again or
        (should this process die) the next start."""
        if self._lock.held and not self._shutdown.left_behind:
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
            self.log.error("cleanup_incomplete", problems=problems)
            # The failure itself is the report (start()'s StartError, the daemon's exit 4);
            # stop() still raises for what is left running or mounted.
            if self._shutdown.left_behind:
                self._stop_problems = problems
        await self._claim.release(clean=not problems and not self._shutdown.data_left and
                                  self._nothing_written())
        self._release_base_dir()

    def _nothing_written(self) -> bool:
        """After a failure: whether the bucket already holds the volume's whole state, so the
        next machine need not wait out the lease. Only a start that failed before mounting,
        with no staged blocks left from before and no takeover left half done; a volume that
        failed while mounted may have left writes staged or unreplicated."""
        mount = self.children.mount
        return (mount is None or mount.pid is None) and \
            not staged_blocks(self.layout.cache_dir)[0] and \
            self._claim.previous_clean and self._claim.takeover is None

    async def _teardown(self) -> list[str]:
        await self.children.unwind_actions()
        if not self._lock.held:
            return []  # base_dir never claimed (refused, or not started): nothing is ours
        return await self._shutdown.teardown()
