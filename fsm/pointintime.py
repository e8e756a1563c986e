"""Restore the metadata as it was at a point in time, check it, and make it the primary: shared
by the rollback (fsm.rollback) and by the takeover after an unclean machine loss.

The facts behind every rule are in docs/time-travel.md: a restored copy may reference objects
that are gone (checked with `juicefs fsck` before anything mounts), and its slice counter is
from the past (raised past every id the newer metadata handed out, so no object key is ever
written twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import s3
from .config import Config
from .errors import BrokenRestorePoint, OutsideWindow, TimeTravelError, ToolError, one_line
from .juicefs import JuiceFSTool
from .layout import Layout, control_key
from .litestream import LitestreamTool, write_private
from .proc import run
from .retry import with_s3
from .timepoints import SNAPSHOT_LEVEL, RestoreWindow, iso, state_time

POINTER = "CURRENT"
"""Which replica path holds the current history after a rollback (S3: `{volume}/fsm/CURRENT`,
local: `litestream/CURRENT`). Absent: the replica root itself."""
_SUBPATH = re.compile(r"(rollback|takeover)-\d+(-\d+)?")
_LOST = re.compile(r"(\d+) objects? (?:are|is) lost|(\d+) broken files?", re.IGNORECASE)
_NOT_AVAILABLE = re.compile(r"no matching backup|not available|no backup", re.IGNORECASE)


@dataclass(frozen=True)
class Restored:
    db: Path
    at: datetime
    txid: str
    state_at: datetime | None


class PointInTime:
    def __init__(self, config: Config, litestream: LitestreamTool, juicefs: JuiceFSTool,
                 log: Any) -> None:
        self.config = config
        self.litestream = litestream
        self.juicefs = juicefs
        self.log = log

    async def s3_step(self, what: str, step: Any) -> Any:
        return await with_s3(self.config, self.log, what, step)

    async def window(self) -> RestoreWindow:
        files = await self.s3_step("history listing", self.litestream.ltx_files)
        return RestoreWindow.from_ltx(files, replica=self.litestream.replica_location,
                                      history_hours=self.config.history_hours)

    async def restore_checked(self, at: datetime, db: Path, *,
                              txid: str | None = None) -> Restored:
        """Restore the metadata as it was at `at` (or, given `txid`, up to that transaction)
        into `db` (a new file, owner-only) and check with fsck that every object it references
        exists. Refused before anything mounts."""
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        when = iso(at) if txid is None else f"transaction {txid}"
        litestream = self.litestream

        def restore(dry_run: bool) -> Any:
            if txid is None:
                return litestream.restore_to(db, iso(at), dry_run=dry_run)
            return self._restore_txid(db, txid, dry_run)

        try:
            plan = await self.s3_step("restore plan", lambda: restore(True))
            summary = await self.s3_step("point-in-time restore", lambda: restore(False))
        except ToolError as exc:
            if _NOT_AVAILABLE.search(exc.stderr_tail):
                raise OutsideWindow(f"no restore point at or before {when} in the replica "
                                    f"({litestream.replica_location}); `juicefs-fsm history` "
                                    f"shows the window") from exc
            raise
        os.chmod(db, 0o600)  # the format in it holds the bucket's credentials
        if not starts_complete(plan):
            raise OutsideWindow(f"the replica has no complete history up to {when} (no "
                                f"snapshot before it); `juicefs-fsm history` shows the window")
        txid = str(summary.get("txid") or "")
        if txid != str(plan.get("max_txid") or txid):
            raise TimeTravelError(f"litestream restored transaction {txid} for {when}, but "
                                  f"planned {plan.get('max_txid')}; nothing was mounted")
        await self.fsck(db, when)
        restored = Restored(db, at, txid, state_time(plan))
        self.log.info("metadata_restored_at", at=when, txid=txid, db=str(db),
                      state_at=iso(restored.state_at) if restored.state_at else None)
        return restored

    async def _restore_txid(self, db: Path, txid: str, dry_run: bool) -> dict[str, Any]:
        """`litestream restore -txid` (the adapter restores by time only): the state right
        after one transaction, finer than the whole seconds the replica's listing gives."""
        lt = self.litestream
        argv = [lt.bin, "restore", "-config", str(lt.layout.litestream_config), "-json",
                "-txid", txid, "-o", str(db), *(["-dry-run"] if dry_run else []),
                str(lt.layout.metadata_db)]
        done = await run("litestream", "restore (transaction)", argv, env=lt.env, log=self.log,
                         secrets=lt.secrets, timeout=600)
        summary = json.loads(done.stdout) if done.stdout.strip() else {}
        return summary if isinstance(summary, dict) else {}

    async def fsck(self, db: Path, when: str) -> None:
        try:
            await self.s3_step("fsck", lambda: self.juicefs.fsck(db))
        except ToolError as exc:
            if not lost_objects(exc.stderr_tail):
                raise
            raise BrokenRestorePoint(
                f"the volume as it was at {when} cannot be used: `juicefs fsck` finds data "
                f"missing ({one_line(exc.stderr_tail)}). Its objects are gone (deleted longer "
                f"than trash-days ago, written while history was off, or, less than "
                f"upload_delay ago, still waiting for upload). Choose another time; "
                f"`juicefs-fsm history` shows the window") from exc

    # ---- the replica pointer -------------------------------------------------------------

    async def read_pointer(self) -> dict[str, Any] | None:
        if self.config.local_mode:
            try:
                text: str | None = (self.config.layout.litestream_replica_dir / POINTER
                                    ).read_text()
            except FileNotFoundError:
                return None
        else:
            key = control_key(self.config.volume_name, POINTER)
            target = s3.target_of(self.config)
            text = await self.s3_step("replica pointer read", lambda: s3.get_text(target, key))
        if text is None:
            return None
        value = json.loads(text)
        return value if isinstance(value, dict) else None

    async def write_pointer(self, value: dict[str, Any]) -> None:
        text = json.dumps(value)
        if self.config.local_mode:
            write_private(self.config.layout.litestream_replica_dir / POINTER, text)
            return
        key = control_key(self.config.volume_name, POINTER)
        target = s3.target_of(self.config)
        await self.s3_step("replica pointer write", lambda: s3.put_text(target, key, text))


def valid_subpath(value: str) -> str:
    if value and not _SUBPATH.fullmatch(value):
        raise TimeTravelError(f"the replica pointer names {value!r}, which is not a replica "
                              f"path juicefs-fsm writes (rollback-<unix>, takeover-<unix>); "
                              f"check {POINTER}")
    return value


def lost_objects(report: str) -> bool:
    """`juicefs fsck` output says objects are lost or files broken."""
    return bool(_LOST.findall(report))


def starts_complete(plan: dict[str, Any]) -> bool:
    """A plan rebuilds the whole database: it starts from a snapshot or the first
    transaction (litestream applies the files on top of an empty database otherwise)."""
    files = plan.get("files") or []
    return any(int(f["level"]) == SNAPSHOT_LEVEL or int(str(f["min_txid"]), 16) == 1
               for f in files)


def bump_slice_counter(restored: Path, previous: Path) -> None:
    """Slice ids name the objects (chunks/<id>_<index>_<size>). The restored copy's counter is
    from the past: raise it past every id the abandoned future handed out, so the restored
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


def swap_in(layout: Layout, restored_db: Path, previous: Path) -> None:
    """Make `restored_db` the primary metadata; the current files move to `previous`."""
    previous.mkdir(mode=0o700)
    for path in s3.metadata_files(layout):
        os.rename(path, previous / path.name)
    db = layout.metadata_db
    bump_slice_counter(restored_db, previous / db.name)
    os.rename(restored_db, db)
    s3.make_private(layout)


def put_back(layout: Layout, work: Path) -> None:
    """Undo swap_in: the previous files return, the restored ones go to discarded/."""
    previous = work / "previous"
    if not (previous / layout.metadata_db.name).exists():
        return  # the swap never happened
    discarded = work / "discarded"
    discarded.mkdir(mode=0o700, exist_ok=True)
    for path in s3.metadata_files(layout):
        os.rename(path, discarded / path.name)
    for path in previous.iterdir():
        os.rename(path, layout.base_dir / path.name)

