"""The record of one transition (`JuiceFS.history`, observers, the live view, sd_notify)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Transition:
    source: str
    target: str
    event: str
    at: datetime
    duration_ms: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "event": self.event,
                "at": self.at.isoformat(), "duration_ms": self.duration_ms,
                "error": self.error}


Observer = Callable[[Transition], None]
# A long step's progress in words ("uploading 12 blocks (48.0 MiB) to the bucket").
ProgressObserver = Callable[[str], None]


def event_name(event: Any) -> str:
    name = str(getattr(event, "id", event) or "")
    # done.invoke.<state>.<random id>: keep the stable part.
    return ".".join(name.split(".")[:3]) if name.startswith("done.invoke.") else name
