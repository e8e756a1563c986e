"""Whole-volume time travel, read side: the history window Litestream holds, and read-only
browse mounts of a past second beside the live volume. The rollback is fsm.rollback; restoring
a point is fsm.pointintime; the facts behind the rules are in docs/time-travel.md.

`juicefs gc --delete` against a metadata copy deletes the live volume's newer objects, so gc
runs only against the primary, and never while another read-write mount of the volume exists
or a browse mount is open (`collect_garbage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from .checkpoints import Operation
from .config import Config
from .copies import Copies, writable_mounts
from .errors import (
    BrowseNotFound,
    FsmError,
    HistoryOff,
    OutsideWindow,
    TimeTravelError,
    ToolError,
    UnsafeMetadataCopy,
)
from .juicefs import JuiceFSTool, lazy_unmount, mount_fstype, read_format
from .litestream import LitestreamTool
from .logs import ms_since
from .metaengine import TIME_TRAVEL_REFUSED
from .pointintime import PointInTime, valid_subpath
from .proc import Child
from .timepoints import (
    RestoreWindow,
    history_on,
    iso,
    parse_time,
    stamp,
    trash_days_needed,
    utc_now,
)


@dataclass
class TravelOp(Operation):
    """A browse/unbrowse/rollback request handed to the chart (see checkpoints.Operation)."""

    at: datetime | None = None
    target: str = ""

    failure: ClassVar[type[FsmError]] = TimeTravelError


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


class TimeTravel:
    """Time travel for one controller. Browse mounts are owned children: `close_all()` runs at
    every stop. `recover_rollback(subpath)` (fsm.rollback) runs at every start."""

    def __init__(self, config: Config, juicefs: JuiceFSTool, litestream: LitestreamTool,
                 point: PointInTime, copies: Copies, replicating: Callable[[], bool],
                 recover_rollback: Callable[[str], None], log: Any) -> None:
        self.cfg = config
        self.layout = config.layout
        self.juicefs = juicefs
        self.litestream = litestream
        self.point = point
        self.copies = copies
        self.replicating = replicating
        self.recover_rollback = recover_rollback
        self.log = log.bind(component="time_travel")
        self._browses: dict[str, Browse] = {}

    # ---- checks ------------------------------------------------------------------------

    def require_enabled(self, what: str) -> None:
        if self.cfg.meta_url:
            raise HistoryOff(f"cannot {what}: {TIME_TRAVEL_REFUSED}")
        if not history_on(self.cfg):
            raise HistoryOff(
                f"cannot {what}: time travel is off (history_hours = 0). Turn it on by setting "
                f"history_hours to the hours of history to keep, e.g. FSM_HISTORY_HOURS=24, "
                f"`juicefs-fsm run --history-hours 24`, or `history_hours = 24` in the --config "
                f"file, and restart; the history starts then (see docs/time-travel.md)")

    def refuse_while_browsing(self, what: str) -> None:
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
        pointer = await self.point.read_pointer()
        subpath = valid_subpath(str(pointer.get("replica", ""))) if pointer else ""
        await asyncio.to_thread(self.recover_rollback, subpath)
        self.litestream.replica_subpath = subpath
        if subpath:
            self.log.info("replica_path", replica=self.litestream.replica_location)

    async def ensure_trash_days(self) -> None:
        """Deleted data must outlive the window: raise trash-days on an existing volume."""
        need = trash_days_needed(self.cfg)
        if not need:
            return
        fmt = self.juicefs.read_format() or {}
        have = int(fmt.get("TrashDays", 1))
        if have < need:
            await self.juicefs.set_trash_days(need)
            self.log.info("trash_days_raised", before=have, after=need,
                          history_hours=self.cfg.history_hours)

    async def _clear_leftovers(self) -> None:
        for mp in children_of(self.layout.history_dir):
            if mount_fstype(mp) is not None:
                # A crashed run's browse mount: its juicefs may still serve it.
                self.log.warning("browse_leftover_unmounted", mount_point=str(mp))
                with contextlib.suppress(ToolError):
                    await self.juicefs.umount_at(mp)
                if mount_fstype(mp) is not None:
                    await lazy_unmount(mp, self.log)
            with contextlib.suppress(OSError):
                mp.rmdir()
        for work in children_of(self.layout.time_travel_dir):
            if work.name.startswith("browse-"):
                await asyncio.to_thread(remove_tree, work, self.log)

    # ---- the window --------------------------------------------------------------------

    async def restore_points(self) -> RestoreWindow:
        self.require_enabled("list restore points")
        await self.sync()
        return await self.point.window()

    async def sync(self) -> None:
        # The replica gets the latest transactions (a few ms), so "now" restores now.
        if self.replicating():
            await self.litestream.sync()

    # ---- browse ------------------------------------------------------------------------

    def browsing(self) -> list[Browse]:
        return sorted(self._browses.values(), key=lambda b: b.at)

    def process_groups(self) -> list[int]:
        return [b.child.pid for b in self._browses.values() if b.child.pid is not None]

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
        await self.sync()
        (await self.point.window()).check(at)
        work = self.layout.time_travel_dir / f"browse-{key}"
        mp = self.layout.history_dir / key
        await asyncio.to_thread(fresh_dir, work)
        try:
            restored = await self.point.restore_checked(at, work / "metadata.db")
            mp.mkdir(parents=True, exist_ok=True)
            child = await self.copies.mount(restored.db, mp, work / "cache")
        except BaseException:
            await asyncio.to_thread(remove_tree, work, self.log)
            with contextlib.suppress(OSError):
                mp.rmdir()
            raise
        browse = Browse(at, restored.state_at, restored.txid, mp, work, child)
        self._browses[key] = browse
        self.log.info("browse_opened", at=iso(at), mount_point=str(mp), pid=child.pid,
                      txid=restored.txid, duration_ms=ms_since(started))
        return browse

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
        problems = await self.copies.unmount(browse.child, browse.mount_point, force=force)
        self._browses.pop(browse.key, None)
        if not problems:
            await asyncio.to_thread(remove_tree, browse.workdir, self.log)
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

    # ---- garbage collection ------------------------------------------------------------

    async def collect_garbage(self, db: Path) -> str:
        """`juicefs gc --delete` against `db`, which must be the primary metadata; refused
        while any other read-write mount of this volume exists or a browse mount is open."""
        primary = self.layout.metadata_db
        if not same_file(db, primary):
            raise UnsafeMetadataCopy(
                f"gc refused: {db} is not the primary metadata ({primary}); gc against a copy "
                f"deletes every object only the live volume references")
        self.refuse_while_browsing("collect garbage")
        others = await writable_mounts(self.uuid(), exclude=self.layout.mount_point)
        if others:
            raise UnsafeMetadataCopy(
                f"gc refused: this volume is also mounted read-write at "
                f"{', '.join(map(str, others))}; another writer's new objects would look leaked")
        return str(await self.point.s3_step("gc", self.juicefs.gc_primary))

    def uuid(self) -> str:
        fmt = read_format(self.layout.metadata_db) or {}
        return str(fmt.get("UUID", ""))


# ---- small helpers --------------------------------------------------------------------------

def same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700)


def remove_tree(path: Path, log: Any) -> None:
    if not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("remove_failed", path=str(path), error=str(exc))


def children_of(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder))
    except FileNotFoundError:
        return []


def names_in(folder: Path) -> list[str]:
    return [p.name for p in children_of(folder)]

