"""What the client verbs print for people (`--json` prints the daemon's answer as it is)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .errors import one_line


def checkpoint_table(found: list[dict[str, Any]]) -> str:
    if not found:
        return "no checkpoints"
    width = max(len(cp["id"]) for cp in found)
    return "\n".join([f"{'ID':<{width}}  CREATED_AT",
                      *(f"{cp['id']:<{width}}  {cp['created_at']}" for cp in found)])


def rollback_text(done: dict[str, Any]) -> str:
    gc = done["gc"]
    return (f"rolled back to {done['at']} (replicated state of {done['state_at']}); the mount "
            f"was offline {done['offline_ms']:.0f} ms\nthe tree it replaced is checkpoint "
            f"{done['checkpoint']['id']}\ngarbage collection: "
            + (gc.get("summary") or "done" if gc.get("ok") else f"failed: {gc.get('error')}"))


def format_history(window: dict[str, Any]) -> str:
    lines = [f"history:   {window.get('history_hours'):g} h kept (history_hours)",
             f"oldest:    {window.get('oldest') or '-'}{ago(window.get('oldest') or '')}",
             f"newest:    {window.get('newest') or '-'}{ago(window.get('newest') or '')}"
             " (later times give the latest state)",
             f"replica:   {window.get('replica')}"]
    steps = {0: "~1 s", 1: "~30 s", 2: "~5 min", 3: "~1 h", 9: "snapshots"}
    for level in window.get("levels") or []:
        lines.append(f"  level {level['level']} ({steps.get(level['level'], '?')}): "
                     f"{level['files']} files, {level['from']} .. {level['to']}")
    for browse in window.get("browsing") or []:
        lines.append(f"browsing:  {browse['at']} at {browse['path']}")
    return "\n".join(lines)


def format_status(status: dict[str, Any], transitions: int = 10) -> str:
    """Human-readable status (the --json form has everything)."""
    since = status.get("since", "")
    lines = [f"state:       {status.get('state')} since {since}{ago(since)}",
             f"volume:      {status.get('volume_name')} ({status.get('mode')} mode)",
             f"base_dir:    {status.get('base_dir')}"]
    pids = {**(status.get("pids") or {}), "daemon": (status.get("daemon") or {}).get("pid")}
    lines.append("pids:        " + ", ".join(f"{k} {v if v else '-'}" for k, v in pids.items()))
    versions = status.get("versions") or {}
    lines.append("versions:    " + ", ".join(f"{k} {v or '?'}" for k, v in versions.items()))
    if status.get("engine"):
        lines.append(f"metadata:    {status['engine']}")
    lease = status.get("lease")
    if lease:
        held = "held" if lease.get("held") else "NOT held"
        lines.append(f"lease:       {held} ({lease.get('how')}), last refresh "
                     f"{lease.get('last_refresh') or '-'}, expires in "
                     f"{lease.get('expires_in_s')} s unless refreshed")
    takeover = status.get("takeover")
    if takeover:
        lines.append(f"takeover:    from {(takeover.get('from') or {}).get('host')}: restored to "
                     f"{takeover.get('state_at')}, {takeover.get('lost_s')} s of writes lost")
    if status.get("progress"):
        lines.append("progress:    " + str(status["progress"]))
    space = status.get("space")
    if isinstance(space, dict) and space.get("short"):
        lines.append("disk:        " + str(space.get("message") or space))
    if status.get("error"):
        lines.append("error:       " + one_line(str(status["error"])))
    recent = (status.get("transitions") or [])[-transitions:]
    if recent:
        lines.append("transitions: (oldest first)")
        for t in recent:
            lines.append(f"  {t.get('at', '')}  {t.get('from')} -> {t.get('to')}  "
                         f"[{t.get('event')}, {t.get('duration_ms')} ms]")
    return "\n".join(lines)


def ago(iso: str) -> str:
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return ""
    return f" ({(datetime.now(timezone.utc) - then).total_seconds():.1f} s ago)"
