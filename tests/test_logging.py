"""Logging etiquette: the library writes to the stdlib logger `fsm` and configures nothing, so a
program that embeds it sees only what it asks for; the daemon renders every event as JSON."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from fsm.logs import configure, get_logger
from fsm.proc import BENIGN, BENIGN_WITH_SQLITE, line_level
from tests.helpers import capture_events, logging_restored, require_fuse

_EMBEDDED = textwrap.dedent("""
    import asyncio, logging, sys
    from fsm import Config, JuiceFS

    if sys.argv[2] == "info":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    async def main():
        cfg = Config(base_dir=sys.argv[1], local_mode=True, volume_name="test-volume")
        async with JuiceFS(cfg) as jfs:
            await jfs.checkpoint("cp-1")
        print(len(jfs.history))

    asyncio.run(main())
""")


def _embed(tmp_path: Path, logging_setup: str) -> subprocess.CompletedProcess[str]:
    require_fuse()
    return subprocess.run([sys.executable, "-c", _EMBEDDED, str(tmp_path / "vol"), logging_setup],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_a_program_that_configures_no_logging_gets_no_output(tmp_path: Path) -> None:
    done = _embed(tmp_path, "none")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert int(done.stdout) > 0, "the program's own output only"


@pytest.mark.e2e
def test_a_program_that_logs_at_info_sees_every_transition_and_no_chatter(tmp_path: Path) -> None:
    done = _embed(tmp_path, "info")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    transitions = [line for line in lines if line.startswith("INFO fsm transition ")]
    assert len(transitions) == int(done.stdout)
    assert "from=uninitialized to=acquiring_lease trigger=start" in transitions[0]
    assert "to=stopped" in transitions[-1]
    assert not [line for line in lines if "child_output" in line or "DEBUG" in line]
    assert all(line.startswith(("INFO fsm ", "WARNING fsm ")) for line in lines), lines


def test_importing_and_using_the_library_leaves_structlog_and_logging_unconfigured() -> None:
    script = textwrap.dedent("""
        import logging, structlog
        import fsm, fsm.cli, fsm.daemon, fsm.diagram, fsm.logs
        fsm.JuiceFS(fsm.Config(base_dir="/tmp/unused", local_mode=True))
        fsm.logs.get_logger().warning("nobody_listens")
        assert not structlog.is_configured()
        assert logging.getLogger().handlers == []
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_events_reach_a_plain_logging_handler_with_their_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    library = logging.getLogger("fsm")
    saved = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        log = get_logger(volume="v1")
        log.debug("child_output", line="below the level")
        log.info("transition", **{"from": "ready", "to": "stopping", "duration_ms": 1.5})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("crashed", op="status")
    finally:
        library.removeHandler(handler)
        library.setLevel(saved)
    text = out.getvalue()
    assert text.startswith("INFO fsm transition volume=v1 from=ready to=stopping "
                           "duration_ms=1.5\nERROR fsm crashed volume=v1 op=status\n")
    assert "RuntimeError: boom" in text, "the traceback, as logging shows it"
    assert "below the level" not in text


def test_the_daemons_handler_renders_json_lines_with_level_and_timestamp() -> None:
    out = io.StringIO()
    with logging_restored():
        configure("json", logging.INFO, stdlib=True, stream=out)
        get_logger(volume="v1").info("transition", **{"from": "a", "to": "b"})
        get_logger().debug("child_output", line="hidden at info")
        logging.getLogger("asyncio").warning("a foreign %s", "record")
        try:
            raise ValueError("bad")
        except ValueError:
            get_logger().exception("control_request_crashed")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["transition", "a foreign record",
                                            "control_request_crashed"]
    first = events[0]
    assert (first["from"], first["to"], first["volume"], first["level"]) == ("a", "b", "v1", "info")
    assert first["timestamp"].endswith("Z")
    assert events[1]["level"] == "warning" and events[1]["logger"] == "asyncio"
    assert "ValueError: bad" in events[2]["exception"]


@pytest.mark.parametrize(("line", "level"), [
    ("2026/11/28 17:17:51 juicefs[1] <WARNING>: Set storage tier: not supported [x.go:1]",
     "debug"),
    ("2026/11/28 juicefs[1] <WARNING>: CAP_SYS_RESOURCE is needed for PR_SET_IO_FLUSHER", "debug"),
    ("2026/11/28 juicefs[1] <WARNING>: Metadata backup is disabled [x.go:1]", "debug"),
    ("2026/11/28 juicefs[1] <WARNING>: upload chunks/0/1_0_4: timeout [x.go:1]", "warning"),
    ("2026/11/28 juicefs[1] <ERROR>: write inode 2: input/output error", "error"),
    ("2026/11/28 juicefs[1] <INFO>: Mounting volume v at /x ... [x.go:1]", "debug"),
    ('time=2026-11-28T17:17:51Z level=WARN msg="sync error" err=timeout', "warning"),
    ('time=2026-11-28T17:17:51Z level=INFO msg="replicating to"', "debug"),
    ("txid: 2", "debug"),
])
def test_child_output_is_debug_except_warnings_and_errors_that_matter(line: str,
                                                                      level: str) -> None:
    assert line_level(line) == level


def test_a_slow_first_query_is_noise_for_sqlite_only() -> None:
    line = "juicefs[1] <WARNING>: The latency to database is too high: 11.6ms [sql.go:513]"
    assert line_level(line) == "warning"
    assert line_level(line, (*BENIGN, *BENIGN_WITH_SQLITE)) == "debug"


@pytest.mark.e2e
def test_the_daemon_at_log_level_debug_shows_child_output(tmp_path: Path) -> None:
    from tests.test_daemon import RunningDaemon

    require_fuse()
    daemon = RunningDaemon(tmp_path / "vol", str(tmp_path / "vol.notify"), "--log-level", "debug")
    try:
        daemon.wait_notified("READY", "1")
        daemon.remember_children()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log_tail()
    finally:
        daemon.clean_up()
    events = daemon.log_events()
    output = [e for e in events if e["event"] == "child_output"]
    assert {"juicefs", "litestream"} <= {e["tool"] for e in output}
    assert "debug" in {e["level"] for e in output}
    assert not [e for e in output if e["level"] != "debug" and line_level(e["line"]) == "debug"]
    assert any(e["event"] == "transition" and e["level"] == "info" for e in events)


def test_capture_events_sees_the_library_below_the_hosts_level() -> None:
    with capture_events() as events:
        get_logger().debug("child_output", line="x")
        structlog.get_logger("test").info("a_tests_own_event")
    assert [(e["event"], e["log_level"]) for e in events] == [("child_output", "debug"),
                                                              ("a_tests_own_event", "info")]
