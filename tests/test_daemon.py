"""`juicefs-fsm run` as an init system sees it: a subprocess with a real NOTIFY_SOCKET (a datagram
socket bound here), driven through the CLI verbs, stopped with signals, and losing its mount."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fsm.daemon import Exit
from fsm.juicefs import mount_fstype
from fsm.sdnotify import parse
from tests.helpers import assert_nothing_left, mount_pids, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fuse")]

START_TIMEOUT = 30.0


class RunningDaemon:
    """A `python -m fsm run --local` child plus the notify socket it reports to."""

    def __init__(self, base_dir: Path, notify_address: str, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.base_dir = base_dir
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + notify_address[1:] if notify_address.startswith("@") else notify_address
        self.notify.bind(bind_to)
        self.messages: list[dict[str, str]] = []
        self.stderr_path = base_dir.parent / f"{base_dir.name}.stderr"
        environ = {**os.environ, "NOTIFY_SOCKET": notify_address, **(env or {})}
        environ.pop("FSM_LOG_FORMAT", None)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(base_dir),
                 "--volume-name", "test-volume", *args],
                env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        self.pids: list[int] = []

    def wait_notified(self, key: str, value: str | None = None,
                      timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The first notification (already received or new) carrying key[=value]."""
        def matches(m: dict[str, str]) -> bool:
            return key in m and (value is None or m[key] == value)

        for message in self.messages:
            if matches(message):
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = dict(parse(self.notify.recv(4096)))
            except TimeoutError:
                break
            self.messages.append(message)
            if matches(message):
                return message
        raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {self.messages}; "
                             f"daemon rc={self.proc.poll()}; log tail:\n{self.log_tail()}")

    def drain(self, timeout: float = 0.2) -> None:
        """Collect notifications that are still in flight."""
        self.notify.settimeout(timeout)
        while True:
            try:
                self.messages.append(dict(parse(self.notify.recv(4096))))
            except TimeoutError:
                return

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.messages if "STATUS" in m and "READY" not in m]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fsm", *args, "--base-dir",
                               str(self.base_dir)], capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def remember_children(self) -> None:
        """juicefs (supervisor and FUSE server) and litestream, for the leftover checks."""
        litestream = self.status()["pids"]["litestream"]
        self.pids = sorted({*mount_pids(self.base_dir / "data"), litestream,
                            *self.descendants()})

    def descendants(self) -> list[int]:
        """Every process below the daemon right now (from /proc/<pid>/task/*/children)."""
        found: list[int] = []
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    kids = [int(k) for k in (task / "children").read_text().split()]
                except FileNotFoundError:
                    continue
                found += kids
                todo += kids
        return found

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        """stderr is not a TTY: every line must be a JSON object."""
        lines = self.stderr_path.read_text().splitlines()
        stray = [line for line in lines if not line.startswith("{")]
        assert not stray, "non-JSON lines on stderr:\n" + "\n".join(stray[:20])
        return [json.loads(line) for line in lines]

    def clean_up(self) -> None:
        """Whatever the test did: no daemon, no child, no mount afterwards."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        mount_point = self.base_dir / "data"
        if mount_fstype(mount_point) is not None:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
        self.notify.close()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningDaemon] = []

    def start(*args: str, notify: str | None = None, name: str = "vol",
              env: dict[str, str] | None = None) -> RunningDaemon:
        daemon = RunningDaemon(tmp_path / name, notify or str(tmp_path / f"{name}.notify"), *args,
                               env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.clean_up()


def _one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("juicefs-fsm: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_daemon_notifies_serves_the_cli_and_stops_cleanly_on_sigterm(start_daemon: Any) -> None:
    daemon = start_daemon()
    ready = daemon.wait_notified("READY", "1")
    assert ready["STATUS"] == "ready" and ready["MAINPID"] == str(daemon.proc.pid)
    assert daemon.statuses() == ["acquiring_lease", "restoring_metadata", "formatting",
                                 "replicating", "mounting", "ready"]
    sock = daemon.base_dir / "fsm.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    status = daemon.status()
    assert status["state"] == "ready" and status["mode"] == "local"
    assert status["base_dir"] == str(daemon.base_dir) and status["since"]
    assert status["pids"]["juicefs"] and status["pids"]["litestream"]
    assert status["versions"]["juicefs"].startswith("1.4.")
    assert status["versions"]["litestream"]
    assert [t["to"] for t in status["transitions"]][-1] == "ready"
    daemon.remember_children()
    human = daemon.cli("status")
    assert human.returncode == 0 and "ready" in human.stdout and "litestream" in human.stdout

    active = Path(status["active_dir"])
    (active / "notes.txt").write_text("version 1\n")
    assert daemon.cli("checkpoint", "cp-1").returncode == 0
    _one_error_line(daemon.cli("checkpoint", "cp-1"), "already exists")
    (active / "notes.txt").write_text("version 2\n")
    listed = json.loads(daemon.cli("checkpoints", "--json").stdout)
    assert [(c["id"], bool(c["created_at"])) for c in listed] == [("cp-1", True)]

    restored = daemon.cli("restore", "cp-1", "--json")
    assert restored.returncode == 0, restored.stderr
    assert (active / "notes.txt").read_text() == "version 1\n"
    kept = json.loads(restored.stdout)["id"]
    assert kept.startswith("pre-restore-cp-1-")
    _one_error_line(daemon.cli("restore", "no-such-checkpoint"), "does not exist")
    assert daemon.cli("delete", "cp-1").returncode == 0
    listed = json.loads(daemon.cli("checkpoints", "--json").stdout)
    assert [c["id"] for c in listed] == [kept]

    # A second daemon on the same base_dir is refused and leaves the first one alone.
    second = subprocess.run([sys.executable, "-m", "fsm", "run", "--local", "--base-dir",
                             str(daemon.base_dir), "--volume-name", "test-volume"],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    assert second.returncode == Exit.START
    assert "already running" in second.stderr
    assert daemon.status()["state"] == "ready"

    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    daemon.drain()
    assert {"STOPPING": "1"} in daemon.messages
    assert daemon.statuses()[-2:] == ["stopping", "stopped"]
    assert_nothing_left(daemon.base_dir, daemon.pids)
    assert not sock.exists()
    # Not a TTY: every log line is a JSON object with a stable event name.
    events = daemon.log_events()
    assert {"transition", "daemon_ready", "daemon_exit"} <= {e["event"] for e in events}
    assert "\x1b[" not in daemon.stderr_path.read_text()


def test_daemon_exits_nonzero_and_leaves_nothing_when_its_mount_is_killed(
        start_daemon: Any) -> None:
    # An abstract-namespace NOTIFY_SOCKET, as systemd uses for some services.
    daemon = start_daemon(notify=f"@juicefs-fsm-test-{uuid.uuid4().hex}")
    daemon.wait_notified("READY", "1")
    daemon.remember_children()
    for pid in mount_pids(daemon.base_dir / "data"):
        os.kill(pid, signal.SIGKILL)

    assert daemon.wait_exit(30) == Exit.FAILED
    daemon.wait_notified("STATUS", "failed", timeout=1)
    assert_nothing_left(daemon.base_dir, daemon.pids)
    os.stat(daemon.base_dir / "data")  # no ENOTCONN: the stale mount was lazily unmounted
    failed = [e for e in daemon.log_events() if e["event"] == "failed"]
    assert failed and failed[0]["error_type"] == "MountLost"
    gone = daemon.cli("status")
    assert gone.returncode == 3 and "no daemon is running" in gone.stderr


def test_a_second_sigterm_hurries_a_stop_stuck_on_the_flush_and_keeps_the_data(
        start_daemon: Any) -> None:
    daemon = start_daemon("--upload-delay", "120", "--flush-timeout", "120")
    daemon.wait_notified("READY", "1")
    daemon.remember_children()
    payload = os.urandom(1 << 20)
    (daemon.base_dir / "data" / "active" / "fs" / "blob").write_bytes(payload)
    # The object store becomes unwritable (as S3 during an outage): staged blocks cannot be
    # uploaded, so the graceful stop waits for the flush until --flush-timeout.
    storage = daemon.base_dir / "local" / "test-volume"
    storage.rename(storage.with_name("away"))
    storage.write_text("not a directory: uploads fail")

    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_notified("STATUS", "stopping", timeout=10)
    time.sleep(1.0)
    assert daemon.proc.poll() is None, "the first SIGTERM must wait for the flush"
    hurried_at = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == Exit.FORCED
    assert time.monotonic() - hurried_at < 10
    assert_nothing_left(daemon.base_dir, daemon.pids)
    events = {e["event"] for e in daemon.log_events()}
    assert "stop_escalated" in events
    staged = [p for p in (daemon.base_dir / "cache").glob("*/rawstaging/**/*") if p.is_file()]
    assert staged, "blocks not yet uploaded must stay in rawstaging"

    # Storage back: the next run uploads what was staged; nothing written before is lost.
    storage.unlink()
    storage.with_name("away").rename(storage)
    again = start_daemon(notify=f"@juicefs-fsm-test-{uuid.uuid4().hex}")
    again.wait_notified("READY", "1")
    again.remember_children()
    assert (again.base_dir / "data" / "active" / "fs" / "blob").read_bytes() == payload
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    assert_nothing_left(again.base_dir, again.pids)


def test_a_start_failure_exits_3_and_leaves_nothing(start_daemon: Any, tmp_path: Path) -> None:
    base_dir = tmp_path / "vol"
    base_dir.mkdir()
    (base_dir / "data").write_text("a file where the mount point should be")
    daemon = start_daemon()
    assert daemon.wait_exit(30) == Exit.START
    daemon.drain()
    assert "READY" not in {key for m in daemon.messages for key in m}
    assert daemon.statuses()[-3:] == ["failed", "stopping", "stopped"]
    events = daemon.log_events()
    failure = next(e for e in events if e["event"] == "daemon_start_failed")
    assert failure["stage"] == "acquiring_lease" and "data" in failure["error"]
    assert not (base_dir / "fsm.sock").exists()
    assert mount_fstype(base_dir / "data") is None



def test_sigint_during_start_stops_with_exit_0_and_leaves_nothing(start_daemon: Any) -> None:
    daemon = start_daemon()
    daemon.wait_notified("STATUS", "mounting")
    daemon.pids = daemon.descendants()
    assert daemon.pids, "litestream is running by now"
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.wait_exit(30) == 0
    daemon.drain()
    assert "READY" not in {key for m in daemon.messages for key in m}
    assert daemon.statuses()[-2:] == ["stopping", "stopped"]
    assert_nothing_left(daemon.base_dir, daemon.pids)


def test_systemd_status_says_what_a_slow_stop_waits_for(start_daemon: Any) -> None:
    daemon = start_daemon()
    daemon.wait_notified("READY", "1")
    daemon.remember_children()
    # An operator's shell left in the volume.
    shell = subprocess.Popen(["sleep", "120"], cwd=daemon.base_dir / "data" / "active" / "fs")
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert shell.poll() is None, "the shell is not ours to kill"
    finally:
        shell.kill()
        shell.wait()
    daemon.drain()
    assert daemon.statuses()[-3:] == [
        "stopping",
        f"stopping: {daemon.base_dir}/data is in use by pid {shell.pid} (sleep 120); "
        "unmounting it anyway in 5 s",
        "stopped"]
    assert_nothing_left(daemon.base_dir, daemon.pids)


def test_a_third_signal_abandons_a_stuck_stop_and_still_leaves_nothing(
        start_daemon: Any, tmp_path: Path) -> None:
    # Fault injection: a juicefs whose `umount --flush` hangs, and (first on the daemon's PATH)
    # an `umount` whose `-f` hangs: the hurried stop's abort of the FUSE connection. Neither
    # can be made to hang on demand; everything else runs the real binaries.
    real = Path(sys.executable).parent / "juicefs"
    hanging = tmp_path / "juicefs-hanging-umount"
    hanging.write_text(f'#!/bin/sh\n[ "$1" = umount ] && exec sleep 300\nexec "{real}" "$@"\n')
    hanging.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "umount").write_text(
        f'#!/bin/sh\n[ "$1" = -f ] && exec sleep 300\nexec {shutil.which("umount")} "$@"\n')
    (bin_dir / "umount").chmod(0o755)
    daemon = start_daemon("--juicefs-bin", str(hanging), "--flush-timeout", "120",
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    daemon.wait_notified("READY", "1")
    daemon.remember_children()

    for _ in range(2):  # stop, then hurry: both get stuck in the hanging umount
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(15) == Exit.UNCLEAN
    assert "stop_abandoned" in {e["event"] for e in daemon.log_events()}
    assert_nothing_left(daemon.base_dir, daemon.pids)
    os.stat(daemon.base_dir / "data")


def test_the_shipped_systemd_unit_is_one_systemd_accepts_without_warnings(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # a check of a shipped file, not of FUSE or S3: no CI failure
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    shipped = Path(__file__).resolve().parent.parent / "contrib" / "juicefs-fsm.service"
    # The unit's ExecStart points at /opt/juicefs-fsm (docs/systemd.md); verify needs it to exist.
    unit = tmp_path / "juicefs-fsm.service"
    unit.write_text(shipped.read_text().replace(
        "/opt/juicefs-fsm/bin/juicefs-fsm", str(Path(sys.executable).parent / "juicefs-fsm")))
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    # Unknown keys, bad values and deprecated settings are only warnings: none may be there.
    assert str(unit) not in done.stderr, done.stderr
