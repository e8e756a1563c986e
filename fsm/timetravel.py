"""Whole-volume time travel: list the history window, browse a past second read-only, roll the
volume back to it. The facts behind every rule here are in docs/time-travel.md.

The metadata's past comes from Litestream (`restore -timestamp` into a separate file); the data
of that past still exists because JuiceFS keeps deleted files and freed slices for trash-days
(history_hours sets it). Two metadata copies of one bucket are dangerous:
- a restored copy mounted read-write hands out the slice ids the live volume uses (same object
  keys: silent corruption), so copies are only ever mounted read-only (`read_only_mount_child`
  has no read-write variant) and a rollback bumps the restored copy's slice counter past every
  id the abandoned future used;
- `juicefs gc --delete` against a copy deletes the live volume's newer objects, so gc runs only
  against the primary, and never while another read-write mount of the volume exists.
Both are checked in code (`collect_garbage`, `writable_mounts`) before acting.

A rollback is a state of the chart (`rolling_back`, fsm.chart); its action (`roll_back`) restores
and checks the copy while the volume still runs, then stops the live volume, swaps the metadata,
starts Litestream on a new replica path, mounts, keeps the tree it replaced as checkpoint
`pre-rollback-<unix>`, and only then commits (records the new replica path next to the replica)
and garbage-collects. Any failure before the commit puts the previous metadata back and restarts
the volume as it was; a crash is undone at the next start from the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from . import s3
from .checkpoints import Checkpoint, Operation, unique
from .errors import (
    BrokenRestorePoint,
    BrowseNotFound,
    FsmError,
    HistoryOff,
    InUse,
    OutsideWindow,
    RollbackFailed,
    S3Unavailable,
    TimeTravelError,
    ToolError,
    UnsafeMetadataCopy,
    one_line,
)
from .juicefs import (
    is_juicefs_mount,
    is_stale_mount,
    juicefs_mount_points,
    lazy_unmount,
    mount_fstype,
    probe_config,
    read_format,
)
from .litestream import REPLICA_PATH, write_private
from .logs import get_logger, ms_since
from .proc import Child, holders, named
from .timepoints import (
    SNAPSHOT_LEVEL,
    RestoreWindow,
    history_on,
    iso,
    parse_time,
    stamp,
    state_time,
    trash_days_needed,
    utc_now,
)

if TYPE_CHECKING:
    from .controller import JuiceFS

POINTER = "CURRENT"
"""Beside the replica root (S3: `juicefs-metadata/CURRENT`, local: `litestream/CURRENT`): which
replica path holds the current history after a rollback. Absent: the root itself."""
JOURNAL = "rollback.json"
PRE_ROLLBACK = "pre-rollback-"
_SUBPATH = re.compile(r"^rollback-\d+(-\d+)?$")
_LOST = re.compile(r"(\d+) objects? (?:are|is) lost|(\d+) broken files?", re.IGNORECASE)
_NOT_AVAILABLE = re.compile(r"no matching backup|not available|no backup", re.IGNORECASE)
_UNMOUNT_GRACE = 10.0


# ---- records --------------------------------------------------------------------------------

@dataclass
class TravelOp(Operation):
    """A browse/unbrowse/rollback request handed to the chart (see checkpoints.Operation)."""

    at: datetime | None = None
    target: str = ""

    failure: ClassVar[type[FsmError]] = TimeTravelError

    @contextlib.contextmanager
    def capture(self, what: str) -> Iterator[None]:
        """Operation.capture, and: a rollback that could not bring the volume back is a chart
        error (failed); the caller learns why, and the next start undoes it from its journal."""
        try:
            with super().capture(what):
                yield
        except _Unrecoverable as exc:
            self.error = exc.error
            self.settle()
            raise exc.error from exc


class _Unrecoverable(Exception):
    def __init__(self, error: FsmError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Browse:
    """An open read-only mount of the volume as it was at `at`."""

    at: datetime
    state_at: datetime | None
    txid: str
    mount_point: Path
    workdir: Path
    child: Child = field(repr=False)
    opened_at: datetime = field(default_factory=utc_now)

    @property
    def key(self) -> str:
        return stamp(self.at)

    @property
    def tree(self) -> Path:
        """The user's tree as it was (the active tree of that time)."""
        return self.mount_point / "active" / "fs"

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "state_at": iso(self.state_at) if self.state_at else None,
                "txid": self.txid, "path": str(self.mount_point), "tree": str(self.tree),
                "opened_at": iso(self.opened_at), "pid": self.child.pid}


@dataclass(frozen=True)
class Restored:
    db: Path
    at: datetime
    txid: str
    state_at: datetime | None


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
    at: datetime
    work: Path
    restored: Restored
    previous_subpath: str
    new_subpath: str
    checkpoint: Checkpoint | None = None
    carried: dict[str, int] = field(default_factory=dict)
    offline_ms: float = 0.0

    @property
    def previous_dir(self) -> Path:
        return self.work / "previous"


# ---- the controller's time travel -----------------------------------------------------------

class TimeTravel:
    """Time travel for one controller (fsm.controller.JuiceFS): its adapters, layout and
    start/stop actions. Browse mounts are owned children: `close_all()` runs at every stop."""

    def __init__(self, jfs: JuiceFS) -> None:
        self.jfs = jfs
        self.cfg = jfs.config
        self.layout = jfs.layout
        self.log = jfs.log.bind(component="time_travel")
        self._browses: dict[str, Browse] = {}

    # ---- checks ------------------------------------------------------------------------

    def require_enabled(self, what: str) -> None:
        if not history_on(self.cfg):
            raise HistoryOff(
                f"cannot {what}: time travel is off (history_hours = 0). Turn it on by setting "
                f"history_hours to the hours of history to keep, e.g. FSM_HISTORY_HOURS=24, "
                f"`juicefs-fsm run --history-hours 24`, or `history_hours = 24` in the --config "
                f"file, and restart; the history starts then (see docs/time-travel.md)")

    def _refuse_while_browsing(self, what: str) -> None:
        if self._browses:
            paths = ", ".join(str(b.mount_point) for b in self._browses.values())
            raise TimeTravelError(
                f"cannot {what} while browse mounts are open ({paths}): their data may be "
                f"deleted by the garbage collection; close them with `juicefs-fsm unbrowse`")

    # ---- start -------------------------------------------------------------------------

    async def before_start(self) -> None:
        """At every start, before Litestream's config is written: clear browse mounts a crashed
        run left, find the replica path in use, and undo a rollback that was interrupted."""
        await self._clear_leftovers()
        pointer = await self._read_pointer()
        subpath = _valid_subpath(str(pointer.get("replica", ""))) if pointer else ""
        await asyncio.to_thread(self._recover_rollback, subpath)
        for work in _children(self.layout.time_travel_dir):  # no journal names them any more
            if work.name.startswith("rollback-"):
                await asyncio.to_thread(_remove_tree, work, self.log)
        self.jfs.litestream.replica_subpath = subpath
        if subpath:
            self.log.info("replica_path", replica=self.jfs.litestream.replica_location)

    async def ensure_trash_days(self) -> None:
        """Deleted data must outlive the window: raise trash-days on an existing volume."""
        need = trash_days_needed(self.cfg)
        if not need:
            return
        fmt = self.jfs.juicefs.read_format() or {}
        have = int(fmt.get("TrashDays", 1))
        if have < need:
            await self.jfs.juicefs.set_trash_days(need)
            self.log.info("trash_days_raised", before=have, after=need,
                          history_hours=self.cfg.history_hours)

    async def _clear_leftovers(self) -> None:
        for mp in _children(self.layout.history_dir):
            if mount_fstype(mp) is not None:
                # A crashed run's browse mount: its juicefs may still serve it.
                self.log.warning("browse_leftover_unmounted", mount_point=str(mp))
                with contextlib.suppress(ToolError):
                    await self.jfs.juicefs.umount_at(mp)
                if mount_fstype(mp) is not None:
                    await lazy_unmount(mp, self.log)
            with contextlib.suppress(OSError):
                mp.rmdir()
        for work in _children(self.layout.time_travel_dir):
            if work.name.startswith("browse-"):
                await asyncio.to_thread(_remove_tree, work, self.log)

    # ---- the window --------------------------------------------------------------------

    async def restore_points(self) -> RestoreWindow:
        self.require_enabled("list restore points")
        await self._sync()
        return await self._window()

    async def _window(self) -> RestoreWindow:
        files = await self._s3_step("history listing", self.jfs.litestream.ltx_files)
        return RestoreWindow.from_ltx(files, replica=self.jfs.litestream.replica_location,
                                      history_hours=self.cfg.history_hours)

    async def _sync(self) -> None:
        # The replica gets the latest transactions (~20 ms), so "now" restores now.
        if self.jfs.pids["litestream"]:
            await self.jfs.litestream.sync()

    async def _s3_step(self, what: str, step: Callable[[], Awaitable[Any]]) -> Any:
        return await self.jfs._with_s3(what, step)

    async def _restore_checked(self, at: datetime, db: Path) -> Restored:
        """Restore the metadata as it was at `at` into `db` (a new file, owner-only) and check
        with fsck that every object it references exists. Refused before anything mounts."""
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        when = iso(at)
        litestream = self.jfs.litestream
        try:
            plan = await self._s3_step("restore plan",
                                       lambda: litestream.restore_to(db, when, dry_run=True))
            summary = await self._s3_step("point-in-time restore",
                                          lambda: litestream.restore_to(db, when))
        except ToolError as exc:
            if _NOT_AVAILABLE.search(exc.stderr_tail):
                raise OutsideWindow(f"no restore point at or before {when} in the replica "
                                    f"({litestream.replica_location}); `juicefs-fsm history` "
                                    f"shows the window") from exc
            raise
        os.chmod(db, 0o600)  # the format in it holds the bucket's credentials
        if not _starts_complete(plan):
            raise OutsideWindow(f"the replica has no complete history up to {when} (no "
                                f"snapshot before it); `juicefs-fsm history` shows the window")
        txid = str(summary.get("txid") or "")
        if txid != str(plan.get("max_txid") or txid):
            raise TimeTravelError(f"litestream restored transaction {txid} for {when}, but "
                                  f"planned {plan.get('max_txid')}; nothing was mounted")
        await self._fsck(db, when)
        restored = Restored(db, at, txid, state_time(plan))
        self.log.info("metadata_restored_at", at=when, txid=txid, db=str(db),
                      state_at=iso(restored.state_at) if restored.state_at else None)
        return restored

    async def _fsck(self, db: Path, when: str) -> None:
        try:
            await self._s3_step("fsck", lambda: self.jfs.juicefs.fsck(db))
        except ToolError as exc:
            found = _LOST.findall(exc.stderr_tail)
            if not found:
                raise
            raise BrokenRestorePoint(
                f"the volume as it was at {when} cannot be used: `juicefs fsck` finds data "
                f"missing ({one_line(exc.stderr_tail)}). Its objects are gone (deleted longer "
                f"than trash-days ago, written while history was off, or, less than "
                f"upload_delay ago, still waiting for upload). Choose another time; "
                f"`juicefs-fsm history` shows the window") from exc

    # ---- browse ------------------------------------------------------------------------

    def browsing(self) -> list[Browse]:
        return sorted(self._browses.values(), key=lambda b: b.at)

    def status(self) -> dict[str, Any]:
        return {"history_hours": self.cfg.history_hours,
                "browsing": [b.to_json() for b in self.browsing()]}

    async def open(self, op: TravelOp) -> None:
        """Chart action (`browse`, from ready)."""
        assert op.at is not None
        with op.capture(f"browse at {iso(op.at)}"):
            op.result = await self._open(op.at)

    async def _open(self, at: datetime) -> Browse:
        key = stamp(at)
        if key in self._browses:
            return self._browses[key]
        started = time.monotonic()
        await self._sync()
        (await self._window()).check(at)
        work = self.layout.time_travel_dir / f"browse-{key}"
        mp = self.layout.history_dir / key
        await asyncio.to_thread(_fresh_dir, work)
        try:
            restored = await self._restore_checked(at, work / "metadata.db")
            mp.mkdir(parents=True, exist_ok=True)
            child = await self._mount_read_only(restored.db, mp, work / "cache")
        except BaseException:
            await asyncio.to_thread(_remove_tree, work, self.log)
            with contextlib.suppress(OSError):
                mp.rmdir()
            raise
        browse = Browse(at, restored.state_at, restored.txid, mp, work, child)
        self._browses[key] = browse
        self.log.info("browse_opened", at=iso(at), mount_point=str(mp), pid=child.pid,
                      txid=restored.txid, duration_ms=ms_since(started))
        return browse

    async def _mount_read_only(self, db: Path, mp: Path, cache: Path) -> Child:
        if mount_fstype(mp) is not None:
            raise TimeTravelError(f"{mp} is already a mount point")
        child = self.jfs.juicefs.read_only_mount_child(db, mp, cache)
        await child.start()
        try:
            await _wait_mounted(child, mp, self.cfg.ready_timeout)
        except BaseException:
            await self._unmount_copy(child, mp)
            raise
        return child

    async def close(self, op: TravelOp) -> None:
        """Chart action (`unbrowse`, from ready)."""
        with op.capture(f"unbrowse {op.target}"):
            browse = self._find(op.target)
            problems = await self._close(browse, force=False)
            if problems:
                raise TimeTravelError("; ".join(problems))
            op.result = browse

    def _find(self, target: str) -> Browse:
        path = Path(target).expanduser()
        for browse in self._browses.values():
            if path.is_absolute() and path in (browse.mount_point, browse.tree):
                return browse
        if not path.is_absolute():
            with contextlib.suppress(OutsideWindow):
                key = stamp(parse_time(target))
                if key in self._browses:
                    return self._browses[key]
        open_ = ", ".join(f"{iso(b.at)} ({b.mount_point})" for b in self.browsing()) or "none"
        raise BrowseNotFound(f"no browse mount is open for {target!r}; open ones: {open_}")

    async def _close(self, browse: Browse, *, force: bool) -> list[str]:
        problems = await self._unmount_copy(browse.child, browse.mount_point, force=force)
        self._browses.pop(browse.key, None)
        if not problems:
            await asyncio.to_thread(_remove_tree, browse.workdir, self.log)
            with contextlib.suppress(OSError):
                browse.mount_point.rmdir()
        self.log.info("browse_closed", at=iso(browse.at), mount_point=str(browse.mount_point))
        return problems

    async def close_all(self) -> list[str]:
        """Unmount every browse mount (stop, failure clean-up). Returns what was left behind."""
        problems: list[str] = []
        for browse in list(self._browses.values()):
            problems += await self._close(browse, force=True)
        return problems

    async def _unmount_copy(self, child: Child, mp: Path, *, force: bool = True) -> list[str]:
        """Unmount a copy's read-only mount and reap its process. A busy mount point (a shell
        still in it) is refused unless `force` (stop, clean-up): then its FUSE connection is
        aborted, which ends the process at once; a read-only copy has nothing to flush."""
        mounted = is_juicefs_mount(mp)
        if mounted:
            try:
                await self.jfs.juicefs.umount_at(mp)
            except ToolError as exc:
                if "busy" in exc.stderr_tail and not force:
                    inside = holders(mp, self.jfs.own_process_groups())
                    raise InUse(
                        f"{mp} is in use by {named(inside)}; leave it (cd elsewhere, close its "
                        f"files) and unbrowse again. It stays open; stopping the volume closes "
                        f"it anyway") from exc
                self.log.warning("copy_unmount_failed", mount_point=str(mp), error=str(exc))
                await self.jfs.juicefs.abort_connection(mp)
        # Unmounted, juicefs exits by itself; one that never mounted is stopped now.
        if child.pid is not None and not await child.exits_within(
                _UNMOUNT_GRACE if mounted else 0):
            await child.terminate(_UNMOUNT_GRACE)
        if is_juicefs_mount(mp) or is_stale_mount(mp):
            try:
                await lazy_unmount(mp, self.log)
            except ToolError as exc:
                self.log.warning("copy_lazy_unmount_failed", mount_point=str(mp),
                                 error=str(exc))
        if mount_fstype(mp) is not None:
            return [f"{mp} is still mounted; run `umount -l {mp}`"]
        return []

    # ---- garbage collection ------------------------------------------------------------

    async def collect_garbage(self, db: Path) -> str:
        """`juicefs gc --delete` against `db`, which must be the primary metadata; refused
        while any other read-write mount of this volume exists or a browse mount is open."""
        primary = self.layout.metadata_db
        if not _same_file(db, primary):
            raise UnsafeMetadataCopy(
                f"gc refused: {db} is not the primary metadata ({primary}); gc against a copy "
                f"deletes every object only the live volume references")
        self._refuse_while_browsing("collect garbage")
        others = await writable_mounts(self._uuid(), exclude=self.layout.mount_point)
        if others:
            raise UnsafeMetadataCopy(
                f"gc refused: this volume is also mounted read-write at "
                f"{', '.join(map(str, others))}; another writer's new objects would look leaked")
        return str(await self._s3_step("gc", self.jfs.juicefs.gc_primary))

    def _uuid(self) -> str:
        fmt = read_format(self.layout.metadata_db) or {}
        return str(fmt.get("UUID", ""))

    # ---- rollback ----------------------------------------------------------------------

    async def roll_back(self, op: TravelOp) -> TravelOp:
        """Chart action (the `rolling_back` state's invoke)."""
        assert op.at is not None
        with op.capture(f"rollback to {iso(op.at)}"):
            op.result = await self._roll_back(op.at)
        return op

    async def _roll_back(self, at: datetime) -> RollbackResult:
        started = time.monotonic()
        self._refuse_while_browsing("roll back")
        self._refuse_while_in_use()
        await self._sync()
        (await self._window()).check(at)
        uuid = self._uuid()
        others = await writable_mounts(uuid, exclude=self.layout.mount_point)
        if others:
            raise UnsafeMetadataCopy(
                f"rollback refused: this volume is also mounted read-write at "
                f"{', '.join(map(str, others))}; stop that mount first")
        name = unique(f"rollback-{int(time.time())}", set(_names(self.layout.time_travel_dir)))
        work = self.layout.time_travel_dir / name
        await asyncio.to_thread(_fresh_dir, work)
        try:
            restored = await self._restore_checked(at, work / "restored" / "metadata.db")
        except BaseException:
            await asyncio.to_thread(_remove_tree, work, self.log)
            raise
        plan = _Plan(at, work, restored, self.jfs.litestream.replica_subpath, name)
        self._write_journal(plan)
        self.log.info("rollback_started", at=iso(at), txid=restored.txid, workdir=str(work))
        try:
            await self._switch(plan, uuid)
            await self._commit(plan)
        except asyncio.CancelledError:
            raise  # the volume left rolling_back (stop, failure): the next start undoes it
        except BaseException as exc:
            await self._undo(plan, exc)
            raise RollbackFailed(
                f"rollback to {iso(at)} failed ({one_line(str(exc))}); the volume is back as "
                f"it was before the rollback") from exc
        self._journal_path().unlink(missing_ok=True)  # committed: nothing left to undo
        gc = await self._gc_after_rollback()
        await asyncio.to_thread(_remove_tree, work, self.log)
        assert plan.checkpoint is not None
        result = RollbackResult(at, restored.state_at, restored.txid, plan.checkpoint,
                                self.jfs.litestream.replica_location, plan.offline_ms,
                                ms_since(started), plan.carried, gc)
        self.log.info("rollback_done", at=iso(at), checkpoint=plan.checkpoint.id,
                      offline_ms=plan.offline_ms, duration_ms=result.duration_ms, gc_ok=gc["ok"])
        return result

    def _refuse_while_in_use(self) -> None:
        """A rollback remounts the volume: programs inside would keep handles to the old mount
        (ENOTCONN from then on) and never see the rolled-back tree."""
        inside = holders(self.layout.mount_point, self.jfs.own_process_groups())
        if inside:
            raise InUse(f"rollback refused: the volume is in use by {named(inside)}; a rollback "
                        f"remounts it and they would be left on the old mount. Stop them (or "
                        f"cd elsewhere), then roll back")

    async def _switch(self, plan: _Plan, uuid: str) -> None:
        """Stop the live volume, make the restored copy the primary on a new replica path,
        start, and keep the replaced tree as checkpoint pre-rollback-<unix>."""
        stopping = time.monotonic()
        problems = await self.jfs._teardown()
        if problems:
            raise RollbackFailed("the live volume did not stop cleanly: " + "; ".join(problems))
        others = await writable_mounts(uuid, exclude=None)
        if others:
            raise UnsafeMetadataCopy(f"this volume is mounted read-write at "
                                     f"{', '.join(map(str, others))}; not swapping its metadata")
        await asyncio.to_thread(self._swap_in, plan)
        litestream = self.jfs.litestream
        litestream.replica_subpath = plan.new_subpath
        litestream.write_config()
        await self.jfs.start_replication()
        await self.jfs.mount_volume()
        plan.offline_ms = ms_since(stopping)
        self.log.info("rollback_mounted", replica=litestream.replica_location,
                      offline_ms=plan.offline_ms)
        plan.checkpoint, plan.carried = await self._carry_over(plan)
        await litestream.sync()

    def _swap_in(self, plan: _Plan) -> None:
        previous = plan.previous_dir
        previous.mkdir(mode=0o700)
        for path in s3.metadata_files(self.layout):
            os.rename(path, previous / path.name)
        db = self.layout.metadata_db
        bump_slice_counter(plan.restored.db, previous / db.name)
        os.rename(plan.restored.db, db)
        s3.make_private(self.layout)

    async def _carry_over(self, plan: _Plan) -> tuple[Checkpoint, dict[str, int]]:
        """Checkpoint pre-rollback-<unix> in the rolled-back volume = the active tree just
        replaced: a clone of the restored tree, then only what changed since is copied from a
        read-only mount of the previous metadata."""
        started = time.monotonic()
        mp = plan.work / "previous-mount"
        mp.mkdir()
        child = await self._mount_read_only(plan.previous_dir / self.layout.metadata_db.name,
                                            mp, plan.work / "previous-cache")
        try:
            checkpoints = self.layout.checkpoints_dir
            checkpoints.mkdir(parents=True, exist_ok=True)
            cp_id = unique(f"{PRE_ROLLBACK}{int(time.time())}", set(_names(checkpoints)))
            dst = checkpoints / cp_id
            base = self.layout.active_root
            cloning = time.monotonic()
            if base.is_dir():
                await self.jfs.juicefs.clone(base, dst)
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
            problems = await self._unmount_copy(child, mp)
            if problems:
                self.log.warning("carry_over_unmount_incomplete", problems=problems)
        if problems:
            raise RollbackFailed("; ".join(problems))
        self.log.info("pre_rollback_checkpoint", id=cp_id, duration_ms=ms_since(started), **counts,
                      **timings)
        return Checkpoint.at(dst), counts

    async def _commit(self, plan: _Plan) -> None:
        """The point of no return: the next start (here or on a new machine) uses the new
        replica path. Everything before can be undone; gc after it cannot."""
        await self._write_pointer({
            "replica": plan.new_subpath, "previous": plan.previous_subpath,
            "rolled_back_to": iso(plan.at),
            "state_at": iso(plan.restored.state_at) if plan.restored.state_at else None,
            "txid": plan.restored.txid, "since": iso(utc_now())})
        self.log.info("rollback_committed", replica=self.jfs.litestream.replica_location)

    async def _undo(self, plan: _Plan, error: BaseException) -> None:
        self.log.error("rollback_failed", at=iso(plan.at), error=str(error),
                       error_type=type(error).__name__)
        try:
            problems = await self.jfs._teardown()
            if problems:
                raise RollbackFailed("; ".join(problems))
            await asyncio.to_thread(_put_back, self.layout, plan.work)
            litestream = self.jfs.litestream
            litestream.replica_subpath = plan.previous_subpath
            litestream.write_config()
            await self.jfs.start_replication()
            await self.jfs.mount_volume()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            raise _Unrecoverable(RollbackFailed(
                f"rollback to {iso(plan.at)} failed ({one_line(str(error))}) and the volume "
                f"could not be restarted as it was ({one_line(str(exc))}); the previous "
                f"metadata is in {plan.previous_dir} and the next start puts it back")) from exc
        self._journal_path().unlink()
        await asyncio.to_thread(_remove_tree, plan.work, self.log)
        self.log.warning("rollback_undone", at=iso(plan.at))

    async def _gc_after_rollback(self) -> dict[str, Any]:
        """Objects only the abandoned future referenced are deleted. A failure does not undo
        the rollback (it is committed): the objects stay until the next `juicefs gc`."""
        started = time.monotonic()
        try:
            report = await self.collect_garbage(self.layout.metadata_db)
        except FsmError as exc:
            self.log.warning("rollback_gc_failed", error=str(exc))
            return {"ok": False, "error": str(exc), "duration_ms": ms_since(started)}
        summary = next((line for line in report.splitlines() if "scanned" in line), "")
        return {"ok": True, "summary": summary.split(">:", 1)[-1].strip(),
                "duration_ms": ms_since(started)}

    # ---- journal and replica pointer ---------------------------------------------------

    def _journal_path(self) -> Path:
        return self.layout.time_travel_dir / JOURNAL

    def _write_journal(self, plan: _Plan) -> None:
        write_private(self._journal_path(), json.dumps({
            "workdir": str(plan.work), "at": iso(plan.at), "txid": plan.restored.txid,
            "previous_replica": plan.previous_subpath, "new_replica": plan.new_subpath}))

    def _recover_rollback(self, current_subpath: str) -> None:
        """A rollback interrupted by a crash: committed (the pointer names its replica) ->
        keep it; otherwise put the previous metadata back."""
        path = self._journal_path()
        try:
            journal = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise TimeTravelError(f"the rollback journal {path} is unreadable ({exc}); move "
                                  f"it away after checking {self.layout.time_travel_dir}") from exc
        work = Path(journal["workdir"])
        if journal.get("new_replica") == current_subpath:
            self.log.warning("rollback_recovered", outcome="kept (it was committed)",
                             at=journal.get("at"))
        else:
            _put_back(self.layout, work)
            self.log.warning("rollback_recovered", outcome="undone: previous metadata back",
                             at=journal.get("at"))
        path.unlink()
        _remove_tree(work, self.log)

    async def _read_pointer(self) -> dict[str, Any] | None:
        if self.cfg.local_mode:
            try:
                text = (self.layout.litestream_replica_dir / POINTER).read_text()
            except FileNotFoundError:
                return None
        else:
            key = f"{REPLICA_PATH}/{POINTER}"
            found = await self._s3_step("replica pointer read",
                                        lambda: asyncio.to_thread(_s3_get, self.cfg, key))
            if found is None:
                return None
            text = found
        value = json.loads(text)
        return value if isinstance(value, dict) else None

    async def _write_pointer(self, value: dict[str, Any]) -> None:
        text = json.dumps(value)
        if self.cfg.local_mode:
            write_private(self.layout.litestream_replica_dir / POINTER, text)
            return
        key = f"{REPLICA_PATH}/{POINTER}"
        await self._s3_step("replica pointer write",
                            lambda: asyncio.to_thread(_s3_put, self.cfg, key, text))


# ---- safety checks --------------------------------------------------------------------------

def _real_mount_point(mp: Path) -> str:
    # Resolve the parent only: resolving the mount point itself would ask its FUSE server.
    return os.path.join(os.path.realpath(mp.parent), mp.name)


async def _mount_config(mp: Path) -> dict[str, Any] | None:
    """`<mp>/.config` of any mount on the host (fsm.juicefs.probe_config: never hangs)."""
    try:
        info = json.loads((await probe_config(mp, get_logger(), 5)).stdout)
    except (FsmError, ValueError):
        return None  # stale, hung or not juicefs: it serves nothing
    return info if isinstance(info, dict) else None


async def writable_mounts(uuid: str, exclude: Path | None) -> list[Path]:
    """Read-write mounts of the volume `uuid` on this host, other than `exclude`."""
    skip = _real_mount_point(exclude) if exclude is not None else None
    found = []
    for mp in juicefs_mount_points():
        if str(mp) == skip:
            continue
        info = await _mount_config(mp)
        if info and (info.get("Format") or {}).get("UUID") == uuid and not (
                info.get("Meta") or {}).get("ReadOnly"):
            found.append(mp)
    return found


def bump_slice_counter(restored: Path, previous: Path) -> None:
    """Slice ids name the objects (chunks/<id>_<index>_<size>). The restored copy's counter is
    from the past: raise it past every id the abandoned future handed out, so the rolled-back
    volume never writes an object key that already exists."""
    # Read-only: closing a writable connection would checkpoint the previous db's WAL, which
    # litestream tracks; an undone rollback hands that db back to litestream untouched.
    with contextlib.closing(sqlite3.connect(f"file:{previous}?mode=ro", uri=True)) as old:
        row = old.execute("SELECT value FROM jfs_counter WHERE name = 'nextChunk'").fetchone()
    if row is None:
        return
    with contextlib.closing(sqlite3.connect(restored)) as new:
        new.execute("UPDATE jfs_counter SET value = MAX(value, ?) WHERE name = 'nextChunk'",
                    (int(row[0]),))
        new.commit()


# ---- carrying a tree over -------------------------------------------------------------------

def _same(a: os.stat_result, b: os.stat_result) -> bool:
    keys = ("st_ino", "st_ctime_ns", "st_mtime_ns", "st_size", "st_mode", "st_uid", "st_gid")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def apply_tree_diff(src: Path, base: Path, dst: Path) -> dict[str, int]:
    """Make `dst` (a clone of `base`) hold what `src` holds. `base` and `src` are one tree as two
    metadata copies of one volume see it: an entry with the same inode, ctime, mtime, size, mode
    and owner in both is unchanged (JuiceFS never reuses inode numbers; any change moves
    ctime), so only changed entries are copied. Hard links become separate files."""
    counts: Counter[str] = Counter()
    _sync_dir(src, base, dst, counts)
    return dict(counts)


def _sync_dir(src: Path, base: Path | None, dst: Path, counts: Counter[str]) -> bool:
    with os.scandir(src) as it:
        entries = {e.name: e.stat(follow_symlinks=False) for e in it}
    before: dict[str, os.stat_result] = {}
    if base is not None:
        with os.scandir(base) as it:
            before = {e.name: e.stat(follow_symlinks=False) for e in it}
    changed = False
    for name in before.keys() - entries.keys():
        _remove(dst / name)
        counts["removed"] += 1
        changed = True
    for name, now in entries.items():
        was = before.get(name)
        target = dst / name
        if stat.S_ISDIR(now.st_mode):
            same_dir = was is not None and stat.S_ISDIR(was.st_mode)
            if not same_dir:
                _remove(target)
                target.mkdir()
                counts["copied"] += 1
                changed = True
            inner = _sync_dir(src / name, base / name if same_dir and base else None, target,
                              counts)
            if inner or was is None or not _same(now, was):
                _copy_attrs(now, target)
        elif was is not None and _same(now, was):
            counts["unchanged"] += 1
        else:
            _remove(target)
            _copy_entry(src / name, now, target)
            counts["copied"] += 1
            changed = True
    return changed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _copy_entry(src: Path, st: os.stat_result, dst: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.lchown(dst, st.st_uid, st.st_gid)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst)
    else:  # fifo, socket, device
        os.mknod(dst, st.st_mode, st.st_rdev)
    # chown clears set-id bits: the mode (and xattrs, times) come after it.
    os.chown(dst, st.st_uid, st.st_gid)
    shutil.copystat(src, dst)


def _copy_attrs(st: os.stat_result, dst: Path) -> None:
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---- small helpers --------------------------------------------------------------------------

async def _wait_mounted(child: Child, mp: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not is_juicefs_mount(mp):
        if not child.running:
            await child.wait()
            raise ToolError("juicefs", f"mount of {mp}", child.returncode, child.stderr_tail())
        if time.monotonic() > deadline:
            raise ToolError("juicefs", f"mount of {mp} (not ready after {timeout:g}s)", None,
                            child.stderr_tail())
        await asyncio.sleep(0.01)


def _put_back(layout: Any, work: Path) -> None:
    """Undo a metadata swap: the previous files return, the restored ones go to discarded/."""
    previous = work / "previous"
    if not (previous / layout.metadata_db.name).exists():
        return  # the swap never happened
    discarded = work / "discarded"
    discarded.mkdir(mode=0o700, exist_ok=True)
    for path in s3.metadata_files(layout):
        os.rename(path, discarded / path.name)
    for path in previous.iterdir():
        os.rename(path, layout.base_dir / path.name)


def _starts_complete(plan: dict[str, Any]) -> bool:
    """A plan rebuilds the whole database: it starts from a snapshot or the first
    transaction (litestream applies the files on top of an empty database otherwise)."""
    files = plan.get("files") or []
    return any(int(f["level"]) == SNAPSHOT_LEVEL or int(str(f["min_txid"]), 16) == 1
               for f in files)


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _valid_subpath(value: str) -> str:
    if value and not _SUBPATH.match(value):
        raise TimeTravelError(f"the replica pointer names {value!r}, which is not a replica "
                              f"path juicefs-fsm writes (rollback-<unix>); check {POINTER}")
    return value


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700)


def _remove_tree(path: Path, log: Any) -> None:
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("remove_failed", path=str(path), error=str(exc))


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder))
    except FileNotFoundError:
        return []


def _names(folder: Path) -> list[str]:
    return [p.name for p in _children(folder)]


def _s3_call(cfg: Any, method: str, key: str, body: bytes = b"") -> s3.Response:
    target = s3.target_of(cfg)
    try:
        return s3.request(target, method, key=key, body=body, timeout=10)
    except (OSError, http.client.HTTPException) as exc:
        raise S3Unavailable(f"S3 endpoint {target.endpoint} is unreachable: "
                            f"{exc.__class__.__name__}: {exc}") from None


def _s3_get(cfg: Any, key: str) -> str | None:
    answer = _s3_call(cfg, "GET", key)
    if answer.status == 404:
        return None
    s3._raise_for(s3.target_of(cfg), answer)  # the S3 module's judgement of errors
    return answer.body.decode()


def _s3_put(cfg: Any, key: str, text: str) -> None:
    answer = _s3_call(cfg, "PUT", key, text.encode())
    s3._raise_for(s3.target_of(cfg), answer)
