"""The live view (`run --http`, fsm.web and fsm.metrics).

The server and the metrics are first checked in-process against a stand-in volume (no FUSE);
then as an operator sees them: a real daemon process, its page open in Debian's chromium
(driven by playwright), its /metrics scraped while operations run from the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fsm import metrics as metrics_module
from fsm.chart import LEAF_STATES
from fsm.config import Config, http_address
from fsm.errors import ConfigError
from fsm.metrics import Metrics, lease_age
from fsm.transitions import Transition
from fsm.web import WebServer, chart_markup, is_loopback
from tests.helpers import pid_alive, require, require_fuse

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 30.0
UPDATE_BOUND_MS = 1000  # the "within a second of each transition"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


# ---- configuration ------------------------------------------------------------------------


def test_http_address_is_host_and_port_and_off_by_default(tmp_path: Path) -> None:
    assert http_address("127.0.0.1:9567") == ("127.0.0.1", 9567)
    assert http_address("[::1]:80") == ("::1", 80)
    assert http_address("localhost:9567") == ("localhost", 9567)
    for bad in ("9567", ":9567", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000",
                "http://127.0.0.1:9567", "127.0.0.1:port", "a b:1"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            http_address(bad)
    assert Config(base_dir=tmp_path, local_mode=True).http == ""
    with pytest.raises(ConfigError, match="HOST:PORT"):
        Config(base_dir=tmp_path, local_mode=True, http="nonsense")


def test_http_comes_from_flag_env_and_toml(tmp_path: Path) -> None:
    from fsm.cli import build_parser, run_config

    toml = tmp_path / "fsm.toml"
    toml.write_text(f'base_dir = "{tmp_path}"\nlocal_mode = true\nhttp = "127.0.0.1:1111"\n')
    args = build_parser().parse_args(["run", "--config", str(toml)])
    assert run_config(args, environ={}).http == "127.0.0.1:1111"
    assert run_config(args, environ={"FSM_HTTP": "127.0.0.1:2222"}).http == "127.0.0.1:2222"
    args = build_parser().parse_args(["run", "--config", str(toml), "--http", "[::1]:3333"])
    assert run_config(args, environ={"FSM_HTTP": "127.0.0.1:2222"}).http == "[::1]:3333"


def test_loopback_is_told_apart_from_addresses_others_can_reach() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "vol.localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.1.5", "example.com"):
        assert not is_loopback(host), host


def test_lease_age_comes_from_age_s_or_the_last_refresh() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert lease_age(None) is None and lease_age({"held": True}) is None
    assert lease_age({"age_s": 2.5, "last_refresh": None}) == 2.5
    refreshed = (now - timedelta(seconds=7)).isoformat()
    assert lease_age({"age_s": None, "last_refresh": refreshed}, now) == 7.0
    assert lease_age({"last_refresh": now.timestamp() - 3}, now) == 3.0


# ---- the server and the metrics, in-process (a stand-in volume) ----------------------------


class StandIn:
    """The controller's public surface the live view uses, driven by the test."""

    def __init__(self) -> None:
        self.state = "uninitialized"
        self.history: list[Transition] = []
        self.observers: list[Callable[[Transition], None]] = []
        self.progress_observers: list[Callable[[str], None]] = []
        self.progress: str | None = None
        self.pids: dict[str, int | None] = {"juicefs": None, "litestream": None}
        self.restarts = 0
        self.lease: dict[str, Any] | None = None
        self.staged: dict[str, int] | None = {"blocks": 3, "bytes": 12345, "writing": 0}
        self.stats_hang = False
        self.juicefs = self
        self.checkpoints = ["cp-1"]
        self.deleted: list[str] = []

    def status(self) -> dict[str, Any]:
        status = {"state": self.state, "since": "2026-01-01T00:00:00+00:00",
                  "volume_name": "stand-in", "base_dir": "/nowhere", "pids": self.pids,
                  "restarts": {"litestream": self.restarts}, "error": None,
                  "progress": self.progress, "transitions": [t.to_json() for t in self.history]}
        if self.lease is not None:
            status["lease"] = self.lease
        return status

    def add_observer(self, observer: Callable[[Transition], None]) -> None:
        self.observers.append(observer)

    def add_progress_observer(self, observer: Callable[[str], None]) -> None:
        self.progress_observers.append(observer)

    def move(self, target: str, event: str, error: str | None = None) -> None:
        t = Transition(self.state, target, event, datetime.now(timezone.utc), 1.5, error)
        self.state = target
        self.history.append(t)
        for observer in self.observers:
            observer(t)

    def report(self, text: str) -> None:
        self.progress = text
        for observer in self.progress_observers:
            observer(text)

    async def staging(self) -> dict[str, int]:
        if self.stats_hang:
            await asyncio.sleep(3600)
        if self.staged is None:
            raise FileNotFoundError("no .stats")
        return self.staged

    async def list_checkpoints(self) -> list[Any]:
        class Listed:
            def __init__(self, cp_id: str) -> None:
                self.cp_id = cp_id

            def to_json(self) -> dict[str, Any]:
                return {"id": self.cp_id, "created_at": "2026-01-01T00:00:00+00:00"}

        return [Listed(cp) for cp in self.checkpoints]

    async def delete_checkpoint(self, cp_id: str) -> None:
        self.checkpoints.remove(cp_id)
        self.deleted.append(cp_id)

    async def browse(self, at: str) -> None:
        pass


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def start_volume(volume: StandIn) -> None:
    for target, event in (("acquiring_lease", "start"), ("restoring_metadata", "done"),
                          ("formatting", "done"),
                          ("replicating", "done"), ("mounting", "done"), ("ready", "done")):
        volume.move(target, event)


def test_metrics_follow_transitions_operations_and_status() -> None:
    volume = StandIn()
    metrics = Metrics(volume)  # type: ignore[arg-type]
    metrics.attach()
    start_volume(volume)
    volume.move("checkpointing", "checkpoint")
    volume.move("ready", "done.invoke.checkpointing")
    volume.move("checkpointing", "checkpoint")
    volume.move("ready", "done.invoke.checkpointing", error="clone failed")  # not timed
    volume.move("preparing_rollback", "rollback")  # a round trip through several states
    volume.move("stopping_live_volume", "done")
    volume.move("ready", "done")
    asyncio.run(volume.delete_checkpoint("cp-1"))
    volume.restarts = 2
    volume.lease = {"age_s": 4.25}
    got = samples(metrics.render().decode())
    assert {k: v for k, v in got.items() if k.startswith("juicefs_fsm_state{")} == {
        f'juicefs_fsm_state{{state="{s}"}}': float(s == "ready") for s in LEAF_STATES}
    assert got['juicefs_fsm_transitions_total{from="ready",to="checkpointing"}'] == 2
    assert got['juicefs_fsm_transitions_total{from="mounting",to="ready"}'] == 1
    count = 'juicefs_fsm_operation_duration_seconds_count{{operation="{}"}}'.format
    assert [got[count(op)] for op in metrics_module.OPERATIONS] == [1, 0, 1, 0, 1, 1, 0]
    assert volume.deleted == ["cp-1"]
    assert got["juicefs_fsm_litestream_restarts_total"] == 2
    assert got["juicefs_fsm_lease_age_seconds"] == 4.25
    assert "juicefs_fsm_writeback_bytes" not in got  # not mounted: no value
    assert got["process_resident_memory_bytes"] > 0
    volume.move("stopping", "stop")
    volume.move("stopped", "done")
    assert samples(metrics.render().decode())[count("stop")] == 1


async def test_writeback_is_read_only_while_mounted_and_never_blocks_a_scrape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "STAGING_WAIT", 0.05)
    volume = StandIn()
    metrics = Metrics(volume)  # type: ignore[arg-type]
    volume.pids["juicefs"] = 1234
    await metrics.refresh()
    assert samples(metrics.render().decode())["juicefs_fsm_writeback_bytes"] == 12345
    volume.staged = {"blocks": 1, "bytes": 7, "writing": 0}
    volume.stats_hang = True  # a hung mount: the scrape answers with the last value
    started = time.monotonic()
    await metrics.refresh()
    await metrics.refresh()  # still one read in flight, not two
    assert time.monotonic() - started < 1.0
    assert samples(metrics.render().decode())["juicefs_fsm_writeback_bytes"] == 12345
    pending = metrics._staging_read
    assert pending is not None and not pending.done()
    pending.cancel()
    volume.pids["juicefs"] = None
    await metrics.refresh()
    assert "juicefs_fsm_writeback_bytes" not in samples(metrics.render().decode())


async def test_the_server_serves_status_metrics_page_and_pushes_each_transition() -> None:
    volume = StandIn()
    port = free_port()
    server = WebServer(volume, f"127.0.0.1:{port}", status=volume.status)  # type: ignore[arg-type]
    server.bind()
    await server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/status") as r:
                assert r.status == 200 and await r.json() == volume.status()
            async with http.get(f"{base}/") as r:
                page = await r.text()
            assert '<span id="state">uninitialized</span>' in page
            for state in LEAF_STATES:
                assert f'data-state="{state}"' in page
            async with http.post(f"{base}/status") as r:
                assert r.status == 405  # read-only
            async with http.get(f"{base}/status", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 421  # DNS rebinding: a foreign name for our loopback

            async with http.get(f"{base}/events") as events:
                assert await _next_event(events) == ("status", volume.status())
                start_volume(volume)
                seen = [(await _next_event(events))[1]["state"] for _ in range(6)]
                assert seen == ["acquiring_lease", "restoring_metadata", "formatting",
                                "replicating", "mounting", "ready"]
                assert await _next_event(events) == ("checkpoints", [
                    {"id": "cp-1", "created_at": "2026-01-01T00:00:00+00:00"}])
                volume.report("uploading 3 blocks")
                assert (await _next_event(events))[1]["progress"] == "uploading 3 blocks"
                await volume.delete_checkpoint("cp-1")
                assert await _next_event(events) == ("checkpoints", [])
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
                assert r.headers["Content-Type"].startswith("text/plain")
            assert samples(text)['juicefs_fsm_state{state="ready"}'] == 1
    finally:
        await server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def _next_event(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    name, data = "", ""
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and name:
            return name, json.loads(data)


async def test_a_port_in_use_is_a_configuration_error_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = WebServer(StandIn(), f"127.0.0.1:{port}",  # type: ignore[arg-type]
                           status=dict)
        with pytest.raises(ConfigError, match="already in use"):
            server.bind()
        await server.close()
    with pytest.raises(ConfigError, match="cannot listen"):
        WebServer(StandIn(), "no-such-host.invalid:80", status=dict).bind()  # type: ignore[arg-type]


async def test_an_address_others_can_reach_is_warned_about(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import fsm.web

    # Nothing may listen beyond loopback in tests: the server binds 127.0.0.1, and is told
    # that this is an address others can reach.
    monkeypatch.setattr(fsm.web, "is_loopback", lambda host: False)
    volume = StandIn()
    server = WebServer(volume, f"127.0.0.1:{free_port()}",  # type: ignore[arg-type]
                       status=volume.status)
    with caplog.at_level(logging.WARNING):
        await server.start()
        await server.close()
    warned = [r for r in caplog.records if "live_view_not_loopback" in r.getMessage()]
    assert warned and warned[0].levelno == logging.WARNING
    assert "paths, pids and errors" in warned[0].getMessage()


def test_without_graphviz_the_page_lists_the_states(monkeypatch: pytest.MonkeyPatch) -> None:
    from statemachine.contrib.diagram.graphviz import GraphvizNotFoundError

    import fsm.diagram

    def no_graphviz(fmt: str) -> bytes:
        raise GraphvizNotFoundError("'dot' not found in PATH")

    monkeypatch.setattr(fsm.diagram, "image", no_graphviz)
    markup = chart_markup()
    assert markup.startswith('<ul class="states">')
    assert all(f'data-state="{s}"' in markup for s in LEAF_STATES)


def test_the_chart_is_the_diagram_with_each_leaf_marked() -> None:
    markup = chart_markup()
    require(markup.startswith("<svg"), "Graphviz (pip install graphviz-pure, or apt-get "
                                       "install graphviz)")
    assert "<?xml" not in markup and "<svg width=" not in markup
    marked = re.findall(r'class="node" data-state="([^"]+)"', markup)
    assert sorted(marked) == sorted(LEAF_STATES)


# ---- a real daemon, its page in a real browser ---------------------------------------------


class Daemon:
    """`python -m fsm run --local --http 127.0.0.1:<port>` as a child process."""

    def __init__(self, base_dir: Path, port: int, log: Path) -> None:
        self.base_dir, self.port = base_dir, port
        self.url = f"http://127.0.0.1:{port}/"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FSM_HTTP")}
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(base_dir),
                 "--volume-name", "test-volume", "--http", f"127.0.0.1:{port}"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self.log = log
        wait_for(lambda: self.http_status().get("state") == "ready" or self.proc.poll(),
                 "the daemon to be ready", START_TIMEOUT)
        assert self.proc.poll() is None, log.read_text()[-3000:]

    def http_status(self) -> dict[str, Any]:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                pass
        except OSError:
            return {}
        return dict(json.loads(self.get("status")))

    def get(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return str(answer.read().decode())

    def metrics(self) -> dict[str, float]:
        return samples(self.get("metrics"))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "fsm", *args, "--base-dir",
                               str(self.base_dir)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[int], Daemon]]:
    require_fuse()
    started: list[Daemon] = []

    def start(port: int) -> Daemon:
        daemon = Daemon(tmp_path / "vol", port, tmp_path / "daemon.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
        assert not pid_alive(daemon.proc.pid)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright (pip install playwright)")
        raise
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    # Every state the page shows, with the browser's wall clock (ms) when it showed it.
    page.evaluate("""() => {
        window.seen = [];
        const state = document.getElementById('state');
        const note = () => window.seen.push([state.textContent, Date.now()]);
        new MutationObserver(note).observe(state, {childList: true, characterData: true,
                                                   subtree: true});
        window.notReloaded = true;
    }""")
    return page


def shown(page: Any) -> dict[str, Any]:
    """What a person sees: the state, the highlighted node, the rows, the checkpoints."""
    return dict(page.evaluate("""() => ({
        state: document.getElementById('state').textContent,
        active: [...document.querySelectorAll('#chart .active')].map(n => n.dataset.state),
        rows: [...document.querySelectorAll('#transitions tr')].map(
            tr => [...tr.children].map(td => td.textContent)),
        checkpoints: [...document.querySelectorAll('#checkpoints li[data-id]')].map(
            li => li.dataset.id),
        details: Object.fromEntries([...document.querySelectorAll('#details dd')].map(
            dd => [dd.dataset.key, dd.textContent])),
        connection: document.getElementById('conn').textContent,
        notReloaded: window.notReloaded === true,
    })"""))


def _js_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _rows(status: dict[str, Any]) -> list[list[str]]:
    return [[t["at"][11:23], t["from"], t["to"], t["event"], f"{_js_number(t['duration_ms'])} ms",
             t["error"] or ""] for t in reversed(status["transitions"])]


def _wait_shown(page: Any, condition: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 10.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = shown(page)
        return condition(last)

    try:
        wait_for(check, what, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page shows {last}") from None
    return last


@pytest.mark.e2e
def test_the_page_shows_the_daemon_and_follows_a_checkpoint_from_the_cli(
        daemons: Callable[[int], Daemon], browser: Any, record_property: Any) -> None:
    daemon = daemons(free_port())
    page = open_page(browser, daemon.url)
    status = daemon.status()
    seen = _wait_shown(page, lambda s: s["connection"] == "live", "the event stream to open")
    assert seen["state"] == status["state"] == "ready"
    assert seen["active"] == ["ready"]
    assert seen["rows"] == _rows(status)
    assert seen["checkpoints"] == []
    assert str(status["pids"]["juicefs"]) in seen["details"]["pids"]
    assert seen["details"]["volume_name"] == "test-volume"
    assert seen["details"]["versions"] == ", ".join(f"{k}: {v}"
                                                    for k, v in status["versions"].items())
    served = json.loads(daemon.get("status"))
    for answer in (served, status):
        answer["daemon"].pop("uptime_s")
    assert served == status  # /status is `juicefs-fsm status --json`
    before = daemon.metrics()
    assert before['juicefs_fsm_state{state="ready"}'] == 1
    assert before['juicefs_fsm_operation_duration_seconds_count{operation="start"}'] == 1
    assert "juicefs_fsm_writeback_bytes" in before

    Path(status["active_dir"], "notes.txt").write_text("hello\n")
    daemon.cli("checkpoint", "cp-1")
    seen = _wait_shown(page, lambda s: s["checkpoints"] == ["cp-1"], "cp-1 listed, no reload")
    assert seen["notReloaded"] and seen["state"] == "ready" and seen["active"] == ["ready"]
    status = daemon.status()
    assert seen["rows"] == _rows(status)
    assert [r[1:3] for r in seen["rows"][:2]] == [["checkpointing", "ready"],
                                                  ["ready", "checkpointing"]]
    # Latency: from each transition (its time in the status) to the page showing its state.
    shown_at = page.evaluate("() => window.seen")
    latencies = []
    for t in status["transitions"][-2:]:
        at_ms = datetime.fromisoformat(t["at"]).timestamp() * 1000
        when = [ms for state, ms in shown_at if state == t["to"] and ms >= at_ms - 5]
        assert when, f"{t['to']} never shown: {shown_at}"
        latencies.append(when[0] - at_ms)
    record_property("update_latency_ms", latencies)
    print(f"\nlive view update latency (transition -> DOM): {latencies} ms")
    assert max(latencies) < UPDATE_BOUND_MS

    after = daemon.metrics()
    key = 'juicefs_fsm_transitions_total{from="ready",to="checkpointing"}'
    assert after[key] == before.get(key, 0) + 1
    count = 'juicefs_fsm_operation_duration_seconds_count{operation="checkpoint"}'
    assert after[count] == before[count] + 1
    daemon.cli("delete", "cp-1")  # a targetless transition: timed around the call
    _wait_shown(page, lambda s: s["checkpoints"] == [], "cp-1 gone from the page")
    assert daemon.metrics()[
        'juicefs_fsm_operation_duration_seconds_count{operation="delete"}'] == 1
    page.close()


@pytest.mark.e2e
def test_the_page_sees_the_daemon_stop_and_reconnects_to_the_next_one(
        daemons: Callable[[int], Daemon], browser: Any, record_property: Any) -> None:
    port = free_port()
    first = daemons(port)
    page = open_page(browser, first.url)
    _wait_shown(page, lambda s: s["connection"] == "live", "the event stream to open")
    cpu, rss = _idle_usage(first.proc.pid, seconds=5.0)
    record_property("idle_cpu_percent", cpu)
    record_property("idle_rss_mib", rss)
    print(f"\ndaemon idle with the page open: {cpu:.2f}% CPU, {rss:.1f} MiB RSS")
    assert cpu < 5 and rss < 200

    assert first.stop() == 0
    seen = _wait_shown(page, lambda s: s["state"] == "stopped" and "reconnecting"
                       in s["connection"], "the stop shown, then the connection lost")
    assert seen["active"] == ["stopped"]
    with pytest.raises(OSError):  # the server is gone with the daemon
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    second = daemons(port)
    pid = f"pid: {second.proc.pid}"
    seen = _wait_shown(page, lambda s: s["state"] == "ready" and s["connection"] == "live"
                       and pid in s["details"].get("daemon", ""),
                       "the page back on the new daemon, without a reload", timeout=15)
    assert seen["notReloaded"] and seen["active"] == ["ready"]
    assert seen["rows"] == _rows(second.status())
    page.close()


def _idle_usage(pid: int, seconds: float) -> tuple[float, float]:
    """The process's CPU (percent of one core) over `seconds`, and its RSS in MiB."""
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    hz = os.sysconf("SC_CLK_TCK")
    began, t0 = ticks(), time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a wait for a condition
    used = (ticks() - began) / hz / (time.monotonic() - t0) * 100
    rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if line.startswith("VmRSS:"))
    return used, rss_kib / 1024


def test_run_refuses_a_port_in_use_with_exit_2_and_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FSM_HTTP")}
        done = subprocess.run(
            [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(tmp_path / "v"),
             "--volume-name", "test-volume", "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0]
    assert not (tmp_path / "v" / "fsm.sock").exists()
    bad = subprocess.run([sys.executable, "-m", "fsm", "run", "--local", "--base-dir",
                          str(tmp_path / "v"), "--http", "nonsense"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "juicefs-fsm: error: http 'nonsense' is not HOST:PORT; use HOST:PORT, e.g. "
        "127.0.0.1:9567 (loopback) or [::1]:9567"]
