"""The stop sequence (chart states `stopping`, `failed`, and a rollback's stop of the live
volume): close browse mounts, upload writeback data, unmount flushing, replicate the last
transactions, stop litestream. Each step is bounded, and `hurry()` (a second SIGTERM) cuts the
waits short. Returns what it could not do; it never raises for a child that will not go.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import s3
from .children import Children, best_effort
from .config import Config
from .errors import FsmError, S3Unavailable, ToolError
from .juicefs import JuiceFSTool, remove_handover_files, staged_blocks
from .litestream import LitestreamTool
from .logs import ms_since
from .proc import Child, holders, named

MOUNT_EXIT_GRACE = 10.0
# A busy mount point gets this long to be left before the force unmount (DESIGN: a bounded
# wait before force/lazy).
BUSY_WAIT = 5.0
BUSY_RETRY = 0.25
# After hurry(): how long a child gets between SIGTERM and SIGKILL.
HURRIED_GRACE = 2.0
# How long the remounted juicefs may report nothing staged while the disk still holds blocks.
ZERO_SETTLE = 1.0
# What juicefs says when it writes out its buffers at exit (vfs FlushAll).
_FLUSHED = re.compile(r"flush buffered data in \S+: (.*?) \[FlushAll")
_NO_SPACE = re.compile(r"no space left on device", re.IGNORECASE)
# A stop during an S3 outage: how long the bucket check, the plain unmount and litestream get.
OFFLINE_CHECK = 3.0
OFFLINE_UNMOUNT = 30.0
OFFLINE_GRACE = 2.0


class Browses(Protocol):
    """The browse mounts a stop closes first (fsm.history.TimeTravel)."""

    async def close_all(self) -> list[str]: ...


class Shutdown:
    def __init__(self, config: Config, juicefs: JuiceFSTool, litestream: LitestreamTool,
                 children: Children, browses: Browses, report: Callable[[str], None],
                 log: Any) -> None:
        self.config = config
        self.layout = config.layout
        self.juicefs = juicefs
        self.litestream = litestream
        self.children = children
        self.browses = browses
        self.report = report
        self.log = log
        self.hurried = asyncio.Event()
        self.offline = False
        self.flush_incomplete = False
        self.unflushed_because = ""
        self._said_before: set[str] = set()  # the mount's stderr tail when the stop began
        # Set by the fence (the lease is lost): nothing of ours may reach the bucket any more.
        self.fenced = False
        # Writes that stayed on this machine (staged blocks, unreplicated metadata), said or
        # not (a hurried stop asked for it): never a clean hand-over of the lease.
        self.data_left = False
        self.still_mounted = False
        self.left_behind = False  # something of ours still mounted or running after teardown

    async def teardown(self) -> list[str]:
        """Unmount (flushing writeback data), then stop litestream (its final sync). Returns
        what it could not do: something left mounted or running, or data that may not be in
        the bucket (the mount killed, the flush unfinished, S3 unreachable)."""
        await self.children.unwind_actions()
        await self.children.cancel_watchers()
        self.left_behind = True  # until shown otherwise below
        self.flush_incomplete, self.unflushed_because, self.data_left = False, "", False
        mount = self.children.mount
        self._said_before = set(mount.stderr_tail(40).splitlines()) if mount else set()
        problems = await self.browses.close_all()  # browse mounts: owned children too
        if self.fenced and self.children.mount is not None:
            # Its processes were SIGKILLed: requests programs have in flight would wait for
            # an answer that never comes. Aborting the connection fails them (ENOTCONN).
            await self.juicefs.abort_connection()
        self.offline = self.fenced or await self._s3_unreachable()
        problems += await self._unmount()
        replicator = self.children.replicator
        if replicator is not None and not replicator.running and not self.fenced and \
                not self.config.local_mode:
            self.data_left = True  # it died before its final sync: the last transactions
        if replicator is not None:
            if self.offline:
                self.data_left = True
                problems.append("the last metadata transactions stayed in "
                                f"{self.layout.metadata_db} (S3 unreachable or the lease lost); "
                                f"the next start here replicates them")
                # litestream's own final sync on SIGTERM cannot reach S3 either.
                rc = await self.stop_child(replicator, OFFLINE_GRACE)
            else:
                problems += await self._final_sync(replicator)
                rc = await self.stop_child(replicator, self.config.litestream_stop_timeout)
            self.log.info("litestream_stopped", pid=replicator.pid, rc=rc)
        self.left_behind = self.still_mounted or any(self.children.pids.values()) or \
            self.children.retired_running()
        return problems

    async def _s3_unreachable(self) -> bool:
        """A stop during an S3 outage must not sit out timeouts that cannot succeed (the
        flush's, litestream's sync): one quick bucket check decides (fsm.s3)."""
        if self.config.local_mode or self.children.mount is None:
            return False
        try:
            await s3.check_bucket(s3.target_of(self.config), timeout=OFFLINE_CHECK)
        except S3Unavailable as exc:
            self.log.warning("stop_s3_unreachable", error=str(exc),
                             effect="staged blocks and the last metadata stay on this machine")
            self.report("S3 is unreachable: stopping without uploading; what was written "
                        "stays on this machine")
            return True
        except FsmError as exc:  # refused (credentials changed?): the flush tries and says
            self.log.warning("stop_s3_check_failed", error=str(exc))
        return False

    # ---- the mount ----------------------------------------------------------------------

    async def _unmount(self) -> list[str]:
        mp = self.layout.mount_point
        mount = self.children.mount
        if mount is None:
            self.still_mounted = False
            return []  # never mounted: whatever is at data/ is not ours (fsm.leftovers)
        await self.juicefs.unstick(mount)  # else the stat below could hang forever
        problems: list[str] = []
        unmounted = self.juicefs.is_mounted()
        if unmounted:
            problems += await (self._offline_unmount() if self.offline
                               else self._graceful_unmount())
        mount = self.children.mount  # the flush remount may have replaced it
        # pid is None when stop came before the mount process was spawned.
        if mount is not None and mount.pid is not None:
            # A mount still coming up (stop during `mounting`) was not unmounted, so it will
            # not exit by itself: SIGTERM it at once instead of waiting out the grace.
            grace = MOUNT_EXIT_GRACE if unmounted else 0.0
            await self.unless_hurried(mount.exits_within(grace))
            if mount.running:
                rc = await self.stop_child(mount, MOUNT_EXIT_GRACE)
                if unmounted and rc == -signal.SIGKILL:
                    problems.append(
                        f"the juicefs mount (pid {mount.pid}) did not exit after the unmount "
                        f"and was killed: what it had not yet written to "
                        f"{self.layout.cache_dir}/*/rawstaging may be lost (is the cache "
                        f"disk full?)")
        if mount is not None and self.children.mount_served and not unmounted and \
                mount.returncode is not None:
            # It ended while serving (killed by the fence, or died): what it held is lost.
            problems.append(f"the juicefs mount (pid {mount.pid}) ended while serving (exit "
                            f"{mount.returncode}): what it held in memory is lost; blocks it "
                            f"had staged stay in {self.layout.cache_dir}/*/rawstaging")
        if mount is not None and mount.pid is not None:
            if not self.hurried.is_set():
                problems += self._accepted_written(mount, forced=bool(self.unflushed_because))
            problems += self._not_uploaded()
        for retired in self.children.retired_mounts:
            await self.stop_child(retired, MOUNT_EXIT_GRACE)  # normally exited already
        for supervisor in [*self.children.retired_mounts, *([mount] if mount else [])]:
            remove_handover_files(supervisor.pid)
        if self.juicefs.is_mounted() or self.juicefs.is_stale():
            await best_effort(self.juicefs.lazy_unmount(), self.log, "lazy_unmount")
        self.still_mounted = self.juicefs.is_mounted() or self.juicefs.is_stale()
        if self.still_mounted:
            return [*problems, f"{mp} is still mounted; run `umount -l {mp}`"]
        return problems

    async def _graceful_unmount(self) -> list[str]:
        started = time.monotonic()
        await self.unless_hurried(self._flush_writeback())
        try:
            if await self.unless_hurried(self._umount_flush()):
                self.log.info("unmounted", flush=True, duration_ms=ms_since(started))
                if self.flush_incomplete:  # what is left is counted once the mount is gone
                    self.unflushed_because = (f"the upload did not finish within flush_timeout "
                                              f"({self.config.flush_timeout:g} s)")
                return []
            self.log.warning("unmount_flush_skipped", reason="stop hurried")
            why = "the stop was hurried (a second signal)"
        except ToolError as exc:
            self.log.warning("unmount_flush_failed", error=str(exc))
            why = f"`juicefs umount --flush` failed ({exc.action}: {exc.returncode})"
        # Only after the bounded flush and busy wait: force ends the mount under programs still
        # inside (they get ENOTCONN; the mount flushes what it accepted, and exits). What is
        # then left unuploaded is counted on disk once the mount is gone (_not_uploaded).
        self.unflushed_because = why
        await best_effort(self.juicefs.force_unmount(), self.log, "unmount_force")
        return []

    def _accepted_written(self, mount: Child, *, forced: bool) -> list[str]:
        """At exit the mount writes out what it had accepted, and says so: `flush buffered
        data in ...: <nil>`. An error there, or a full disk under its writes (seen: writes
        that waited on a full cache disk, then a clean-looking unmount), or, after a forced
        unmount, no such line, means writes programs were told had succeeded may be lost."""
        tail = mount.stderr_tail(40)
        said = _FLUSHED.findall(tail)
        # Only what it said while stopping: a full disk earlier may have been freed since.
        during = "\n".join(line for line in tail.splitlines() if line not in self._said_before)
        full = _NO_SPACE.search(during)
        if not full and (said[-1] == "<nil>" if said else not forced):
            return []
        self.data_left = True
        what = (f"it reported {said[-1]!r}" if said and said[-1] != "<nil>" else
                f"it reported {full.group(0)!r}" if full else "it did not confirm it")
        how = f"force-unmounted ({self.unflushed_because})" if forced else "unmounted"
        return [f"the volume was {how} and the mount could not write out everything it had "
                f"accepted ({what}): recent writes may be lost; is the cache disk "
                f"({self.layout.cache_dir}) full?"]

    def _not_uploaded(self) -> list[str]:
        """A stop says what it could not upload: blocks still in rawstaging once the mount
        process is gone (after a clean `umount --flush` there are none)."""
        count, size, _oldest = staged_blocks(self.layout.cache_dir)
        if not count:
            return []
        self.data_left = True
        why = ("the lease was lost: fenced" if self.fenced else "S3 was unreachable"
               if self.offline else self.unflushed_because or "the flush did not finish")
        self.log.warning("stop_not_uploaded", blocks=count, bytes=size, reason=why)
        if self.hurried.is_set():
            return []  # asked for (hurry(): a second signal, exit 6), so not a failure
        return [f"{count} written blocks ({size / 2**20:.1f} MiB) were not uploaded ({why}): "
                f"they stay in {self.layout.cache_dir}/*/rawstaging, and the next start here "
                f"uploads them"]

    async def _offline_unmount(self) -> list[str]:
        """S3 is unreachable: unmount without waiting for uploads that cannot happen. The
        staged blocks stay in rawstaging, where the next mount finds and uploads them (they
        are counted once the mount is gone: _not_uploaded)."""
        try:
            await self.juicefs.umount(flush=False, timeout=OFFLINE_UNMOUNT)
        except ToolError as exc:
            self.log.warning("unmount_failed", error=str(exc))
            await best_effort(self.juicefs.force_unmount(), self.log, "unmount_force")
        self.log.warning("unmounted_offline")
        return []

    async def _umount_flush(self) -> None:
        """`juicefs umount --flush`. A busy mount point (a shell or program still inside) is
        retried for BUSY_WAIT seconds, naming the processes that hold it: a program finishing
        its writes then gets a clean unmount instead of the force fallback."""
        deadline = time.monotonic() + BUSY_WAIT
        for attempt in itertools.count():
            try:
                await self.juicefs.umount(flush=True, timeout=self.config.flush_timeout)
                return
            except ToolError as exc:
                if "busy" not in exc.stderr_tail or time.monotonic() >= deadline:
                    raise
                if attempt == 0:
                    inside = holders(self.layout.mount_point, self.children.process_groups())
                    self.log.warning("unmount_busy", wait_s=BUSY_WAIT, holders=inside)
                    self.report(f"{self.layout.mount_point} is in use by "
                                f"{named(inside, 'a program')}; unmounting it anyway in "
                                f"{BUSY_WAIT:g} s")
            await asyncio.sleep(BUSY_RETRY)

    async def _flush_writeback(self) -> None:
        """Upload staged blocks now instead of after upload_delay: `umount --flush` alone sits
        the delay out (about two minutes for 60 s). JuiceFS's seamless remount hands the FUSE
        session to a second `juicefs mount` with --upload-delay 0, which uploads every staged
        block at once. Any failure leaves the plain `umount --flush` to do the job."""
        old = self.children.mount
        if self.config.effective_upload_delay <= 0 or old is None or not old.running:
            return
        started = time.monotonic()
        new = self.juicefs.mount_child(upload_delay=0)
        try:
            await new.start()
            self.children.mount = new
            self.children.retired_mounts.append(old)
            self.children.remember()
            await self.juicefs.wait_taken_over(new, self.config.ready_timeout)
            self.log.info("flush_remounted", pid=new.pid, old_pid=old.pid,
                          duration_ms=ms_since(started))
            await self._wait_uploaded(started)
        except (FsmError, OSError) as exc:
            self.log.warning("flush_remount_failed", error=str(exc))
            if not new.running and old.running:
                self.children.mount = old
                self.children.retired_mounts = [
                    c for c in self.children.retired_mounts if c is not old] + [new]

    async def _wait_uploaded(self, started: float) -> None:
        """Until no block is staged (bounded by flush_timeout); progress as events."""
        last: dict[str, int] = {}
        logged = 0.0
        zero_since: float | None = None
        while True:
            left = await self.juicefs.staging()
            now = time.monotonic()
            done = left["blocks"] == 0 and left["writing"] == 0
            zero_since = (zero_since or now) if done else None
            if done and zero_since is not None and now - zero_since < ZERO_SETTLE:
                # The remounted juicefs scans its staging folder in the background: its first
                # readings may say 0 before the scan counted what is there. The disk says; a
                # file it will never upload (a leftover) costs ZERO_SETTLE, not flush_timeout.
                staged, _size, _oldest = await asyncio.to_thread(
                    staged_blocks, self.layout.cache_dir)
                done = staged == 0
            if done or (left != last and now - logged >= 0.5) or now - logged >= 5:
                self.log.info("flush_progress", blocks_left=left["blocks"],
                              bytes_left=left["bytes"], blocks_writing=left["writing"],
                              elapsed_ms=round((now - started) * 1000, 1))
                self.report(f"uploading writeback data: {left['blocks']} blocks "
                            f"({left['bytes'] / 2**20:.1f} MiB) left")
                last, logged = left, now
            if done:
                self.log.info("flush_done", duration_ms=round((now - started) * 1000, 1))
                return
            if now - started > self.config.flush_timeout:
                self.log.warning("flush_incomplete", blocks_left=left["blocks"],
                                 bytes_left=left["bytes"], timeout_s=self.config.flush_timeout)
                self.flush_incomplete = True
                return
            await asyncio.sleep(0.1)

    # ---- litestream ---------------------------------------------------------------------

    async def _final_sync(self, replicator: Child) -> list[str]:
        """Replicate the last transactions before litestream stops: its own final sync on
        SIGTERM was seen to upload nothing when it had run for less than a second."""
        if not replicator.running:
            return []
        started = time.monotonic()

        async def serving_then_sync() -> None:
            # Stopped during start, litestream may not serve its control socket yet.
            await self.litestream.wait_serving(replicator)
            await self.litestream.sync(timeout=self.config.litestream_stop_timeout)

        try:
            if await self.unless_hurried(serving_then_sync()):
                self.log.info("final_sync_done", duration_ms=ms_since(started))
            else:
                # litestream's own final sync on SIGTERM still runs, unconfirmed.
                self.log.warning("final_sync_skipped", reason="stop hurried")
                self.data_left = not self.config.local_mode
            return []
        except FsmError as exc:
            self.data_left = True
            self.log.warning("final_sync_failed", error=str(exc))
            return [f"the final metadata sync failed ({exc}); the local metadata.db has "
                    f"everything, start again to replicate it"]

    # ---- bounded waits ------------------------------------------------------------------

    async def stop_child(self, child: Child, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`, or after HURRIED_GRACE once hurried."""
        if await self.unless_hurried(child.terminate(timeout)):
            return child.returncode
        return await child.terminate(HURRIED_GRACE)

    async def unless_hurried(self, step: Awaitable[Any]) -> bool:
        """Await `step` (its errors propagate); cancel it if hurry() comes first.
        True when `step` finished."""
        task = asyncio.ensure_future(step)
        hurried = asyncio.ensure_future(self.hurried.wait())
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
