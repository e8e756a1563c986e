"""Taking a volume over after an unclean machine loss (chart state `taking_over`).

The previous holder did not release the lease: its last metadata may reference blocks that
were only in its own `rawstaging` (they run `upload_delay` behind the replica). Reading such a
file would hang or fail. So the successor starts from the holder's last watermark (fsm.claim),
the newest point whose blocks are all in the bucket:

1. restore the replica's latest state (kept under set-aside/ for salvage; its slice counter is
   the highest id the lost machine handed out) and its state at the watermark;
2. raise the watermark copy's slice counter past the latest one (never reuse an object key),
   check it with `juicefs fsck` (every object it references exists);
3. record the new replica path (`takeover-<unix>`) in the pointer, then make the copy the
   local metadata.db: litestream replicates it there (the old path keeps the lost history).
A journal (`{base_dir}/takeover.json`) makes a crash in between redo the takeover.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from . import s3
from .checkpoints import unique
from .claim import Claim
from .config import Config
from .errors import BrokenRestorePoint, OutsideWindow
from .history import fresh_dir, names_in, remove_tree
from .litestream import LitestreamTool
from .logs import ms_since
from .pointintime import PointInTime, bump_slice_counter
from .timepoints import SNAPSHOT_LEVEL, iso, parse_time, state_time, utc_now


class Takeover:
    def __init__(self, config: Config, litestream: LitestreamTool, point: PointInTime,
                 claim: Claim, log: Any) -> None:
        self.config = config
        self.layout = config.layout
        self.litestream = litestream
        self.point = point
        self.claim = claim
        self.log = log
        self.report: dict[str, Any] | None = None
        self._latest_txid = self._restored_txid = ""

    async def run(self) -> None:
        plan = self.claim.takeover
        assert plan is not None
        started = time.monotonic()
        source = plan.get("source_subpath")
        if source is None:
            source = self.litestream.replica_subpath
            plan = {**plan, "source_subpath": source,
                    "new_subpath": unique(f"takeover-{int(time.time())}",
                                          set(names_in(self.layout.time_travel_dir)))}
            self.claim.write_journal(plan)
        self.litestream.replica_subpath = source
        self.litestream.write_config()
        work = self.layout.time_travel_dir / str(plan["new_subpath"])
        await asyncio.to_thread(fresh_dir, work)
        latest, latest_at = await self._latest(work / "latest.db")
        at = self._watermark(plan)
        # Exact when the holder sampled the replica's transaction on this replica path.
        txid = plan.get("watermark_txid") if plan.get("watermark_replica") == source else None
        try:
            db, state_at = await self._at_watermark(at, work, latest, latest_at, txid)
        except BrokenRestorePoint as exc:
            holder = plan.get("holder") or {}
            raise BrokenRestorePoint(
                f"cannot take volume {self.config.volume_name!r} over from {holder.get('host')} "
                f"(pid {holder.get('pid')}): no state of its replica at or before its last "
                f"watermark ({iso(at)}) has all its data in the bucket ({exc}). Its newest "
                f"blocks are still on that machine's disk: start the volume there again (it "
                f"re-takes its own lease and uploads them), then here") from exc
        if db != latest:
            await asyncio.to_thread(bump_slice_counter, db, latest)
        await self.point.write_pointer({
            "replica": plan["new_subpath"], "previous": source, "taken_over_at": iso(utc_now()),
            "from": plan.get("holder"), "watermark": iso(at),
            "state_at": iso(state_at) if state_at else None})
        self.litestream.replica_subpath = str(plan["new_subpath"])
        self.litestream.write_config()
        await asyncio.to_thread(self._swap_in, db, latest, work)
        self.claim.takeover_done()
        self.report = {
            "from": plan.get("holder"), "watermark": iso(at),
            "state_at": iso(state_at) if state_at else None,
            "latest_state_at": iso(latest_at) if latest_at else None,
            "lost_s": (round((latest_at - state_at).total_seconds(), 1)
                       if latest_at and state_at and latest_at > state_at else 0.0),
            # Litestream stamps whole seconds: the transactions say what was lost exactly.
            "lost_transactions": _txid(self._latest_txid) - _txid(self._restored_txid),
            "replica": self.litestream.replica_location,
            "duration_ms": ms_since(started)}
        self.log.warning("takeover_done", **self.report)

    async def _at_watermark(self, at: datetime, work: Path, latest: Path,
                            latest_at: datetime | None,
                            txid: str | None) -> tuple[Path, datetime | None]:
        if txid:
            try:
                restored = await self.point.restore_checked(
                    at, work / "restored" / "metadata.db", txid=str(txid))
            except OutsideWindow:  # that transaction's files are gone: by time, below
                self.log.warning("takeover_watermark_txid_unavailable", txid=txid)
            else:
                self._restored_txid = restored.txid
                return restored.db, restored.state_at
        # Litestream stamps its files in whole seconds: a file stamped s holds transactions up
        # to s + 1. Restoring to the second before the watermark's takes only files whose
        # every transaction is older than the watermark.
        safe = at.replace(microsecond=0) - timedelta(seconds=1)
        try:
            restored = await self.point.restore_checked(safe, work / "restored" / "metadata.db")
        except OutsideWindow:
            # The watermark predates every restore point left (the holder's first watermark
            # is taken before it formats a new volume): the oldest point, if fsck finds all
            # its objects; the latest only when there is no oldest to try.
            self.log.warning("takeover_watermark_unavailable", watermark=iso(at))
            return await self._oldest(work / "oldest" / "metadata.db", latest, latest_at, safe)
        self._restored_txid = restored.txid
        return restored.db, restored.state_at

    async def _latest(self, db: Path) -> tuple[Path, datetime | None]:
        # A time in the future restores the newest state the replica holds.
        when = iso(utc_now() + timedelta(days=1))
        plan = await self.point.s3_step(
            "takeover: latest plan", lambda: self.litestream.restore_to(db, when, dry_run=True))
        await self.point.s3_step("takeover: latest restore",
                                 lambda: self.litestream.restore_to(db, when))
        os.chmod(db, 0o600)
        self._latest_txid = str(plan.get("max_txid") or "")
        self._restored_txid = self._latest_txid  # until a point before it is restored
        return db, state_time(plan)

    async def _oldest(self, db: Path, latest: Path, latest_at: datetime | None,
                      after: datetime) -> tuple[Path, datetime | None]:
        """No point of the replica is older than the watermark (litestream drops the older
        files when it snapshots at a start): the snapshot litestream took when the holder
        started, i.e. the first one after the watermark, which holds none of the holder's own
        writes (the start syncs the replica before the first write: fsm.startup), if fsck finds
        all its objects. By transaction: the listing's whole seconds are too coarse."""
        files = await self.point.s3_step("history listing", self.litestream.ltx_files)
        snapshots = sorted((f for f in files if int(f["level"]) == SNAPSHOT_LEVEL),
                           key=lambda f: (str(f["timestamp"]), int(str(f["max_txid"]), 16)))
        if not snapshots:
            await self.point.fsck(latest, "the latest replicated state")
            return latest, latest_at
        later = [f for f in snapshots if parse_time(str(f["timestamp"])) >= after]
        first = (later or snapshots)[0]
        restored = await self.point.restore_checked(
            parse_time(str(first["timestamp"])), db, txid=str(first["max_txid"]))
        self._restored_txid = restored.txid
        return restored.db, restored.state_at

    @staticmethod
    def _watermark(plan: dict[str, Any]) -> datetime:
        raw = plan.get("watermark")
        return parse_time(str(raw)) if raw else utc_now()

    def _swap_in(self, db: Path, latest: Path, work: Path) -> None:
        """The checked copy becomes metadata.db; the lost machine's latest metadata is kept."""
        folder = s3.set_aside(self.layout)  # what an interrupted takeover left, if anything
        if latest.exists() and latest != db:
            os.rename(latest, folder / "latest-before-takeover.db")
            self.log.info("takeover_latest_kept", path=str(folder))
        os.rename(db, self.layout.metadata_db)
        s3.make_private(self.layout)
        remove_tree(work, self.log)


def _txid(hex_txid: str) -> int:
    return int(hex_txid, 16) if hex_txid else 0
