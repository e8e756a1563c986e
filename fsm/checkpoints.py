"""Checkpoint ids, records and the operation hand-off between callers and the chart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from .errors import CheckpointError, FsmError, InvalidCheckpointId

# Always fullmatch: with match(), `$` also matches before a final newline ("cp\n" passed).
_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")
PRE_RESTORE = "pre-restore-"


def validate_id(cp_id: object) -> str:
    """Refuse a bad id before anything touches disk."""
    if not isinstance(cp_id, str) or not _ID.fullmatch(cp_id) or cp_id in {".", ".."}:
        raise InvalidCheckpointId(
            f"invalid checkpoint id {cp_id!r}: use 1-200 characters of A-Z, a-z, 0-9, '.', '_' "
            f"and '-' (not '.' or '..')"
        )
    return cp_id


def pre_restore_id(cp_id: str, taken: set[str]) -> str:
    """`pre-restore-<id>-<unix>`, shortened to stay a valid id and made unique."""
    stamp = str(int(time.time()))
    room = 200 - len(PRE_RESTORE) - len(stamp) - 4
    return unique(f"{PRE_RESTORE}{cp_id[:room]}-{stamp}", taken)


def unique(base: str, taken: set[str]) -> str:
    """`base`, or `base-2`, `base-3`, ... whichever is not taken yet."""
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


@dataclass(frozen=True)
class Checkpoint:
    id: str
    path: Path
    created_at: datetime

    @property
    def tree(self) -> Path:
        """The user's tree as it was at the checkpoint."""
        return self.path / "fs"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "created_at": self.created_at.isoformat()}

    @classmethod
    def at(cls, path: Path) -> Checkpoint:
        mtime = os.stat(path).st_mtime
        return cls(path.name, path, datetime.fromtimestamp(mtime, tz=timezone.utc))


def list_in(directory: Path) -> list[Checkpoint]:
    found = [Checkpoint.at(Path(e.path)) for e in os.scandir(directory) if e.is_dir()]
    return sorted(found, key=lambda c: (c.created_at, c.id))


@dataclass
class Operation:
    """One checkpoint/restore/delete request. The chart's action fills in the outcome; the caller
    is woken only after the chart is back in `ready` (settle), so a follow-up call never meets a
    transient state."""

    # The error class of an interruption or an OSError (TravelOp: TimeTravelError).
    failure: ClassVar[type[FsmError]] = CheckpointError

    kind: str
    cp_id: str
    result: Any = None
    error: BaseException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        self.done.set()

    @contextlib.contextmanager
    def capture(self, what: str) -> Iterator[None]:
        """Record the action's failure as the caller's error. A failed operation leaves the
        volume usable, so it is not a chart error; an interruption (the volume left `ready`,
        e.g. the mount died) settles the caller at once so it never waits forever."""
        try:
            yield
        except asyncio.CancelledError:
            self.error = self.failure(f"{what} was interrupted: the volume left ready")
            self.settle()
            raise
        except FsmError as exc:
            self.error = exc
        except OSError as exc:
            self.error = self.failure(f"{what} failed: {exc}")

    async def outcome(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result
