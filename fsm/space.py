"""Free space of the disks a mounted volume writes to, watched while it runs (docs/faults.md,
"The disk is (nearly) full").

A full disk does not make writes into a JuiceFS volume fail: the mount keeps the data in its
write buffer and retries storing the blocks, so writes wait, and a stop then cannot flush them.
Nothing in the mount's exit or the kernel says so; only the free space does. So while mounted,
`SpaceWatch.run()` checks (every CHECK_INTERVAL s) the filesystems of base_dir and cache/, and
while one is short it says so: a `disk_space_low` event (path, the filesystem's mount point,
free/total MiB), the volume's progress text (the daemon's sd_notify STATUS) and `status()`
(JuiceFS.status()["space"]); `disk_space_ok` once it has room again.

Short means (documented in docs/faults.md):
- base_dir's filesystem (metadata.db; in local mode also the volume's blocks and the local
  replica): less than BASE_MIN_MIB free, or in local mode less than the mount's write buffer
  (--buffer-size), which may have to be written out there at once;
- cache/'s filesystem (writeback blocks staged until uploaded): less than CACHE_FREE_RATIO of
  it free, JuiceFS's own --free-space-ratio below which it stops staging there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .juicefs import _mounts, buffer_size_mib

CHECK_INTERVAL = 2.0
BASE_MIN_MIB = 64
CACHE_FREE_RATIO = 0.1
_MIB = 1 << 20


@dataclass(frozen=True)
class Disk:
    """One filesystem the volume writes to, and what it was found to have."""

    roles: tuple[str, ...]  # "base_dir", "cache"
    path: Path
    mount_point: str
    free: int
    total: int
    need: int  # bytes below which it is short

    @property
    def short(self) -> bool:
        return self.free < self.need

    def to_json(self) -> dict[str, Any]:
        return {"roles": list(self.roles), "path": str(self.path),
                "mount_point": self.mount_point, "free_mib": _mib(self.free),
                "total_mib": _mib(self.total), "need_mib": _mib(self.need),
                "short": self.short}


def _mib(n: int) -> float:
    return round(n / _MIB, 1)


def mount_point_of(path: Path) -> str:
    """The mount point of the filesystem `path` is on (the longest prefix in mountinfo)."""
    real = os.path.realpath(path)
    best = "/"
    for mount_point, _kind in _mounts():
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best = mount_point
    return best


class SpaceWatch:
    def __init__(self, config: Config, report: Callable[[str], None], log: Any) -> None:
        self.config = config
        self.layout = config.layout
        self.report = report
        self.log = log
        self.disks: list[Disk] = []
        self.message: str | None = None  # while short: what is short and what it means
        self._short: set[str] = set()  # mount points reported short
        self._running = False

    def needs(self) -> list[tuple[str, Path, int]]:
        """(role, path, bytes below which its filesystem is short)."""
        base = BASE_MIN_MIB * _MIB
        if self.config.local_mode:
            base = max(base, buffer_size_mib(self.config) * _MIB)
        cache = self.layout.cache_dir
        cache_need = int(shutil.disk_usage(cache).total * CACHE_FREE_RATIO)
        return [("base_dir", self.layout.base_dir, base), ("cache", cache, cache_need)]

    def check(self) -> list[Disk]:
        """One look at the disks; says what changed (events, the progress text)."""
        self.disks = self.measure()
        self._say()
        return self.disks

    def measure(self) -> list[Disk]:
        """The disks as they are now (blocking: statfs; in a thread from run())."""
        by_device: dict[int, Disk] = {}
        for role, path, need in self.needs():
            usage = shutil.disk_usage(path)
            device = os.stat(path).st_dev
            seen = by_device.get(device)
            if seen is None:
                by_device[device] = Disk((role,), path, mount_point_of(path), usage.free,
                                         usage.total, need)
            else:  # one filesystem in both roles: the stricter need
                by_device[device] = Disk((*seen.roles, role), seen.path, seen.mount_point,
                                         usage.free, usage.total, max(seen.need, need))
        return list(by_device.values())

    def _say(self) -> None:
        short = [d for d in self.disks if d.short]
        for disk in short:
            if disk.mount_point not in self._short:
                self.log.warning("disk_space_low", effect=self._effect(disk), **disk.to_json())
        for disk in self.disks:
            if not disk.short and disk.mount_point in self._short:
                self.log.info("disk_space_ok", **disk.to_json())
        was_short = bool(self._short)
        self._short = {d.mount_point for d in short}
        if short:
            self.message = "; ".join(self._describe(d) for d in short)
            self.report(self.message)  # again each time: a transition clears the progress text
        elif was_short:
            self.message = None
            self.report("disk space is back: " + ", ".join(
                f"{d.mount_point} has {_mib(d.free)} MiB free" for d in self.disks))

    def _describe(self, disk: Disk) -> str:
        roles = " and ".join(f"{r} {disk.path}" if r == "base_dir" else r for r in disk.roles)
        return (f"disk space low: the filesystem at {disk.mount_point} ({roles}) has "
                f"{_mib(disk.free)} MiB free of {_mib(disk.total)} MiB (short below "
                f"{_mib(disk.need)} MiB): {self._effect(disk)}")

    def _effect(self, disk: Disk) -> str:
        if "base_dir" in disk.roles and self.config.local_mode:
            return ("the volume's blocks are stored there: writes into the volume wait (they "
                    "do not fail) until space is freed, and what they hold is in memory only; "
                    "free space there, or a stop may lose it")
        if "base_dir" in disk.roles:
            return "metadata.db lives there: once it is full, changes to the volume fail"
        return ("JuiceFS stops staging writeback blocks there and uploads them at once "
                "(writes are slower)")

    def status(self) -> dict[str, Any]:
        return {"state": ("unknown" if not self.disks else
                          "short" if self.message else "ok"),
                "message": self.message, "disks": [d.to_json() for d in self.disks]}

    async def run(self) -> None:
        """Check every CHECK_INTERVAL s until cancelled (teardown cancels it with the other
        watchers). A second run while one is going (a rollback's remount) returns at once."""
        if self._running:
            return
        self._running = True
        try:
            while True:
                try:
                    self.disks = await asyncio.to_thread(self.measure)
                except OSError as exc:  # base_dir going away under us: said, not fatal
                    self.log.warning("disk_space_unknown", error=str(exc))
                else:
                    self._say()  # on the loop: the report reaches observers (sd_notify)
                await asyncio.sleep(CHECK_INTERVAL)
        finally:
            self._running = False
