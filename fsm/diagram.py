"""Diagrams of the lifecycle chart, drawn by python-statemachine's own renderers.

The picture is `fsm.chart.Lifecycle` as the library extracts it, with two additions an operator
needs and the library leaves out: each state's action (its `invoke` handler; the library draws
only entry/exit callbacks) and each transition's action. Event labels are the ids that appear in
logs and in `status` (`start`, `mount_lost`, `error.execution`; `done` is `done.invoke.<state>`,
"the state's action finished").

Given a daemon's status, the current state is highlighted and a caption lists the last
transitions. `python -m fsm.diagram --write diagrams/` regenerates the committed files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from statemachine.contrib.diagram import GraphvizError
from statemachine.contrib.diagram.extract import extract
from statemachine.contrib.diagram.graphviz import run_graphviz
from statemachine.contrib.diagram.model import ActionType, DiagramAction
from statemachine.contrib.diagram.renderers.dot import DotRenderer, DotRendererConfig
from statemachine.contrib.diagram.renderers.mermaid import (
    MermaidRenderer,
    MermaidRendererConfig,
)

from .chart import Lifecycle
from .config import which

FORMATS = ("mermaid", "dot", "svg", "png")
TEXT_FORMATS = ("mermaid", "dot")
BASENAME = "lifecycle"
SUFFIX = {"mermaid": "mmd", "dot": "dot", "svg": "svg", "png": "png"}
CAPTION_TRANSITIONS = 10
"""How many of the most recent transitions the live caption lists."""

_ERROR_WIDTH = 100
# The DOT renderer names some nodes after id() of a pydot object; renumbered for stable output.
_OBJECT_IDS = re.compile(r"(__initial_|cluster___atomic_)(\d+)")


@dataclass(frozen=True)
class Highlight:
    """What a live diagram shows on top of the chart: the current leaf state and a caption."""

    state: str
    failed: bool
    caption: list[str]


# ---- the chart, as the renderers see it ---------------------------------------------------------


def _named(callbacks: Any) -> list[str]:
    """Callbacks declared by name in the chart (not the on_<x> naming conventions)."""
    return [str(spec.func) for spec in callbacks if not spec.is_convention]


def _event_label(events: Any) -> str:
    ids = [str(e) for e in events]
    # Both spellings are registered (done_invoke_x / done.invoke.x); the history uses the dotted.
    dotted = [e for e in ids if "." in e] or ids
    event = dotted[0] if dotted else ""
    return "done" if event.startswith("done.invoke.") else event


def _chart_transitions() -> list[Any]:
    """The chart's transitions in the order `extract` lists them (depth first, as declared)."""
    found: list[Any] = []

    def walk(states: Any) -> None:
        for state in states:
            found.extend(state.transitions)
            walk(state.states)

    walk(Lifecycle.states)
    return found


def _graph() -> Any:
    """The library's intermediate representation of the chart, with the actions added."""
    graph = extract(Lifecycle)
    chart_states = Lifecycle.states_map

    def annotate(states: Any) -> None:
        for state in states:
            for name in _named(chart_states[state.id].invoke):
                state.actions.append(DiagramAction(ActionType.INTERNAL, f"invoke / {name}"))
            annotate(state.children)

    annotate(graph.states)
    drawn = graph.transitions
    declared = _chart_transitions()
    if [t.source for t in drawn] != [t.source.id for t in declared]:
        raise RuntimeError("python-statemachine changed how it lists transitions; "
                           "update fsm.diagram._chart_transitions to match")
    for shown, transition in zip(drawn, declared, strict=True):
        label = _event_label(transition.events)
        actions = _named(transition.on)
        shown.event = f"{label} / {', '.join(actions)}" if actions else label
    graph.transitions = _merge_parallel(drawn)
    return graph


def _merge_parallel(transitions: list[Any]) -> list[Any]:
    """One arrow per (source, target, guard): `error.execution | mount_lost | ...` instead of
    three arrows whose labels Graphviz scatters."""
    merged: dict[tuple[Any, ...], Any] = {}
    for t in transitions:
        key = (t.source, tuple(t.targets), tuple(t.guards), t.is_internal, t.is_initial)
        same = merged.get(key)
        # An arrow with its own action stays alone: `a | b / x` would read as both running x.
        if same is not None and t.event and same.event and "/" not in t.event + same.event:
            same.event += f" | {t.event}"
        else:
            merged[key if same is None else (*key, len(merged))] = t
    return list(merged.values())


def _mark(graph: Any, highlight: Highlight | None) -> None:
    """Highlight only the leaf: colouring the compound would hide which leaf is current."""
    if highlight is None:
        return

    def walk(states: Any) -> None:
        for state in states:
            state.is_active = state.id == highlight.state and not state.children
            walk(state.children)

    walk(graph.states)


def _fill(highlight: Highlight | None, ok: str, bad: str) -> str:
    return bad if highlight is not None and highlight.failed else ok


# ---- renderers ----------------------------------------------------------------------------------


def mermaid(highlight: Highlight | None = None) -> str:
    graph = _graph()
    _mark(graph, highlight)
    config = MermaidRendererConfig(active_fill=_fill(highlight, "#40E0D0", "#FF8A80"))
    text: str = MermaidRenderer(config=config).render(graph)
    if highlight is None:
        return text
    # The renderer's class is called `active`, like our compound state: rename it.
    text = text.replace("classDef active ", "classDef current ").replace(":::active", ":::current")
    # The caption hangs off `uninitialized`, the leftmost top-level state: a note naming a state
    # nested in a composite would make Mermaid move that state out of its composite.
    body = "\n".join(f"        {_mermaid_safe(line)}" for line in highlight.caption[1:])
    note = f"    note left of uninitialized\n{body}\n    end note\n" if body else ""
    title = f"---\ntitle: {json.dumps(highlight.caption[0], ensure_ascii=False)}\n---\n"
    return title + text + note


def _mermaid_safe(line: str) -> str:
    # Keep note text from being read as diagram syntax.
    for old, new in (("-->", "\u2192"), (";", ","), ("end note", "end-note"),
                     ("<", "\u2039"), (">", "\u203a")):
        line = line.replace(old, new)
    return line


def dot(highlight: Highlight | None = None) -> str:
    graph = _graph()
    _mark(graph, highlight)
    config = DotRendererConfig(
        graph_rankdir="LR", font_name="Helvetica", state_font_size="10",
        transition_font_size="9", state_active_fillcolor=_fill(highlight, "turquoise", "salmon"))
    rendered = DotRenderer(config=config).render(graph)
    if highlight is not None:
        # Only the label: labeljust/labelloc on the root would be inherited by the clusters.
        rendered.set("label", _dot_caption(highlight.caption))
    return _loops_on_compounds(_renumber(rendered.to_string()))


# The renderer draws a targetless transition of a compound state (litestream's restart loop on
# `active`) to `<id>_anchor`, a node it never declares, so Graphviz draws a stray ellipse:
# point it at the compound's own invisible entry anchor instead.
_UNDECLARED_ANCHOR = re.compile(r"-> (\w+)_anchor \[")


def _loops_on_compounds(text: str) -> str:
    declared = set(re.findall(r"^(\w+) \[", text, re.MULTILINE))

    def entry(match: re.Match[str]) -> str:
        name = match.group(1)
        if f"{name}_anchor" in declared or f"{name}_anchor_in" not in declared:
            return match.group(0)
        return f"-> {name}_anchor_in ["

    return _UNDECLARED_ANCHOR.sub(entry, text)


def _renumber(text: str) -> str:
    numbers: dict[str, int] = {}

    def stable(match: re.Match[str]) -> str:
        n = numbers.setdefault(match.group(2), len(numbers) + 1)
        return f"{match.group(1)}{n}"

    return _OBJECT_IDS.sub(stable, text)


def _dot_caption(lines: list[str]) -> str:
    def cell(text: str, bold: bool = False) -> str:
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        inner = f"<b>{escaped}</b>" if bold else escaped
        return f'<tr><td align="left">{inner}</td></tr>'

    rows = [cell(lines[0], bold=True), *(cell(line) for line in lines[1:])]
    return f'<<table border="0" cellspacing="0" cellpadding="1">{"".join(rows)}</table>>'


# graphviz-pure (a dependency: a port of Graphviz's dot that writes the same bytes on every
# machine) first, a system Graphviz `dot` if that is all there is.
GRAPHVIZ_PROGRAMS = ("graphviz-pure", "dot")


def graphviz_program() -> str | None:
    """The Graphviz program to draw with, on PATH or beside the running interpreter (a venv
    that was not activated); None when there is none."""
    return next((found for name in GRAPHVIZ_PROGRAMS if (found := which(name))), None)


def image(fmt: str, highlight: Highlight | None = None) -> bytes:
    """SVG or PNG through Graphviz (GraphvizNotFoundError when there is none)."""
    data: bytes = run_graphviz(dot(highlight), fmt, prog=graphviz_program() or "dot")
    return data


def render(fmt: str, highlight: Highlight | None = None) -> bytes:
    """The diagram in `fmt` (one of FORMATS), as bytes ready to write."""
    if fmt == "mermaid":
        return mermaid(highlight).encode()
    if fmt == "dot":
        return dot(highlight).encode()
    if fmt in ("svg", "png"):
        return image(fmt, highlight)
    raise ValueError(f"unknown diagram format {fmt!r}; use one of {', '.join(FORMATS)}")


# ---- the live view ------------------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _clock(value: Any) -> str:
    parsed = _parse_time(value)
    return parsed.strftime("%H:%M:%S.%f")[:-3] if parsed else str(value)


def _first_line(text: Any) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= _ERROR_WIDTH else line[: _ERROR_WIDTH - 1] + "…"


def _transition_line(t: dict[str, Any]) -> str:
    duration = t.get("duration_ms")
    took = f"  {duration:g} ms" if isinstance(duration, (int, float)) else ""
    line = f"{_clock(t.get('at'))}  {t.get('from')} → {t.get('to')}  [{t.get('event')}]{took}"
    return f"{line}  error: {_first_line(t['error'])}" if t.get("error") else line


def highlight_from_status(status: dict[str, Any], now: datetime | None = None) -> Highlight:
    """Turn a daemon's `status` answer into the highlight and caption of a live diagram."""
    state = str(status.get("state", "?"))
    now = now or datetime.now(timezone.utc)
    since = _parse_time(status.get("since"))
    headline = f"{state}"
    if since is not None:
        elapsed = max(0.0, (now - since).total_seconds())
        headline += f" for {elapsed:.1f} s (since {since.strftime('%Y-%m-%d %H:%M:%S')} UTC)"
    where = status.get("base_dir")
    lines = [f"{where}: {headline}" if where else f"state: {headline}"]
    if status.get("error"):
        lines.append(f"error: {_first_line(status['error'])}")
    transitions = list(status.get("transitions") or [])[-CAPTION_TRANSITIONS:]
    if transitions:
        lines.append(f"last {len(transitions)} transitions (oldest first):")
        lines.extend(_transition_line(t) for t in transitions)
    return Highlight(state=state, failed=state == "failed", caption=lines)


def _daemon_status(base_dir: str) -> dict[str, Any]:
    from .control import call  # the daemon's control-socket client

    answer: dict[str, Any] = call(base_dir, "status")
    return answer


# ---- `juicefs-fsm diagram` ----------------------------------------------------------------------


def command(args: argparse.Namespace) -> int:
    """`juicefs-fsm diagram [--format F] [--output FILE] [--base-dir DIR]`.

    FsmErrors propagate to `fsm.cli.main`, which prints them as one line and picks the exit
    code (3 when no daemon answers for --base-dir)."""
    fmt: str = args.format
    output: str = args.output or "-"
    if fmt == "png" and output == "-" and sys.stdout.isatty():
        print("juicefs-fsm diagram: not writing PNG to a terminal; use --output FILE.png",
              file=sys.stderr)
        return 2
    highlight = highlight_from_status(_daemon_status(args.base_dir)) if args.base_dir else None
    try:
        data = render(fmt, highlight)
    except GraphvizError as exc:
        print(f"juicefs-fsm diagram: {fmt} needs Graphviz (pip install graphviz-pure, or "
              f"Debian: apt-get install graphviz); "
              f"--format mermaid and dot do not: {_first_line(exc)}", file=sys.stderr)
        return 1
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    try:
        Path(output).write_bytes(data)
    except OSError as exc:
        print(f"juicefs-fsm diagram: cannot write {output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


# ---- `python -m fsm.diagram --write diagrams/` --------------------------------------------------


EMBED_MARKER = f"<!-- diagrams/{BASENAME}.{SUFFIX['mermaid']} -->"
"""Put this line (or one that starts like it, e.g. `<!-- diagrams/lifecycle.mmd: generated by
make diagrams -->`) right above a ```mermaid block in README.md or docs/*.md: `--write` keeps
the block equal to the chart; `--check` and tests/test_diagrams.py fail when it is not."""
_EMBEDDED = re.compile(
    r"^(" + re.escape(EMBED_MARKER[:-4]) + r"[^\n]*-->)\n```mermaid\n.*?```",
    re.MULTILINE | re.DOTALL)


def _documents(directory: Path) -> list[Path]:
    """README.md and docs/*.md of the repository that holds `directory`."""
    root = directory.resolve().parent
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


def _embed(text: str, chart: str) -> str:
    return _EMBEDDED.sub(lambda m: f"{m.group(1)}\n```mermaid\n{chart}```", text)


def write_all(directory: Path) -> list[Path]:
    """Write lifecycle.{mmd,dot,svg,png} into `directory` and refresh the embedded copies;
    returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        path = directory / f"{BASENAME}.{SUFFIX[fmt]}"
        path.write_bytes(render(fmt))
        written.append(path)
    chart = mermaid()
    for doc in _documents(directory):
        text = doc.read_text(encoding="utf-8")
        if _embed(text, chart) != text:
            doc.write_text(_embed(text, chart), encoding="utf-8")
            written.append(doc)
    return written


def stale(directory: Path) -> list[Path]:
    """The committed text diagrams (and embedded Mermaid copies) that differ from the chart."""
    out = []
    for fmt in TEXT_FORMATS:
        path = directory / f"{BASENAME}.{SUFFIX[fmt]}"
        if not path.exists() or path.read_bytes() != render(fmt):
            out.append(path)
    chart = mermaid()
    for doc in _documents(directory):
        text = doc.read_text(encoding="utf-8")
        if _embed(text, chart) != text:
            out.append(doc)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fsm.diagram",
        description="Draw fsm.chart.Lifecycle into a directory (Mermaid, DOT, SVG, PNG).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", type=Path, help="(re)generate the diagrams")
    action.add_argument("--check", metavar="DIR", type=Path,
                        help="exit 1 if the committed .mmd/.dot differ from the chart")
    args = parser.parse_args(argv)
    if args.check is not None:
        outdated = stale(args.check)
        for path in outdated:
            print(f"{path} is out of date; run `make diagrams`", file=sys.stderr)
        return 1 if outdated else 0
    try:
        for path in write_all(args.write):
            print(path)
    except GraphvizError as exc:
        print(f"cannot draw SVG/PNG: {_first_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
