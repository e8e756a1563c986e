"""The start steps, one per chart state: claim base_dir and restore the metadata
(`restoring_metadata`), format (`formatting`), start litestream (`replicating`), mount
(`mounting`). The chart (fsm.chart) decides the order; fsm.controller wires its actions here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from . import leftovers, metaengine, preflight, s3
from .children import Children, Send, together, unwound_before_teardown
from .config import Config
from .errors import ConfigError, MissingPrerequisite, MountLost, NoSpace
from .juicefs import JuiceFSTool
from .layout import LEGACY_REPLICA_PREFIX, control_key
from .litestream import LitestreamTool
from .proc import Child
from .replication import Replication
from .retry import with_s3

# The FUSE device (a module constant so a test can point it at a path that does not exist).
FUSE_DEVICE = "/dev/fuse"
# Less free space than this where metadata.db lives fails the start (docs/faults.md).
MIN_FREE_MIB = 16
# JuiceFS stops caching (and writes through to storage) below this free ratio of cache/.
CACHE_FREE_RATIO = 0.1


class History(Protocol):
    """What a start needs of time travel (fsm.history.TimeTravel)."""

    async def before_start(self) -> None: ...
    async def ensure_trash_days(self) -> None: ...


class Startup:
    def __init__(self, config: Config, juicefs: JuiceFSTool, litestream: LitestreamTool,
                 children: Children, replication: Replication, lock: leftovers.BaseDirLock,
                 history: History, send: Send, log: Any) -> None:
        self.config = config
        self.layout = config.layout
        self.juicefs = juicefs
        self.litestream = litestream
        self.children = children
        self.replication = replication
        self.lock = lock
        self.history = history
        self.send = send
        self.log = log
        self.created_base_dir = False
        self.after_mount: Callable[[Callable[[], Awaitable[str]], str], Awaitable[None]] | \
            None = None

    # ---- restoring_metadata ----------------------------------------------------------------

    @unwound_before_teardown
    async def restore_metadata(self) -> None:
        self.litestream.write_config()
        if not self.config.local_mode:
            # Fails fast on wrong credentials or a missing bucket; waits out an outage.
            await with_s3(self.config, self.log, "S3 bucket check", self._check_bucket,
                          check_first=False)
            if await asyncio.to_thread(s3.keep_or_set_aside, self.config, self.log):
                await asyncio.to_thread(s3.make_private, self.layout)
                return
            await self._check_legacy_layout()
        elif self.layout.metadata_db.exists():
            self.log.info("metadata_kept", db=str(self.layout.metadata_db),
                          reason="local metadata.db present")
            return
        restored = await with_s3(self.config, self.log, "metadata restore",
                                 self.litestream.restore)
        await asyncio.to_thread(s3.make_private, self.layout)
        self.log.info("metadata_restored" if restored else "metadata_replica_empty",
                      db=str(self.layout.metadata_db))

    async def _check_legacy_layout(self) -> None:
        """A bucket laid out by releases before the per-volume prefixes keeps the replica at
        juicefs-metadata/: never ignored (the volume would be formatted anew over its data),
        never moved unasked. Another volume's replica there is not ours: carry on."""
        cfg = self.config
        if not await with_s3(cfg, self.log, "legacy layout check",
                             lambda: s3.legacy_replica(cfg)):
            return
        fmt = await with_s3(cfg, self.log, "legacy replica read",
                            lambda: s3.legacy_format(cfg, self.log))
        if fmt is not None and fmt.get("Name") != cfg.volume_name:
            self.log.warning("legacy_replica_not_ours", volume=fmt.get("Name"),
                             uuid=fmt.get("UUID"), prefix=LEGACY_REPLICA_PREFIX)
            return
        raise s3.legacy_refusal(cfg, fmt)

    async def _check_bucket(self) -> None:
        await s3.check_bucket(s3.target_of(self.config))

    async def claim_base_dir(self) -> None:
        """Checks that refuse before anything is created (fsm.preflight), prerequisites, and
        this base_dir's lock."""
        await asyncio.to_thread(preflight.check_before_start, self.config)
        await asyncio.to_thread(self._claim_base_dir)

    async def prepare(self, *, superseded: bool = False) -> None:
        """What a controller that died left behind (fsm.leftovers: its mount is unmounted
        without uploading anything when another machine has held the volume since), then the
        directories and a free-space check."""
        await leftovers.clear(self.config, self.log, flush=not superseded)
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
        self.created_base_dir = not self.layout.base_dir.exists()
        self.layout.base_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()

    def undo_claim(self) -> None:
        """A start refused right after taking the lock (another machine holds the volume)
        leaves nothing behind: a base_dir this start created is removed again."""
        self.lock.release()
        if self.created_base_dir:
            shutil.rmtree(self.layout.base_dir, ignore_errors=True)

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
        if cache.free < cache.total * CACHE_FREE_RATIO:
            self.log.warning(
                "cache_space_low", cache_dir=str(self.layout.cache_dir),
                free_mib=round(cache.free / (1 << 20), 1),
                total_mib=round(cache.total / (1 << 20), 1),
                effect="JuiceFS will not cache and writes go straight to storage (slower)")

    # ---- formatting ------------------------------------------------------------------------

    def needs_format(self) -> bool:
        return self.juicefs.read_format() is None

    @unwound_before_teardown
    async def format_volume(self) -> None:
        if self.config.meta_url:
            # Machines starting together: exactly one formats, the others join. format_once
            # logs which (volume_formatted / volume_joined): one event per start.
            await metaengine.format_once(self.config, log=self.log)
            return
        if not self.config.local_mode:
            await self._refuse_existing_data()
        # juicefs stores the credentials in the format: create the db owner-only first.
        db = self.layout.metadata_db
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            await with_s3(self.config, self.log, "format", self.juicefs.format)
        except BaseException:
            if db.stat().st_size == 0:
                db.unlink()  # only the empty placeholder made above: nothing to keep
            raise
        await asyncio.to_thread(s3.make_private, self.layout)
        self.log.info("volume_formatted", volume=self.config.volume_name,
                      storage=self.config.mode)

    async def _refuse_existing_data(self) -> None:
        """Never format a new volume over one that exists: the replica answered "nothing to
        restore", yet objects under the volume's prefix (other than the controller's own keys)
        say a volume lived here. Formatting would start an empty tree over it (and its gc
        could later delete the old data)."""
        volume = self.config.volume_name
        keys = await with_s3(self.config, self.log, "bucket listing",
                             lambda: s3.Bucket(s3.target_of(self.config)).list_keys(
                                 f"{volume}/"))
        # Ours, and what a format that failed halfway may have written before.
        harmless = (control_key(volume, ""), f"{volume}/juicefs_uuid", f"{volume}/testing")
        found = sorted(k for k in keys if not k.startswith(harmless))
        if found:
            raise ConfigError(
                f"volume {volume!r} has no metadata replica to restore, but the bucket holds "
                f"its objects (e.g. {found[0]}): formatting would hide them. If its replica "
                f"was lost, recover the metadata first (juicefs load from a `juicefs dump` "
                f"backup); or use another volume_name")

    # ---- replicating -----------------------------------------------------------------------

    @unwound_before_teardown
    async def start_replication(self) -> None:
        # Time travel: deleted data must outlive the history window (no-op when it is off).
        await self.history.ensure_trash_days()
        await self.replication.spawn()
        # Its control socket takes litestream ~25 ms: mount_volume waits for it alongside the
        # mount (~70 ms) rather than before it (bench/, BENCHMARKS.md).

    # ---- mounting --------------------------------------------------------------------------

    # fsm.space.SpaceWatch, set by the controller: free space is watched while mounted.
    space: Any = None

    @unwound_before_teardown
    async def mount_volume(self) -> None:
        if self.juicefs.is_stale():
            self.log.warning("stale_mount_cleared", mount_point=str(self.layout.mount_point))
            await self.juicefs.lazy_unmount()
        child = self.juicefs.mount_child()
        self.children.mount, self.children.mount_served = child, False
        await child.start()
        self.children.remember()
        replicator = self.children.replicator
        # replicating comes before mounting, except on a shared engine (no litestream).
        waits = [self._serving_then_sampled(replicator)] if replicator else []
        seconds, *_ = await together(
            self.juicefs.wait_mounted(child, self.config.ready_timeout), *waits)
        self.children.mount_served = True
        self.log.info("mounted", mount_point=str(self.layout.mount_point), pid=child.pid,
                      duration_ms=round(seconds * 1000, 1))
        # mkdir through FUSE on a first start, no-ops later. Here, not on entering ready: ready
        # is re-entered after every operation, and these cost ~1 ms each time (bench/).
        self.layout.active_dir.mkdir(parents=True, exist_ok=True)
        self.layout.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        self._watch_mount(child)
        if self.space is not None:  # a full disk makes writes wait silently: say it
            self.children.background(self.space.run())

    async def _serving_then_sampled(self, replicator: Child) -> None:
        await self.replication.serving(replicator)
        if self.after_mount is not None:
            # The replica's position before this mount's first write (alongside the mount
            # coming up: nothing can write before it is), then every few seconds: the
            # watermark a successor restores after an unclean loss (fsm.claim).
            await self.after_mount(self.replication.sync, self.litestream.replica_subpath)

    def _watch_mount(self, child: Child) -> None:
        async def lost(rc: int) -> None:
            await self.send("mount_lost", error=MountLost(
                f"juicefs (pid {child.pid}) exited with {rc} while in use:\n"
                f"{child.stderr_tail()}"))
        self.children.watch(child, lost, self.juicefs.unstick)

