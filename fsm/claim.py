"""Taking the volume (chart state `acquiring_lease`): this base_dir's lock on every start, and in
S3 mode with SQLite metadata the bucket's single-writer lease (fsm.lease), then what the lease
says about the local files.

- "own" (this machine and base_dir held it last) or "fresh" (no lease yet): the local
  metadata.db and staged blocks are the newest truth and are used.
- another holder before us ("clean" hand-over or "takeover" after an unclean loss): the local
  metadata.db and `cache/*/rawstaging` are superseded. They are set aside under
  `set-aside/`, never uploaded: their slice ids may already belong to someone else.
- "takeover": the previous holder did not release the lease. The next step (`taking_over`,
  fsm.takeover) restores the replica to the holder's last watermark, the newest point whose
  blocks are all in the bucket.

While held, the lease is refreshed with the current watermark; a lost lease sends `lease_lost`
and the chart fences the volume (fsm.controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import s3
from .children import Send
from .config import Config
from .errors import FsmError, LeaseLost
from .juicefs import read_format, staged_blocks
from .layout import replica_prefix
from .lease import Acquired, Lease
from .litestream import write_private
from .retry import with_s3
from .timepoints import iso

TAKEOVER_JOURNAL = "takeover.json"
# Staged blocks are named when written; one second of slack for the file times' resolution.
_WATERMARK_SLACK = timedelta(seconds=1)


class Claim:
    def __init__(self, config: Config, send: Send, log: Any,
                 lease_factory: Callable[[Config, Any], Lease] = Lease.for_config,
                 fence: Callable[[], object] = lambda: None) -> None:
        self.config = config
        self._fence = fence
        self.layout = config.layout
        self.send = send
        self.log = log
        self._factory = lease_factory
        self.lease: Lease | None = None
        self.acquired: Acquired | None = None
        # Set when the start must restore the replica to a watermark (fsm.takeover).
        self.takeover: dict[str, Any] | None = None
        # The local metadata and staged blocks are not the newest truth (another machine
        # held the volume since): never uploaded, set aside.
        self.superseded = False
        self._hold: asyncio.Task[None] | None = None
        # (wall time once the sync returned, replica txid, replica sub-path), oldest first.
        self._samples: deque[tuple[float, int, str]] = deque(maxlen=4096)
        self._sampler: asyncio.Task[None] | None = None
        self._released = False
        self._pending: dict[str, Any] = {}  # owed since the lease was taken (_owed)

    @property
    def previous_clean(self) -> bool:
        """The bucket held the whole volume when this machine took it: no lease, a new
        volume, or a clean hand-over (an own lease after an unclean stop is not)."""
        acquired = self.acquired
        return acquired is None or acquired.how in ("fresh", "clean")

    @property
    def uses_lease(self) -> bool:
        """S3 mode with SQLite metadata: one writer at a time. A local replica has its
        base_dir lock; a shared engine (meta_url) has many writers by design."""
        return not self.config.local_mode and not self.config.meta_url

    # ---- acquiring_lease -------------------------------------------------------------------

    async def acquire(self) -> None:
        if not self.uses_lease:
            return
        lease = self._factory(self.config, self.log)
        acquired = await with_s3(self.config, self.log, "lease", lambda: lease.acquire(
            wait=True, extra=self.extra(), pending=self._owed))
        self.lease, self.acquired = lease, acquired
        self._hold = asyncio.create_task(lease.hold(self._lost, extra=self.extra))
        self._pending = self._owed(acquired.how, acquired.previous, acquired.same_disk)
        # A takeover of ours that a crash interrupted: only while the lease stayed ours.
        journal = self._read_journal() if acquired.how == "own" else None
        self.superseded = bool(self._pending.get("superseded")) or journal is not None
        plan = journal or self._pending.get("takeover")
        if plan is not None and journal is None and not await self._anything_replicated():
            # The holder died before litestream's first upload: there is no metadata to take
            # over (nothing it wrote is reachable); the start restores nothing and formats.
            self.log.warning("takeover_nothing_replicated",
                             replica=replica_prefix(self.config.volume_name))
            self._pending.pop("takeover", None)
            plan = None
        self.takeover = plan
        if plan is not None:
            self.log.warning("takeover_planned", **plan)

    def _owed(self, how: str, previous: dict[str, Any] | None,
              same_disk: bool) -> dict[str, Any]:
        """What taking the lease this way obliges this machine to do, recorded in the lease
        with the take itself (a crash before it is done leaves it owed, and the next start
        here, re-taking its own lease, does it): set the local files aside when another
        machine held the volume since; take over at its watermark after an unclean loss."""
        if previous is None:
            return {}
        if same_disk:  # ours before: still owed whatever our last start did not finish
            return dict((previous.get("extra") or {}).get("pending") or {})
        owed: dict[str, Any] = {"superseded": True}
        if how == "takeover":
            extra = previous.get("extra") or {}
            owed["takeover"] = {
                "watermark": extra.get("watermark") or previous.get("since"),
                "watermark_txid": extra.get("watermark_txid"),
                "watermark_replica": extra.get("watermark_replica"),
                "holder": {k: previous.get(k) for k in ("host", "pid", "base_dir", "since")},
                "source_subpath": None}
        return owed

    async def _anything_replicated(self) -> bool:
        bucket = s3.Bucket(s3.target_of(self.config), timeout=10.0)
        prefix = replica_prefix(self.config.volume_name) + "/"
        return bool(await with_s3(self.config, self.log, "replica check",
                                  lambda: bucket.any_key(prefix)))

    async def settle_local(self) -> None:
        """After what a dead controller left is cleared (without uploading, when superseded:
        fsm.leftovers): set the superseded local files aside."""
        if self.superseded:
            await asyncio.to_thread(self._set_aside_local)
            self._pending.pop("superseded", None)

    async def _lost(self, reason: str) -> None:
        # Fence first, here: the chart may be busy with a long step (a delete runs inside its
        # transition) and would only act on the event after it; the deadline does not wait.
        self._fence()
        await self.send("lease_lost", error=LeaseLost(
            f"this machine lost the lease on volume {self.config.volume_name!r} ({reason}); "
            f"fenced: the mount and litestream were stopped so that nothing more is written"))

    def _set_aside_local(self) -> None:
        """The local metadata and staged blocks are not the volume's newest state: another
        machine held it since. Kept for salvage under set-aside/, never used or uploaded."""
        fmt = read_format(self.layout.metadata_db)
        if fmt is not None and not (fmt.get("Name") == self.config.volume_name and
                                    s3.same_bucket(str(fmt.get("Bucket", "")),
                                                   self.config.bucket_url)):
            return  # another volume's files: not superseded (fsm.s3.keep_or_set_aside)
        # Staged blocks are kept per volume UUID: only this volume's are superseded.
        uuid = fmt.get("UUID") if fmt else None
        files = s3.metadata_files(self.layout)
        staged = [p for p in self.layout.cache_dir.glob("*/rawstaging")
                  if p.is_dir() and uuid in (None, p.parent.name)]
        if not files and not staged:
            return
        folder = s3.set_aside(self.layout)
        for path in staged:
            shutil.move(str(path), str(folder / f"rawstaging-{path.parent.name}"))
        if self.journal_path.exists() and self.acquired and self.acquired.how != "own":
            # An old takeover of ours, overtaken by another machine's tenure: not to be redone.
            shutil.move(str(self.journal_path), str(folder / TAKEOVER_JOURNAL))
        self.log.warning("superseded_set_aside", moved_to=str(folder),
                         files=[p.name for p in files], rawstaging=[str(p) for p in staged],
                         reason="another machine held the volume since this one")

    # ---- the watermark ---------------------------------------------------------------------

    def extra(self) -> dict[str, Any]:
        """What each refresh records for a successor: the watermark as a time, and, exact,
        as the replica's transaction (hex) on the replica path it belongs to. A sample of
        the replica's transaction taken before the oldest block still staged was made has
        only transactions that reference uploaded blocks (each committed after its blocks
        were staged; none of those is staged any more)."""
        at = watermark(self.layout.cache_dir)
        value: dict[str, Any] = {"watermark": iso(at)}
        if self._pending:
            value["pending"] = self._pending
        # No slack here: a file's time is the kernel's coarse clock, never later than the
        # write, so a block staged after a sample can only look older (a sample left out).
        _count, _size, oldest = staged_blocks(self.layout.cache_dir)
        cutoff = oldest if oldest is not None else datetime.now(timezone.utc).timestamp()
        done = [(txid, path) for taken, txid, path in self._samples if taken < cutoff]
        if done:
            txid, path = done[-1]
            value.update(watermark_txid=f"{txid:016x}", watermark_replica=path)
        return value

    async def after_mount(self, sync: Callable[[], Awaitable[str]], subpath: str) -> None:
        """Sample the replica's transaction now (before the first write of this mount) and
        every third of lease_ttl while it is held (fsm.startup calls this once mounted)."""
        if self.lease is None:
            return
        await self._stop_sampling()
        self._samples.clear()
        await self._sample(sync, subpath)  # before ready: before any write of this mount
        self._sampler = asyncio.create_task(self._sample_forever(sync, subpath))

    async def _sample_forever(self, sync: Callable[[], Awaitable[str]], subpath: str) -> None:
        """The first sample recorded in the lease at once, off the start's path (not at the
        next refresh: a machine lost before that is then taken over exactly at the mount);
        then a sample every third of lease_ttl."""
        lease = self.lease
        assert lease is not None
        try:
            await lease.refresh(extra=self.extra())
        except FsmError as exc:  # the holding loop retries before its deadline
            self.log.warning("lease_refresh_failed", error=str(exc))
        while True:
            await asyncio.sleep(self.config.lease_ttl / 3)
            await self._sample(sync, subpath)

    async def _sample(self, sync: Callable[[], Awaitable[str]], subpath: str) -> None:
        try:
            txid = int(await sync())  # litestream's JSON integer, as decimal text
        except (FsmError, ValueError) as exc:
            self.log.warning("watermark_sample_failed", error=str(exc))
            return
        # After the sync returned: every transaction up to txid committed before this time
        # (one committed between the call and now would otherwise slip past the check).
        taken = datetime.now(timezone.utc).timestamp()
        self._samples.append((taken, txid, subpath))

    async def _stop_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None

    # ---- the takeover journal (fsm.takeover writes it) -------------------------------------

    @property
    def journal_path(self) -> Path:
        return self.layout.base_dir / TAKEOVER_JOURNAL

    def write_journal(self, value: dict[str, Any]) -> None:
        write_private(self.journal_path, json.dumps(value))

    def _read_journal(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.journal_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            self.log.warning("takeover_journal_unreadable", path=str(self.journal_path))
            return None
        return value if isinstance(value, dict) else None

    def takeover_done(self) -> None:
        self._pending.pop("takeover", None)  # no longer owed from the next refresh on
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()

    # ---- stop ------------------------------------------------------------------------------

    async def release(self, clean: bool) -> None:
        """A clean release (everything flushed and replicated) lets the next machine start at
        once; otherwise the lease is left to run out (the next machine waits, then takes the
        volume over to the last watermark)."""
        lease = self.lease
        if lease is None or self._released:
            return  # once: a stop after a failure must not turn its unclean release clean
        self._released = True
        await self._stop_sampling()
        try:
            await lease.release(clean, extra=self.extra() if clean else None)
        finally:
            await self._stop_holding()

    async def _stop_holding(self) -> None:
        if self._hold is not None and self._hold is not asyncio.current_task():
            self._hold.cancel()
            await asyncio.gather(self._hold, return_exceptions=True)
        self._hold = None

    def status(self) -> dict[str, Any] | None:
        if self.lease is None:
            return None
        acquired = self.acquired
        return {**self.lease.status(),
                "how": acquired.how if acquired else None,
                "waited_s": acquired.waited_s if acquired else None}


def watermark(cache_dir: Path) -> datetime:
    """The newest time up to which every block the metadata references is in the bucket:
    a block is staged before the transaction that references it commits, so every transaction
    older than the oldest block still staged references uploaded blocks only. Now, when nothing
    is staged. The holder's own clock, the clock litestream stamps the replica with."""
    now = datetime.now(timezone.utc)
    _count, _size, oldest = staged_blocks(cache_dir)
    if oldest is None:
        return now
    return min(now, datetime.fromtimestamp(oldest, timezone.utc) - _WATERMARK_SLACK)
