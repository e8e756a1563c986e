"""Read-only mounts of metadata copies (a browse of the past, a rollback's view of the tree it
replaces), and the safety check that no second read-write mount of a volume exists.

A restored copy mounted read-write hands out the slice ids the live volume uses (same object
keys: silent corruption), so copies are only ever mounted read-only: there is no read-write
variant here (docs/time-travel.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FsmError, InUse, TimeTravelError, ToolError
from .juicefs import (
    JuiceFSTool,
    is_juicefs_mount,
    is_stale_mount,
    juicefs_mount_points,
    lazy_unmount,
    mount_fstype,
    probe_config,
)
from .logs import get_logger
from .proc import Child, holders, named

UNMOUNT_GRACE = 10.0
BUSY_SETTLE = 3.0
BUSY_RETRY = 0.1


class Copies:
    def __init__(self, juicefs: JuiceFSTool, ready_timeout: float,
                 own_groups: Callable[[], list[int]], log: Any) -> None:
        self.juicefs = juicefs
        self.ready_timeout = ready_timeout
        self.own_groups = own_groups
        self.log = log

    async def mount(self, db: Path, mp: Path, cache: Path) -> Child:
        if mount_fstype(mp) is not None:
            raise TimeTravelError(f"{mp} is already a mount point")
        child = self.juicefs.read_only_mount_child(db, mp, cache)
        await child.start()
        try:
            await _wait_mounted(child, mp, self.ready_timeout)
        except BaseException:
            await self.unmount(child, mp)
            raise
        return child

    async def unmount(self, child: Child, mp: Path, *, force: bool = True) -> list[str]:
        """Unmount a copy's read-only mount and reap its process. A busy mount point (a shell
        still in it) is refused unless `force` (stop, clean-up): then its FUSE connection is
        aborted, which ends the process at once; a read-only copy has nothing to flush."""
        mounted = is_juicefs_mount(mp)
        if mounted:
            try:
                await self._umount_when_free(mp, force)
            except ToolError as exc:
                self.log.warning("copy_unmount_failed", mount_point=str(mp), error=str(exc))
                await self.juicefs.abort_connection(mp)
        # Unmounted, juicefs exits by itself; one that never mounted is stopped now.
        if child.pid is not None and not await child.exits_within(
                UNMOUNT_GRACE if mounted else 0):
            await child.terminate(UNMOUNT_GRACE)
        if is_juicefs_mount(mp) or is_stale_mount(mp):
            try:
                await lazy_unmount(mp, self.log)
            except ToolError as exc:
                self.log.warning("copy_lazy_unmount_failed", mount_point=str(mp),
                                 error=str(exc))
        if mount_fstype(mp) is not None:
            return [f"{mp} is still mounted; run `umount -l {mp}`"]
        return []

    async def _umount_when_free(self, mp: Path, force: bool) -> None:
        """`juicefs umount`, refused with InUse while a program is inside (unless `force`).
        A busy answer with nobody to name is the mount's own juicefs process touching its
        mount point for a moment (seen right after a mount): that passes, so it is retried
        for up to BUSY_SETTLE seconds before the mount counts as in use."""
        deadline = time.monotonic() + BUSY_SETTLE
        while True:
            try:
                await self.juicefs.umount_at(mp)
                return
            except ToolError as exc:
                if "busy" not in exc.stderr_tail or force:
                    raise
                inside = holders(mp, self.own_groups())
                if inside or time.monotonic() >= deadline:
                    raise InUse(
                        f"{mp} is in use by {named(inside)}; leave it (cd elsewhere, close its "
                        f"files) and unbrowse again. It stays open; stopping the volume closes "
                        f"it anyway") from exc
                self.log.debug("copy_unmount_busy_retry", mount_point=str(mp))
            await asyncio.sleep(BUSY_RETRY)


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
