"""Stop signals that arrive before the daemon's event loop can take them.

`juicefs-fsm run` installs these handlers first thing (before the imports and the configuration,
~0.15 s), so a SIGTERM, SIGINT or SIGHUP in that time is recorded instead of killing the process
with 143 or leaving half a start behind. The daemon then exits 0 without starting anything
(docs/faults.md, "A stop signal during the first moments"). Kept free of heavy imports: it must
run before them.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def install() -> None:
    """Record stop signals from now on, until the event loop's own handlers replace these."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def received() -> list[int]:
    """The stop signals recorded so far, oldest first."""
    return list(_received)
