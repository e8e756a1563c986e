"""The diagrams are the chart: the committed ones are current, every state, action and transition
is drawn, and `juicefs-fsm diagram` draws the chart (live, with --base-dir) in every format."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fsm import diagram
from fsm.chart import Lifecycle
from fsm.cli import main
from tests.helpers import assert_nothing_left, require
from tests.test_daemon import RunningDaemon

REPO = Path(__file__).resolve().parent.parent
DIAGRAMS = REPO / "diagrams"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _graphviz() -> None:
    require(diagram.graphviz_program() is not None,
            "Graphviz draws SVG/PNG: graphviz-pure (a dependency) or Debian's graphviz")


def _status(state: str, count: int = 3, error: str | None = None) -> dict[str, Any]:
    path = ["uninitialized", "acquiring_lease", "restoring_metadata", "formatting",
            "replicating", "mounting"] + ["ready", "checkpointing"] * 10
    transitions = []
    for i in range(count):
        at = NOW - timedelta(seconds=count - i)
        transitions.append({"from": path[i], "to": path[i + 1], "event": f"event-{i}",
                            "at": at.isoformat(), "duration_ms": 10.0 + i, "error": None})
    if error is not None:
        transitions.append({"from": path[count], "to": state, "event": "mount_lost",
                            "at": NOW.isoformat(), "duration_ms": 5.0, "error": error})
    return {"state": state, "since": (NOW - timedelta(seconds=42)).isoformat(),
            "base_dir": "/srv/vol", "error": error, "transitions": transitions}


# ---- the committed diagrams ---------------------------------------------------------------------

def test_committed_diagrams_are_what_the_chart_draws_now() -> None:
    outdated = diagram.stale(DIAGRAMS)
    assert not outdated, (
        f"{[str(p.relative_to(REPO)) for p in outdated]} differ from fsm.chart.Lifecycle: "
        "run `make diagrams` (python -m fsm.diagram --write diagrams/) and commit the result")


def test_committed_images_are_there() -> None:
    assert (DIAGRAMS / "lifecycle.png").read_bytes().startswith(b"\x89PNG\r\n")
    assert "<svg" in (DIAGRAMS / "lifecycle.svg").read_text()


def test_drawing_twice_gives_the_same_text() -> None:
    assert diagram.dot() == diagram.dot()
    assert diagram.mermaid() == diagram.mermaid()
    # No id()-derived node names (they change from run to run).
    assert not re.search(r"\d{6,}", diagram.dot())


def test_every_state_shows_its_action() -> None:
    text, dot = diagram.mermaid(), diagram.dot()
    for state in Lifecycle.states_map.values():
        assert f" as {state.id}" in text
        for kind, callbacks in (("invoke", state.invoke), ("entry", state.enter)):
            for spec in callbacks:
                if not spec.is_convention:
                    assert f"{state.id} : {kind} / {spec.func}" in text
                    assert f"{kind} / {spec.func}" in dot


def test_every_transition_is_drawn_with_its_event() -> None:
    lines = diagram.mermaid().splitlines()
    for state in Lifecycle.states_map.values():
        for t in state.transitions:
            if t.initial:
                continue
            target = t.targets[0].id if t.targets else t.source.id
            events = {str(e) for e in t.events}
            # The history's spelling (error.execution), not the alias (error_execution).
            label = min(events, key=lambda e: "." not in e)
            label = "done" if label.startswith("done.invoke.") else label
            arrows = [line for line in lines
                      if line.strip().startswith(f"{t.source.id} --> {target} :")]
            assert any(label in arrow for arrow in arrows), (t, arrows)


def test_the_transition_action_is_on_its_arrow() -> None:
    assert "ready --> ready : delete_checkpoint / remove_checkpoint" in diagram.mermaid()


# ---- the live view ------------------------------------------------------------------------------

def test_live_view_highlights_only_the_current_state() -> None:
    live = diagram.highlight_from_status(_status("mounting"), now=NOW)
    text = diagram.mermaid(live)
    assert re.findall(r"^\s*(\w+):::current$", text, re.MULTILINE) == ["mounting"]
    assert 'title: "/srv/vol: mounting for 42.0 s (since 2026-01-02 03:03:23 UTC)"' in text
    dot = diagram.dot(live)
    filled = re.findall(r"^(\w+) \[.*fillcolor=turquoise", dot, re.MULTILINE)
    assert filled == ["mounting"]


def test_live_caption_lists_the_last_transitions_with_their_errors() -> None:
    live = diagram.highlight_from_status(
        _status("failed", count=15, error="juicefs (pid 7) exited with 1 while in use:\ntail"),
        now=NOW)
    text = diagram.mermaid(live)
    note = text[text.index("note left of uninitialized"):]
    listed = [line.strip() for line in note.splitlines()[1:-1]]
    assert listed[0] == "error: juicefs (pid 7) exited with 1 while in use:"
    assert listed[1] == f"last {diagram.CAPTION_TRANSITIONS} transitions (oldest first):"
    assert len(listed) == 2 + diagram.CAPTION_TRANSITIONS
    assert "event-6" in listed[2]  # the oldest ones are left out
    assert listed[-1].startswith("03:04:05.000  checkpointing \u2192 failed  [mount_lost]")
    assert listed[-1].endswith("  5 ms  error: juicefs (pid 7) exited with 1 while in use:")
    assert "tail" not in note  # one line per error
    assert "fill:#FF8A80" in text  # failed is drawn red
    assert "fillcolor=salmon" in diagram.dot(live)
    assert "checkpointing \u2192 failed  [mount_lost]" in diagram.dot(live)


def test_caption_text_cannot_break_the_mermaid_syntax() -> None:
    nasty = "a --> b; end note <b>"
    text = diagram.mermaid(diagram.highlight_from_status(_status("failed", error=nasty), NOW))
    note = text[text.index("note left of"):]
    assert note.count("end note") == 1 and "-->" not in note and ";" not in note
    assert "<b>" not in note


# ---- the command ---------------------------------------------------------------------------------

def test_diagram_prints_the_mermaid_chart_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagram"]) == 0
    assert capsys.readouterr().out == (DIAGRAMS / "lifecycle.mmd").read_text()


@pytest.mark.parametrize(("fmt", "magic"), [("mermaid", b"stateDiagram-v2"),
                                            ("dot", b"digraph Lifecycle {"),
                                            ("svg", b"<svg"), ("png", b"\x89PNG\r\n")])
def test_diagram_writes_each_format(tmp_path: Path, fmt: str, magic: bytes) -> None:
    if fmt in ("svg", "png"):
        _graphviz()
    out = tmp_path / f"chart.{fmt}"
    assert main(["diagram", "--format", fmt, "--output", str(out)]) == 0
    assert magic in out.read_bytes()[:400]


def test_python_dash_m_fsm_diagram_works_as_well() -> None:
    done = subprocess.run([sys.executable, "-m", "fsm", "diagram", "--format", "dot"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout == (DIAGRAMS / "lifecycle.dot").read_text()
    check = subprocess.run([sys.executable, "-m", "fsm.diagram", "--check", str(DIAGRAMS)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_write_regenerates_everything_and_embedded_copies(tmp_path: Path) -> None:
    _graphviz()
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "guide.md"
    doc.write_text(f"intro\n\n{diagram.EMBED_MARKER}\n```mermaid\nold chart\n```\n\nmore\n")
    out = tmp_path / "diagrams"
    assert diagram.stale(out) == [out / "lifecycle.mmd", out / "lifecycle.dot", doc]
    assert diagram.main(["--check", str(out)]) == 1
    assert diagram.main(["--write", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "lifecycle.dot", "lifecycle.mmd", "lifecycle.png", "lifecycle.svg"]
    assert doc.read_text() == (f"intro\n\n{diagram.EMBED_MARKER}\n```mermaid\n"
                               f"{diagram.mermaid()}```\n\nmore\n")
    assert diagram.stale(out) == []


def test_diagram_of_a_base_dir_without_daemon_says_so_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["diagram", "--base-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3
    assert err.count("\n") == 1 and "no daemon is running for" in err and str(tmp_path) in err


def test_diagram_with_base_dir_draws_the_daemons_state(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The rendering of a status answer; the real daemon round trip is in the test below."""
    import fsm.control

    asked = []

    def call(base_dir: Any, op: str, **kwargs: Any) -> dict[str, Any]:
        asked.append((str(base_dir), op))
        return _status("replicating")

    monkeypatch.setattr(fsm.control, "call", call)
    assert main(["diagram", "--base-dir", "/srv/vol"]) == 0
    assert asked == [("/srv/vol", "status")]
    assert "replicating:::current" in capsys.readouterr().out


def test_png_is_not_written_to_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert diagram.command(argparse.Namespace(format="png", output="-", base_dir=None)) == 2
    assert "--output" in capsys.readouterr().err


@pytest.fixture
def daemon(fuse: None, tmp_path: Path) -> Iterator[RunningDaemon]:
    """A real `juicefs-fsm run --local` (the daemon tests' helper); never left running."""
    running = RunningDaemon(tmp_path / "vol", str(tmp_path / "vol.notify"))
    try:
        yield running
    finally:
        running.clean_up()


@pytest.mark.e2e
def test_diagram_of_a_running_daemon_shows_where_it_is(
        daemon: RunningDaemon, tmp_path: Path) -> None:
    daemon.wait_notified("READY", "1")
    daemon.remember_children()
    done = daemon.cli("diagram")
    assert done.returncode == 0, done.stderr
    assert re.findall(r"^\s*(\w+):::current$", done.stdout, re.MULTILINE) == ["ready"]
    assert "mounting \u2192 ready  [done.invoke.mounting]" in done.stdout
    image = tmp_path / "live.svg"
    _graphviz()
    done = daemon.cli("diagram", "--format", "svg", "--output", str(image))
    assert done.returncode == 0, done.stderr
    svg = image.read_text()
    assert 'fill="turquoise"' in svg and "ready for " in svg
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, daemon.log_tail()
    assert_nothing_left(daemon.base_dir, daemon.pids)
