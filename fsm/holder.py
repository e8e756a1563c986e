"""Who holds a lease, and on what clock (fsm.lease): the disk id that makes "the same machine
and base_dir" survive reboots but not a copy elsewhere, and a clock that keeps counting through
suspend."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

DISK_ID_FILE = "fsm.lease-id"


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a clock that never goes back and keeps counting through suspend."""

    def wall(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        # CLOCK_MONOTONIC stops while the machine is suspended; the successor's time does not.
        return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") \
            else time.monotonic()

    def wall(self) -> datetime:
        return datetime.now(timezone.utc)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)



def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def disk_id(base_dir: Path) -> str:
    """A random id kept in base_dir: 'the same disk' survives reboots, not a copy elsewhere."""
    path = base_dir / DISK_ID_FILE
    found = read_text(path)
    if found:
        return found
    base_dir.mkdir(parents=True, exist_ok=True)
    new = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
