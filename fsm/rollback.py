"""Rolling the whole volume back to a past second: one chart state per step (fsm.chart,
`rolling_back`), each an action here.

preparing_rollback: restore and check the point while the live volume still runs (a refusal or
  failure here changes nothing);
stopping_live_volume -> swapping_metadata -> replicating_new_path -> remounting ->
  carrying_over (keep the replaced tree as checkpoint pre-rollback-<unix>): any failure goes to
  undoing_rollback, which puts the previous metadata back and restarts the volume as it was;
committing: records the new replica path (the point of no return);
collecting_garbage: deletes what only the abandoned future referenced.
A crash in between is undone (or kept, once committed) at the next start from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoints import Checkpoint, unique
from .config import Config
from .copies import Copies, writable_mounts
from .errors import FsmError, InUse, RollbackFailed, TimeTravelError, UnsafeMetadataCopy, one_line
from .history import TimeTravel, TravelOp, children_of, fresh_dir, names_in, remove_tree
from .juicefs import JuiceFSTool
from .litestream import LitestreamTool, write_private
from .logs import ms_since
from .pointintime import PointInTime, Restored, put_back, swap_in
from .proc import holders, named
from .timepoints import iso, utc_now
from .treediff import apply_tree_diff

JOURNAL = "rollback.json"
PRE_ROLLBACK = "pre-rollback-"


@dataclass(frozen=True)
class RollbackResult:
    at: datetime
    state_at: datetime | None
    txid: str
    checkpoint: Checkpoint
    replica: str
    offline_ms: float  # the mount point served nothing: from the stop to the new mount
    duration_ms: float
    carried: dict[str, int]
    gc: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "state_at": iso(self.state_at) if self.state_at else None,
                "txid": self.txid, "checkpoint": self.checkpoint.to_json(),
                "replica": self.replica, "offline_ms": self.offline_ms,
                "duration_ms": self.duration_ms, "carried": self.carried, "gc": self.gc}


@dataclass
class _Plan:
    op: TravelOp
    at: datetime
    started: float
    work: Path | None = None
    restored: Restored | None = None
    uuid: str = ""
    previous_subpath: str = ""
    new_subpath: str = ""
    checkpoint: Checkpoint | None = None
    carried: dict[str, int] = field(default_factory=dict)
    stopped_at: float = 0.0
    offline_ms: float = 0.0
    failure: BaseException | None = None

    @property
    def previous_dir(self) -> Path:
        assert self.work is not None
        return self.work / "previous"


class Rollback:
    """The rollback's steps: a listener of the chart (fsm.chart), whose actions and guard it
    names. `teardown`, `start_replication` and `mount_volume` are the controller's
    (fsm.shutdown, fsm.startup): the same steps as a stop and a start."""

    def __init__(self, config: Config, juicefs: JuiceFSTool, litestream: LitestreamTool,
                 history: TimeTravel, point: PointInTime, copies: Copies,
                 own_groups: Callable[[], list[int]],
                 teardown: Callable[[], Awaitable[list[str]]],
                 start_replication: Callable[[], Awaitable[None]],
                 mount_volume: Callable[[], Awaitable[None]], log: Any) -> None:
        self.cfg = config
        self.layout = config.layout
        self.juicefs = juicefs
        self.litestream = litestream
        self.history = history
        self.point = point
        self.copies = copies
        self._own_groups = own_groups
        self._teardown = teardown
        self._start_replication = start_replication
        self._mount_volume = mount_volume
        self.log = log.bind(component="time_travel")
        self._plan: _Plan | None = None

    def rollback_failing(self) -> bool:
        """The chart's guard: the current step failed."""
        return self._plan is not None and self._plan.failure is not None

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[_Plan]:
        """Run a step: its failure is recorded for the chart's guard (and later the caller);
        an interruption (stop, failure) settles the caller at once."""
        plan = self._plan
        assert plan is not None
        try:
            yield plan
        except asyncio.CancelledError:
            plan.op.error = TimeTravelError(
                f"rollback to {iso(plan.at)} was interrupted ({name}): the volume left "
                f"ready; the next start undoes it")
            plan.op.settle()
            raise
        except (FsmError, OSError) as exc:
            self.log.error("rollback_step_failed", step=name, error=str(exc),
                           error_type=type(exc).__name__)
            plan.failure = exc

    # ---- preparing_rollback ------------------------------------------------------------

    async def prepare_rollback(self, op: TravelOp) -> TravelOp:
        assert op.at is not None
        self._plan = _Plan(op, op.at, time.monotonic())
        with self._step("preparing") as plan:
            self.history.refuse_while_browsing("roll back")
            self._refuse_while_in_use()
            await self.history.sync()
            (await self.point.window()).check(plan.at)
            plan.uuid = self.history.uuid()
            others = await writable_mounts(plan.uuid, exclude=self.layout.mount_point)
            if others:
                raise UnsafeMetadataCopy(
                    f"rollback refused: this volume is also mounted read-write at "
                    f"{', '.join(map(str, others))}; stop that mount first")
            name = unique(f"rollback-{int(time.time())}",
                          set(names_in(self.layout.time_travel_dir)))
            work = self.layout.time_travel_dir / name
            await asyncio.to_thread(fresh_dir, work)
            try:
                plan.restored = await self.point.restore_checked(
                    plan.at, work / "restored" / "metadata.db")
            except BaseException:
                await asyncio.to_thread(remove_tree, work, self.log)
                raise
            plan.work = work
            plan.previous_subpath = self.litestream.replica_subpath
            plan.new_subpath = name
            self._write_journal(plan)
            self.log.info("rollback_started", at=iso(plan.at), txid=plan.restored.txid,
                          workdir=str(work))
        if self.rollback_failing():  # nothing changed: the caller hears the reason as it was
            op.error = plan.failure
        return op

    def _refuse_while_in_use(self) -> None:
        """A rollback remounts the volume: programs inside would keep handles to the old mount
        (ENOTCONN from then on) and never see the rolled-back tree."""
        inside = holders(self.layout.mount_point, self._own_groups())
        if inside:
            raise InUse(f"rollback refused: the volume is in use by {named(inside)}; a rollback "
                        f"remounts it and they would be left on the old mount. Stop them (or "
                        f"cd elsewhere), then roll back")

    # ---- the switch ----------------------------------------------------------------------

    async def stop_live_volume(self) -> TravelOp:
        with self._step("stopping the live volume") as plan:
            plan.stopped_at = time.monotonic()
            problems = await self._teardown()
            if problems:
                raise RollbackFailed("the live volume did not stop cleanly: "
                                     + "; ".join(problems))
            others = await writable_mounts(plan.uuid, exclude=None)
            if others:
                raise UnsafeMetadataCopy(f"this volume is mounted read-write at "
                                         f"{', '.join(map(str, others))}; not swapping its "
                                         f"metadata")
        return self._op()

    async def swap_metadata(self) -> TravelOp:
        with self._step("swapping the metadata") as plan:
            assert plan.restored is not None
            await asyncio.to_thread(swap_in, self.layout, plan.restored.db, plan.previous_dir)
            self.litestream.replica_subpath = plan.new_subpath
            self.litestream.write_config()
        return self._op()

    async def replicate_new_path(self) -> TravelOp:
        with self._step("starting litestream on the new replica path"):
            await self._start_replication()
        return self._op()

    async def remount_volume(self) -> TravelOp:
        with self._step("remounting") as plan:
            await self._mount_volume()
            plan.offline_ms = ms_since(plan.stopped_at)
            self.log.info("rollback_mounted", replica=self.litestream.replica_location,
                          offline_ms=plan.offline_ms)
        return self._op()

    async def carry_over(self) -> TravelOp:
        """Checkpoint pre-rollback-<unix> in the rolled-back volume = the active tree just
        replaced: a clone of the restored tree, then only what changed since is copied from a
        read-only mount of the previous metadata."""
        with self._step("keeping the replaced tree") as plan:
            plan.checkpoint, plan.carried = await self._carry_over(plan)
            await self.litestream.sync()
        return self._op()

    async def _carry_over(self, plan: _Plan) -> tuple[Checkpoint, dict[str, int]]:
        assert plan.work is not None
        started = time.monotonic()
        mp = plan.work / "previous-mount"
        mp.mkdir()
        child = await self.copies.mount(plan.previous_dir / self.layout.metadata_db.name,
                                        mp, plan.work / "previous-cache")
        try:
            checkpoints = self.layout.checkpoints_dir
            checkpoints.mkdir(parents=True, exist_ok=True)
            cp_id = unique(f"{PRE_ROLLBACK}{int(time.time())}", set(names_in(checkpoints)))
            dst = checkpoints / cp_id
            base = self.layout.active_root
            cloning = time.monotonic()
            if base.is_dir():
                await self.juicefs.clone(base, dst)
            else:
                dst.mkdir()
            timings = {"clone_ms": ms_since(cloning)}
            diffing = time.monotonic()
            source = mp / base.name
            counts = (await asyncio.to_thread(apply_tree_diff, source, base, dst)
                      if source.is_dir() else {})
            timings["diff_ms"] = ms_since(diffing)
            os.utime(dst)  # created_at
        finally:
            problems = await self.copies.unmount(child, mp)
            if problems:
                self.log.warning("carry_over_unmount_incomplete", problems=problems)
        if problems:
            raise RollbackFailed("; ".join(problems))
        self.log.info("pre_rollback_checkpoint", id=cp_id, duration_ms=ms_since(started),
                      **counts, **timings)
        return Checkpoint.at(dst), counts

    # ---- committing and after -------------------------------------------------------------

    async def commit_rollback(self) -> TravelOp:
        """The point of no return: the next start (here or on a new machine) uses the new
        replica path. Everything before can be undone; gc after it cannot. A failure to record
        it is undone like any step before it."""
        with self._step("committing") as plan:
            assert plan.restored is not None
            await self.point.write_pointer({
                "replica": plan.new_subpath, "previous": plan.previous_subpath,
                "rolled_back_to": iso(plan.at),
                "state_at": iso(plan.restored.state_at) if plan.restored.state_at else None,
                "txid": plan.restored.txid, "since": iso(utc_now())})
            self.log.info("rollback_committed", replica=self.litestream.replica_location)
            self._journal_path().unlink(missing_ok=True)  # committed: nothing to undo
        return self._op()

    async def collect_garbage(self) -> TravelOp:
        """Objects only the abandoned future referenced are deleted. A failure does not undo
        the rollback (it is committed): the objects stay until the next `juicefs gc`."""
        plan = self._plan
        assert plan is not None and plan.restored is not None and plan.work is not None
        gc = await self._gc()
        await asyncio.to_thread(remove_tree, plan.work, self.log)
        assert plan.checkpoint is not None
        plan.op.result = RollbackResult(
            plan.at, plan.restored.state_at, plan.restored.txid, plan.checkpoint,
            self.litestream.replica_location, plan.offline_ms, ms_since(plan.started),
            plan.carried, gc)
        self.log.info("rollback_done", at=iso(plan.at), checkpoint=plan.checkpoint.id,
                      offline_ms=plan.offline_ms, duration_ms=plan.op.result.duration_ms,
                      gc_ok=gc["ok"])
        self._plan = None
        return plan.op

    async def _gc(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            report = await self.history.collect_garbage(self.layout.metadata_db)
        except FsmError as exc:
            self.log.warning("rollback_gc_failed", error=str(exc))
            return {"ok": False, "error": str(exc), "duration_ms": ms_since(started)}
        summary = next((line for line in report.splitlines() if "scanned" in line), "")
        return {"ok": True, "summary": summary.split(">:", 1)[-1].strip(),
                "duration_ms": ms_since(started)}

    async def undo_rollback(self) -> TravelOp:
        """Put the previous metadata back and restart the volume as it was. If that fails too,
        the chart goes to failed (the error is raised); the next start puts it back."""
        plan = self._plan
        assert plan is not None and plan.work is not None
        error = plan.failure
        self.log.error("rollback_failed", at=iso(plan.at), error=str(error),
                       error_type=type(error).__name__)
        try:
            problems = await self._teardown()
            if problems:
                raise RollbackFailed("; ".join(problems))
            await asyncio.to_thread(put_back, self.layout, plan.work)
            self.litestream.replica_subpath = plan.previous_subpath
            self.litestream.write_config()
            await self._start_replication()
            await self._mount_volume()
        except asyncio.CancelledError:
            raise
        except (FsmError, OSError) as exc:
            plan.op.error = RollbackFailed(
                f"rollback to {iso(plan.at)} failed ({one_line(str(error))}) and the volume "
                f"could not be restarted as it was ({one_line(str(exc))}); the previous "
                f"metadata is in {plan.previous_dir} and the next start puts it back")
            plan.op.settle()
            raise plan.op.error from exc
        self._journal_path().unlink(missing_ok=True)
        await asyncio.to_thread(remove_tree, plan.work, self.log)
        self.log.warning("rollback_undone", at=iso(plan.at))
        plan.op.error = RollbackFailed(
            f"rollback to {iso(plan.at)} failed ({one_line(str(error))}); the volume is back as "
            f"it was before the rollback")
        self._plan = None
        return plan.op

    def _op(self) -> TravelOp:
        assert self._plan is not None
        return self._plan.op

    # ---- the journal -----------------------------------------------------------------------

    def _journal_path(self) -> Path:
        return self.layout.time_travel_dir / JOURNAL

    def _write_journal(self, plan: _Plan) -> None:
        assert plan.restored is not None
        write_private(self._journal_path(), json.dumps({
            "workdir": str(plan.work), "at": iso(plan.at), "txid": plan.restored.txid,
            "previous_replica": plan.previous_subpath, "new_replica": plan.new_subpath}))

    def recover(self, current_subpath: str) -> None:
        """At start: a rollback interrupted by a crash is kept when it was committed (the
        pointer names its replica), otherwise the previous metadata is put back."""
        path = self._journal_path()
        try:
            journal = json.loads(path.read_text())
        except FileNotFoundError:
            journal = None
        except ValueError as exc:
            raise TimeTravelError(f"the rollback journal {path} is unreadable ({exc}); move "
                                  f"it away after checking {self.layout.time_travel_dir}") from exc
        if journal is not None:
            work = Path(journal["workdir"])
            if journal.get("new_replica") == current_subpath:
                self.log.warning("rollback_recovered", outcome="kept (it was committed)",
                                 at=journal.get("at"))
            else:
                put_back(self.layout, work)
                self.log.warning("rollback_recovered", outcome="undone: previous metadata back",
                                 at=journal.get("at"))
            path.unlink()
        for work in children_of(self.layout.time_travel_dir):  # no journal names them now
            if work.name.startswith("rollback-"):
                remove_tree(work, self.log)
