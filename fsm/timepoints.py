"""Points in time for time travel (fsm.history): the retention policy a history window needs,
parsing the times users type, and the window Litestream can actually restore.

Pure functions of the configuration and of `litestream ltx` output: no processes, no I/O, so the
adapters (fsm.juicefs, fsm.litestream) can use the policy without importing the orchestration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .config import Config
from .errors import OutsideWindow

# Clocks differ a little between the caller and us; "now" from a client is not the future.
_CLOCK_SKEW = timedelta(seconds=5)
SNAPSHOT_LEVEL = 9

_UNIT = r"(s|secs?|seconds?|m|mins?|minutes?|h|hours?|d|days?)"
# -90s, -5m ... or "90s ago", "5 minutes ago" (a leading '-' reads as a flag on command lines).
_RELATIVE = re.compile(rf"-\s*(\d+(?:\.\d+)?)\s*{_UNIT}|(\d+(?:\.\d+)?)\s*{_UNIT}\s+ago")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# ---- policy ---------------------------------------------------------------------------------

def history_on(cfg: Config) -> bool:
    return cfg.history_hours > 0


def trash_days_needed(cfg: Config) -> int:
    """JuiceFS keeps deleted files and freed slices for trash-days: at least the window."""
    return max(1, math.ceil(cfg.history_hours / 24)) if history_on(cfg) else 0


def snapshot_policy(cfg: Config) -> tuple[int, int] | None:
    """(interval, retention) in seconds for Litestream's snapshots, or None (its defaults).
    A restore starts from a snapshot older than the target; snapshots older than retention are
    deleted when a new one is taken, so the oldest kept one is at least retention - interval
    old. interval = window / 3 and retention = window + interval keep the whole window."""
    if not history_on(cfg):
        return None
    window = cfg.history_hours * 3600
    interval = max(1, int(window / 3))
    return interval, math.ceil(window) + interval


def snapshot_lines(cfg: Config) -> list[str]:
    """The `snapshot:` section of litestream.yml (0.5: top level, Go durations)."""
    policy = snapshot_policy(cfg)
    if policy is None:
        return []
    interval, retention = policy
    return ["snapshot:", f"  interval: {interval}s", f"  retention: {retention}s"]


# ---- times ----------------------------------------------------------------------------------

def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(value: str | float | datetime, now: datetime | None = None) -> datetime:
    """A point in time as users write it: ISO 8601 (`2026-01-02T03:04:05Z`, an offset, or no
    zone = this machine's local time), Unix seconds (`1767323045`), or relative to now
    (`-90s`, `-5m`, `-2h`, `-1d`, `5m ago`, `2 hours ago`). Always returned in UTC.
    OutsideWindow (a ValueError) for anything else, including times no datetime can hold."""
    try:
        return _read_time(value, now)
    except OutsideWindow:
        raise
    except (OverflowError, OSError, ValueError):
        # fromtimestamp/timedelta of a huge, infinite or NaN number; a far year at an offset
        raise OutsideWindow(
            f"the time {_shown(value)} is out of range: use a time between the years 1970 "
            f"and 9999, such as 2026-01-02T03:04:05Z, Unix seconds, or -5m") from None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_time(value: str | float | datetime, now: datetime | None) -> datetime:
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    text = str(value).strip()
    # fullmatch everywhere: `$` would also match before a final newline
    relative = _RELATIVE.fullmatch(text.lower())
    if relative:
        amount, unit = relative.group(1, 2) if relative.group(1) else relative.group(3, 4)
        seconds = float(amount) * _UNITS[unit[0]]
        return (now or utc_now()) - timedelta(seconds=seconds)
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return datetime.fromtimestamp(float(text), tz=timezone.utc)
    try:
        # Python 3.10's fromisoformat does not know the Z suffix.
        parsed = datetime.fromisoformat(re.sub(r"[zZ]\Z", "+00:00", text))
    except ValueError:
        raise OutsideWindow(
            f"cannot read the time {_shown(text)}: use ISO 8601 (2026-01-02T03:04:05Z), Unix "
            f"seconds, or a time relative to now such as -90s, -5m, '2h ago'") from None
    return _aware(parsed)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive = this machine's local time
    return moment.astimezone(timezone.utc)


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as litestream's -timestamp takes it."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def stamp(moment: datetime) -> str:
    """A folder name for a point in time: 20260102T030405Z, or 20260102T030405.250Z."""
    moment = moment.astimezone(timezone.utc)
    ms = moment.microsecond // 1000
    return moment.strftime("%Y%m%dT%H%M%S") + (f".{ms:03d}" if ms else "") + "Z"


def _ltx_time(text: str) -> datetime:
    return _aware(datetime.fromisoformat(re.sub(r"[zZ]\Z", "+00:00", text)))


# ---- the window -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreWindow:
    """What the replica can restore, from its LTX files: never an estimate from the config.

    `oldest`: the earliest time a restore gives the state at that time (a restore needs a
    snapshot, or the first transaction, created before it). `newest`: the last change
    replicated; any later time restores the latest state. Litestream lists whole seconds: the
    true oldest point is within the second after `oldest`, where litestream's own restore plan
    decides (a restore to T uses only files created before T). `levels` tells the precision: level 0
    files are ~1 s apart (kept a few minutes), level 1 about 30 s, level 2 5 min, level 3 1 h;
    level 9 are snapshots."""

    oldest: datetime | None
    newest: datetime | None
    replica: str
    history_hours: float
    levels: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_ltx(cls, files: list[dict[str, Any]], *, replica: str,
                 history_hours: float) -> RestoreWindow:
        times: dict[int, list[datetime]] = {}
        starts: list[datetime] = []
        for info in files:
            level, moment = int(info["level"]), _ltx_time(str(info["timestamp"]))
            times.setdefault(level, []).append(moment)
            if level == SNAPSHOT_LEVEL or int(str(info["min_txid"]), 16) == 1:
                starts.append(moment)
        everything = [t for ts in times.values() for t in ts]
        levels = [{"level": level, "files": len(ts), "from": iso(min(ts)), "to": iso(max(ts))}
                  for level, ts in sorted(times.items())]
        return cls(oldest=min(starts) if starts else None,
                   newest=max(everything) if everything else None,
                   replica=replica, history_hours=history_hours, levels=levels)

    def check(self, at: datetime, now: datetime | None = None) -> None:
        """Refuse a time outside the window, before anything is restored or mounted."""
        now = now or utc_now()
        if self.oldest is None:
            raise OutsideWindow("the metadata replica has no history yet; try again once the "
                                "volume has run for a few seconds")
        if at < self.oldest:
            raise OutsideWindow(
                f"{iso(at)} is before the history window: the oldest restorable time is "
                f"{iso(self.oldest)} (history_hours={self.history_hours:g}); "
                f"`juicefs-fsm history` shows the window")
        if at > now + _CLOCK_SKEW:
            raise OutsideWindow(f"{iso(at)} is in the future (now is {iso(now)})")

    def to_json(self) -> dict[str, Any]:
        return {"oldest": iso(self.oldest) if self.oldest else None,
                "newest": iso(self.newest) if self.newest else None,
                "now": iso(utc_now()), "history_hours": self.history_hours,
                "replica": self.replica, "levels": self.levels}


def state_time(plan: dict[str, Any]) -> datetime | None:
    """When the state a restore plan produces was replicated: its last file's time (whole
    seconds). A restore to T gives the state of the newest file created before T, so this is
    at most T, and earlier than T where only coarse (compacted) files are left."""
    files = plan.get("files") or []
    if not files:
        return None
    last = max(files, key=lambda f: int(str(f["max_txid"]), 16))
    return _ltx_time(str(last["timestamp"]))
