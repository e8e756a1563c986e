"""Adapter for the `juicefs` binary: format, mount (with ready detection), clone, umount, rmr."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ToolError
from .metaengine import engine_env, meta_url_for
from .proc import Child, Completed, alive, child_env, run, stuck_exiting
from .timepoints import trash_days_needed

READY_LINE = "is ready at"
# A second line of defence after a takeover (fsm.takeover): a read of an object that is not in
# the bucket fails after a bounded time instead of blocking for the defaults' ~10 minutes
# (60 s timeout x 10 retries).
S3_READ_BOUND = ("--get-timeout", "20s", "--io-retries", "4")
_PROBE_INTERVAL = 0.005
# A mount point that does not answer a stat within this long is hung (its server is gone).
_PROBE_TIMEOUT = 2.0
_STUCK_CONFIRM = 0.1


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape")


def _mounts() -> Iterator[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in this namespace, oldest first, from
    /proc/self/mountinfo (it never asks a filesystem, so a hung FUSE mount cannot block it)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) > 4 and right:
                yield _unescape_mountinfo(parts[4]), right.split()[0]


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`."""
    target = os.path.realpath(path)
    fstype = None
    for mount_point, kind in _mounts():
        if mount_point == target:
            fstype = kind  # the last (top-most) mount wins
    return fstype


def juicefs_mount_points() -> list[Path]:
    """Every fuse.juicefs mount on this host (this mount namespace)."""
    return [Path(mp) for mp, kind in _mounts() if kind == "fuse.juicefs"]


async def probe_config(mount_point: Path, log: Any, timeout: float) -> Completed:
    """`<mp>/.config` read by a child process that can be killed: a read here on a hung FUSE
    mount would block forever (and a thread pool with it). ToolError when it cannot be read,
    with returncode None when it did not answer in time."""
    return await run("cat", "probe mount", ["cat", str(mount_point / ".config")],
                     env=child_env(), log=log, timeout=timeout)


def is_juicefs_mount(path: Path) -> bool:
    """True when a live fuse.juicefs mount answers at `path` (its root inode is 1)."""
    if mount_fstype(path) != "fuse.juicefs":
        return False
    try:
        return os.stat(path).st_ino == 1
    except OSError:
        return False


def is_stale_mount(path: Path) -> bool:
    """A FUSE mount whose server is gone: stat fails with ENOTCONN."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def staged_blocks(cache_dir: Path) -> tuple[int, int, float | None]:
    """Writeback blocks written to the volume but not uploaded yet, read from the disk
    (`cache/<uuid>/rawstaging/`, works with no mount): (count, bytes, oldest mtime)."""
    count = size = 0
    oldest: float | None = None
    for staging in cache_dir.glob("*/rawstaging"):
        for root, _dirs, files in os.walk(staging):
            for name in files:
                try:  # uploaded (and removed) meanwhile
                    st = os.stat(os.path.join(root, name))
                except FileNotFoundError:
                    continue
                count, size = count + 1, size + st.st_size
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
    return count, size, oldest


def read_format(db: Path) -> dict[str, Any] | None:
    """The volume's format (jfs_setting row 'format'), or None when the db is not formatted."""
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT value FROM jfs_setting WHERE name = 'format'").fetchone()
    except sqlite3.DatabaseError:
        return None
    if row is None:
        return None
    value = json.loads(row[0])
    return value if isinstance(value, dict) else None


def cache_size_mib(cfg: Config) -> int:
    """80% of the cache filesystem, as the Go package did: the one cache/ is on, which is not
    base_dir's when cache/ has a filesystem of its own."""
    if cfg.cache_size_mib:
        return cfg.cache_size_mib
    cache = cfg.layout.cache_dir
    usage = shutil.disk_usage(cache if cache.is_dir() else cfg.layout.base_dir)
    return max(1, int(usage.total * 0.8) // (1 << 20))


def buffer_size_mib(cfg: Config) -> int:
    """min(20% of RAM, 1 GiB)."""
    if cfg.buffer_size_mib:
        return cfg.buffer_size_mib
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(64, min(int(ram * 0.2) // (1 << 20), 1024))


class JuiceFSTool:
    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg = cfg
        self.layout = cfg.layout
        self.bin = str(cfg.juicefs_bin)
        self.log = log.bind(tool="juicefs")
        # Credentials (the bucket's, a shared engine's META_PASSWORD) travel in the
        # environment only, never in argv.
        self.env = engine_env(cfg)
        # The volume's META-URL: the SQLite file, or a shared engine's URL without password.
        self.meta_url = meta_url_for(cfg)
        self.secrets = cfg.secrets()
        self.ready_line = asyncio.Event()  # set when juicefs prints "is ready at"

    async def _call(self, action: str, *args: str, timeout: float | None = None) -> Completed:
        return await run("juicefs", action, [self.bin, *args], env=self.env, log=self.log,
                         secrets=self.secrets, timeout=timeout)

    async def _run(self, action: str, *args: str, timeout: float | None = None) -> str:
        return (await self._call(action, *args, timeout=timeout)).stdout

    async def version(self) -> str:
        return (await self._run("version", "--version")).strip()

    async def format(self) -> None:
        storage = "file" if self.cfg.local_mode else "s3"
        # Time travel keeps deleted data as long as its history window (fsm.history).
        trash = ["--trash-days", str(trash_days_needed(self.cfg))] if self.cfg.history_hours else []
        argv = [self.bin, "format", "--storage", storage, "--bucket", self.cfg.bucket_url, *trash,
                "--no-update", self.meta_url, self.cfg.volume_name]
        # S3 mode: the caller checked the volume's prefix holds nothing but the controller's
        # own keys (the lease is there before the first format, and juicefs's own "storage is
        # not empty" test would refuse it: fsm.startup).
        env = self.env if self.cfg.local_mode else {**self.env,
                                                    "JFS_NO_CHECK_OBJECT_STORAGE": "1"}
        await run("juicefs", "format", argv, env=env, log=self.log, secrets=self.secrets)

    def mount_argv(self, upload_delay: float | None = None) -> list[str]:
        """`upload_delay` overrides the configured one (the flush remount at stop uses 0)."""
        cfg = self.cfg
        delay = cfg.effective_upload_delay if upload_delay is None else upload_delay
        # A shared engine: other machines see a file as soon as its metadata is committed, so
        # its blocks must be in the bucket by then; writeback would leave them in this
        # machine's staging folder (docs/shared-engine.md). close() then waits for the upload.
        writeback = [] if cfg.meta_url else ["--writeback", "--upload-delay", f"{delay:g}s"]
        return [
            self.bin, "mount", self.meta_url, str(self.layout.mount_point),
            *writeback,
            "--cache-dir", str(self.layout.cache_dir),
            "--cache-size", str(cache_size_mib(cfg)),
            "--buffer-size", str(buffer_size_mib(cfg)),
            "--no-usage-report", "--no-syslog",
            *([] if cfg.local_mode else S3_READ_BOUND),
        ]

    def mount_child(self, upload_delay: float | None = None) -> Child:
        self.ready_line = asyncio.Event()

        def watch_line(line: str) -> None:
            if READY_LINE in line:
                self.log.info("mount_ready_line", line=line)
                self.ready_line.set()

        return Child("juicefs", self.mount_argv(upload_delay), env=self.env, log=self.log,
                     secrets=self.secrets, on_line=watch_line)

    async def wait_mounted(self, child: Child, timeout: float) -> float:
        """Wait until the mount is usable. The probe (a fuse.juicefs mount whose root is inode 1)
        answers ~0.46 s before juicefs prints `is ready at`, so it decides; the line (the
        predecessors' only signal) wakes the probe at once but never counts on its own.
        Returns seconds from spawn to ready."""
        started = time.monotonic()
        deadline = started + timeout
        mp = self.layout.mount_point
        while not is_juicefs_mount(mp):
            if not child.running:
                await child.wait()
                raise ToolError("juicefs", "mount", child.returncode, child.stderr_tail())
            if time.monotonic() > deadline:
                raise ToolError("juicefs", f"mount (not ready after {timeout:g}s)", None,
                                child.stderr_tail())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready_line.wait(), _PROBE_INTERVAL)
            self.ready_line.clear()  # one wake-up per line, not a busy loop after it
        return time.monotonic() - started

    async def clone(self, src: Path, dst: Path) -> None:
        # --preserve keeps owners and modes (without it the copy becomes the caller's).
        await self._run("clone", "clone", "--preserve", str(src), str(dst))

    async def rmr(self, path: Path) -> None:
        await self._run("rmr", "rmr", str(path))

    def read_format(self) -> dict[str, Any] | None:
        return read_format(self.layout.metadata_db)

    def mount_info(self) -> dict[str, Any]:
        """`<mp>/.config`: the serving mount's options; `Pid` serves FUSE, `PPid` supervises."""
        info = json.loads((self.layout.mount_point / ".config").read_text())
        return info if isinstance(info, dict) else {}

    async def wait_taken_over(self, child: Child, timeout: float) -> float:
        """Wait until `child` (a second `juicefs mount` on the same mount point: JuiceFS's
        seamless remount) serves the mount, i.e. `.config` names it as the supervisor.
        Returns seconds waited."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(OSError, ValueError):
                if (await asyncio.to_thread(self.mount_info)).get("PPid") == child.pid:
                    return time.monotonic() - started
            if not child.running:
                await child.wait()
                raise ToolError("juicefs", "remount", child.returncode, child.stderr_tail())
            if time.monotonic() - started > timeout:
                raise ToolError("juicefs", f"remount (no takeover after {timeout:g}s)", None,
                                child.stderr_tail())
            await asyncio.sleep(0.02)

    async def staging(self) -> dict[str, int]:
        """Writeback blocks not yet uploaded, from `<mp>/.stats`: `blocks`, `bytes`, and
        `writing` (blocks still being written to the staging folder)."""
        text = await asyncio.to_thread((self.layout.mount_point / ".stats").read_text)
        metrics: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                metrics[name] = float(value)
        blocks = int(metrics.get("juicefs_staging_blocks", 0))
        # juicefs lowers the block count, then the byte count, as two steps: a read between
        # them shows "0 blocks, 4 MiB". The count is the one that says what is left.
        return {"blocks": blocks,
                "bytes": int(metrics.get("juicefs_staging_block_bytes", 0)) if blocks else 0,
                "writing": int(metrics.get("juicefs_staging_writing_blocks", 0))}

    def is_mounted(self) -> bool:
        return is_juicefs_mount(self.layout.mount_point)

    def is_stale(self) -> bool:
        return is_stale_mount(self.layout.mount_point)

    async def lazy_unmount(self) -> None:
        await lazy_unmount(self.layout.mount_point, self.log)

    async def umount(self, *, flush: bool, timeout: float) -> None:
        args = ["umount", "--flush"] if flush else ["umount"]
        await self._run("umount", *args, str(self.layout.mount_point), timeout=timeout)

    # ---- faults (docs/faults.md) -------------------------------------------------------------

    async def mount_state(self) -> tuple[str, dict[str, Any]]:
        """What is at the mount point, found without risking a hang, and the mount's `.config`
        when it answers: "absent" (no FUSE mount), "live" (a serving juicefs mount), "stale"
        (ENOTCONN: its server is gone), "hung" (no answer: the server is gone but a dying
        process keeps the connection open) or "other". The probe reads `.config` in a child
        process, which can be killed (a read here could block forever); a stat would not do,
        the kernel answers it from its attribute cache for a second after the server died."""
        mp = self.layout.mount_point
        fstype = mount_fstype(mp)
        if fstype is None or not fstype.startswith("fuse"):
            return "absent", {}
        try:
            done = await probe_config(mp, self.log, _PROBE_TIMEOUT)
        except ToolError as exc:
            if exc.returncode is None:
                return "hung", {}
            # ENOTCONN, or ECONNABORTED once the connection was aborted
            dead = ("not connected", "connection abort")
            return ("stale" if any(d in exc.stderr_tail for d in dead) else "other"), {}
        with contextlib.suppress(ValueError):
            info = json.loads(done.stdout)
            if fstype == "fuse.juicefs" and isinstance(info, dict):
                return "live", info
        return "other", {}

    async def abort_connection(self, mount_point: Path | None = None) -> None:
        """Abort the FUSE connection at the mount point (`umount -f`; for FUSE that aborts the
        connection even when the unmount itself is refused as busy): requests waiting for a
        dead server fail with ENOTCONN, so whatever waits on them can finish, and the mount
        process exits. Default: the volume's mount point."""
        mp = str(mount_point or self.layout.mount_point)
        try:
            await run("umount", "abort fuse connection", ["umount", "-f", mp], env=child_env(),
                      log=self.log, timeout=30)
        except ToolError as exc:  # "target is busy" is expected: the abort still happened
            self.log.info("fuse_abort_unmount_refused", mount_point=mp, error=str(exc))
        self.log.warning("fuse_connection_aborted", mount_point=mp)

    async def force_unmount(self) -> None:
        """The fallback once `umount --flush` failed or stayed busy. Aborting the connection
        ends the mount process cleanly (it flushes its buffers and closes its session) even
        while programs still hold the mount point; `juicefs umount --force` would only detach
        it, and the process would serve the programs inside for as long as they stay."""
        await self.abort_connection()
        if self.is_mounted() or self.is_stale():
            await self.lazy_unmount()

    async def unstick(self, child: Child) -> None:
        """Let a mount process that was killed finish dying. kill -9 of both mount processes
        can leave the supervisor unable to exit: on exit it closes a file on the mount, the
        kernel sends a FLUSH that only the (dead) server could answer and waits for it
        uninterruptibly, while the supervisor's own /dev/fuse descriptor keeps the connection
        open (seen in ~3% of such kills under load). Nothing would ever end it, and any stat
        of the mount point would hang too. Aborting the connection ends the wait."""
        pid = child.pid
        if pid is None or not child.running or not stuck_exiting(pid):
            return
        await asyncio.sleep(_STUCK_CONFIRM)  # a normal exit passes through this state briefly
        if child.running and stuck_exiting(pid):
            self.log.warning("mount_stuck_exiting", pid=pid)
            await self.abort_connection()


    # ---- time travel (fsm.history) ------------------------------------------------------

    async def set_trash_days(self, days: int) -> None:
        """Raise the primary volume's trash-days (`juicefs config`)."""
        await self._run("config", "config", self.meta_url, "--trash-days", str(days),
                        "--yes")

    async def fsck(self, db: Path) -> str:
        """Check that every object a metadata copy references exists (`juicefs fsck`, read
        only). A ToolError when objects are lost or files broken; returns the report."""
        return (await self._call("fsck", "fsck", f"sqlite3://{db}", timeout=3600)).stderr

    async def gc_primary(self) -> str:
        """`juicefs gc --delete` against the primary metadata only: objects no slice of it
        references are deleted (objects younger than an hour are skipped by juicefs)."""
        return (await self._call("gc", "gc", self.meta_url, "--delete",
                                 timeout=3600)).stderr

    def read_only_mount_child(self, db: Path, mount_point: Path, cache_dir: Path) -> Child:
        """A mount of a metadata copy that can change nothing: read-only, no background jobs
        (no compaction, no trash purge), no metadata backup, its own cache. There is no
        read-write variant: a second writer on the bucket corrupts the live volume."""
        argv = [self.bin, "mount", f"sqlite3://{db}", str(mount_point), "--read-only",
                "--no-bgjob", "--backup-meta", "0", "--cache-dir", str(cache_dir),
                "--no-usage-report", "--no-syslog"]
        return Child("juicefs", argv, env=self.env, log=self.log, secrets=self.secrets)

    async def umount_at(self, mount_point: Path, timeout: float = 30.0) -> None:
        await self._run("umount", "umount", str(mount_point), timeout=timeout)


def remove_handover_files(pid: int | None) -> None:
    """A `juicefs mount` supervisor keeps `/tmp/fuse_fd_comm.<pid>` and `/tmp/state<pid>.json`
    (paths fixed in juicefs) for a seamless remount. After a handover (stop's flush remount)
    or a kill it leaves `state<pid>.json.bak` or the socket behind: one per stop, forever.
    Removed once that supervisor (ours: `pid` is our child's) has exited; never while a
    process has that pid."""
    if pid is None or alive(pid):
        return
    for name in (f"fuse_fd_comm.{pid}", f"state{pid}.json", f"state{pid}.json.bak"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/{name}")


async def lazy_unmount(path: Path, log: Any) -> None:
    """Last resort for a stuck or stale FUSE mount: detach it (umount -l)."""
    await run("umount", "lazy unmount", ["umount", "-l", str(path)], env=child_env(), log=log,
              timeout=30)
