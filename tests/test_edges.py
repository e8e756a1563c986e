"""Edges of the input space (issue 15): ids and times that only look valid, numbers no clock or
disk can hold, a control socket fed garbage or left idle, a base_dir that cannot work, volumes
inside volumes, and a stop signal in the daemon's first moments. Every refusal is one line that
says what to change, before anything is created on disk."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fsm import Config, ConfigError, FsmError, JuiceFS, OutsideWindow, StartError
from fsm import control as control_module
from fsm.checkpoints import validate_id
from fsm.cli import main
from fsm.control import ControlServer, call
from fsm.errors import InvalidCheckpointId
from fsm.juicefs import mount_fstype
from fsm.preflight import check_before_start
from fsm.timepoints import parse_time
from tests.helpers import pid_alive, require, require_fuse

WIRING = ("needs the lead's wiring of fsm.preflight.check_before_start(config) at the very "
          "beginning of JuiceFS.start()")


def _one_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _tree(path: Path) -> list[str]:
    """Everything under path (names relative to it), to show nothing was created."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- item 1: whole-string matching ---------------------------------------------------------

@pytest.mark.parametrize("cp_id", ["..\n", ".\n", "cp-1\n"])
def test_an_id_with_a_newline_is_refused(cp_id: str) -> None:
    with pytest.raises(InvalidCheckpointId):
        validate_id(cp_id)


def test_the_cli_refuses_a_newline_id_before_asking_the_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: it went to the daemon, which created a folder named "..\n" (here: exit 3, no daemon).
    assert main(["checkpoint", "--base-dir", str(tmp_path), "--", "..\n"]) == 1
    _one_line(capsys.readouterr().err, "invalid checkpoint id")


async def test_the_api_refuses_a_newline_id_before_touching_disk(tmp_path: Path) -> None:
    jfs = JuiceFS(Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume"))
    for operation in (jfs.checkpoint, jfs.restore, jfs.delete_checkpoint):
        with pytest.raises(InvalidCheckpointId):
            await operation("cp-1\n")
    assert not (tmp_path / "vol").exists()


# ---- item 5: client flags and times --------------------------------------------------------

@pytest.mark.parametrize("value", ["-99999999999999d", "99999999999999", "1" * 400,
                                   "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_time_no_datetime_can_hold_is_refused_as_out_of_range(value: str) -> None:
    with pytest.raises(OutsideWindow, match="out of range"):
        parse_time(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300, 10 ** 30])
def test_a_number_no_clock_can_show_is_refused_as_out_of_range(value: float) -> None:
    with pytest.raises(OutsideWindow, match="out of range"):
        parse_time(value)


@pytest.mark.parametrize("argv", [["rollback", "--at=-99999999999999d"],
                                  ["browse", "--at=99999999999999"],
                                  ["browse", "--at=9999-12-31T23:59:59-01:00"],
                                  ["browse", "--at=soon"]])
def test_an_impossible_at_is_a_one_line_usage_error(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--base-dir", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "--at")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e9", "99999999999999", "soon"])
def test_a_bad_client_timeout_is_a_one_line_usage_error(
        tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["status", "--base-dir", str(tmp_path), f"--timeout={value}"])
    assert info.value.code == 2
    _one_line(capsys.readouterr().err, "--timeout", value)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0.0])
def test_the_client_api_refuses_a_bad_timeout(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        call(tmp_path, "status", timeout=timeout)


# ---- item 6: the control socket ------------------------------------------------------------

@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ControlServer]:
    jfs = JuiceFS(Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume"))
    server = ControlServer(jfs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _exchange(server: ControlServer, payload: bytes) -> list[dict[str, Any]]:
    """Send payload, read every answer line until the server hangs up (bounded)."""
    reader, writer = await asyncio.open_unix_connection(str(server.path), limit=1 << 20)
    writer.write(payload)
    await writer.drain()
    answers: list[dict[str, Any]] = []
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                break
            answers.append(json.loads(line))
            if len(answers) == payload.count(b"\n"):
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answers


@pytest.mark.parametrize(("payload", "fragment"), [
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "longer than"),
    (b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"\n", "nested deeper than"),
    (b'{"op": "browse", "at": ' + b"1" * 5000 + b"}\n", "5000 characters"),
    (b'{"op": "browse", "at": 1e999}\n', "out of range"),
    (b'{"op": "browse", "at": NaN}\n', "NaN"),
    (b'{"op": "checkpoint", "id": "..\\n"}\n', "invalid checkpoint id"),
    (b"\xff\xfe\n", "not UTF-8"),
])
async def test_a_malformed_request_gets_a_clear_error_not_a_crash(
        served: ControlServer, payload: bytes, fragment: str) -> None:
    answers = await _exchange(served, payload)
    assert len(answers) == 1, answers
    assert answers[0]["ok"] is False
    assert answers[0]["type"] in {"ControlError", "InvalidCheckpointId"}, answers[0]
    assert fragment in answers[0]["error"]


async def test_an_idle_connection_is_told_and_closed(
        served: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_module, "IDLE_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_unix_connection(str(served.path))
    writer.write(b'{"op": "sta')  # never finished
    started = time.monotonic()
    line = await asyncio.wait_for(reader.readline(), 10)
    assert json.loads(line)["error"].startswith("no complete request for 0.3s")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # hung up
    assert time.monotonic() - started < 5
    writer.close()
    assert not served._connections  # its descriptor is given back


async def test_connections_beyond_the_cap_are_answered_and_closed(
        served: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_module, "MAX_CONNECTIONS", 3)
    silent = [await asyncio.open_unix_connection(str(served.path)) for _ in range(3)]
    deadline = time.monotonic() + 5
    while len(served._connections) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_unix_connection(str(served.path))
    answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
    assert answer["ok"] is False and "too many open connections" in answer["error"]
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    for _, w in silent:
        w.close()
    deadline = time.monotonic() + 5
    while served._connections and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    status = await asyncio.to_thread(call, served.path.parent, "status")
    assert status["state"] == "uninitialized"


# ---- items 2, 7: a base_dir that cannot work -----------------------------------------------

def _cfg(base_dir: Path) -> Config:
    return Config(base_dir=base_dir, local_mode=True, volume_name="test-volume")


@contextlib.contextmanager
def _tmpfs(at: Path, *options: str) -> Iterator[Path]:
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "root and mount(8)")
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=4m", *options]),
                    "fsm-test-tmpfs", str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[Path]:
    require(shutil.which("chattr") is not None and os.geteuid() == 0, "root and chattr")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    require(done.returncode == 0, f"chattr +i on this filesystem ({done.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_writable_base_dir_passes_and_the_probe_leaves_nothing(tmp_path: Path) -> None:
    check_before_start(_cfg(tmp_path / "new" / "vol"))
    assert _tree(tmp_path) == []
    (tmp_path / "old").mkdir()
    check_before_start(_cfg(tmp_path / "old"))
    assert _tree(tmp_path) == ["old"]


def test_a_base_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vol").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_before_start(_cfg(tmp_path / "vol"))
    with pytest.raises(ConfigError, match=f"cannot create base_dir .*: {tmp_path}/vol exists "
                                          f"and is not a directory"):
        check_before_start(_cfg(tmp_path / "vol" / "inner"))


def test_a_base_dir_behind_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="does not exist; fix or remove the symlink"):
        check_before_start(_cfg(tmp_path / "link" / "vol"))


def test_a_base_dir_on_a_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        for base in (ro, ro / "vol"):
            with pytest.raises(ConfigError, match="read-only filesystem"):
                check_before_start(_cfg(base))
        assert _tree(ro) == []


def test_an_immutable_base_dir_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "vol"
    base.mkdir()
    with _immutable(base):
        for target in (base, base / "inner"):
            with pytest.raises(ConfigError, match=f"chattr -i -a {base}"):
                check_before_start(_cfg(target))


def test_a_mount_at_data_is_refused_naming_it(tmp_path: Path) -> None:
    base = tmp_path / "vol"
    with _tmpfs(base / "data") as data:
        (data / "precious.txt").write_text("mine")
        with pytest.raises(ConfigError) as info:
            check_before_start(_cfg(base))
        assert "tmpfs" in str(info.value) and "fsm-test-tmpfs" in str(info.value)
        assert f"umount {data}" in str(info.value)
        assert (data / "precious.txt").read_text() == "mine"


def test_a_mount_below_data_is_refused_too(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "vol" / "data" / "active" / "fs"), \
            pytest.raises(ConfigError, match=r"inside .*/data, where juicefs-fsm mounts"):
        check_before_start(_cfg(tmp_path / "vol"))


def test_a_base_dir_inside_a_running_volumes_base_dir_is_refused(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    with open(outer / "fsm.lock", "w") as lock:  # what a running controller holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=f"inside {outer}, the base_dir of a running "
                                              f"juicefs-fsm volume \\(pid {os.getpid()}"):
            check_before_start(_cfg(outer / "inner"))
    check_before_start(_cfg(outer / "inner"))  # a stopped one is no longer in the way


# ---- the same refusals through `juicefs-fsm run` (exit 2, one line, nothing created) ------

def _run_daemon(base_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "FSM_BASE_DIR"}}
    return subprocess.run(
        [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(base_dir),
         "--volume-name", "test-volume", *args],
        env=env, capture_output=True, text=True, timeout=120)


def test_run_refuses_a_base_dir_under_a_file_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    done = _run_daemon(tmp_path / "file" / "vol")
    assert done.returncode == 2, done.stderr
    _one_line(done.stderr, "juicefs-fsm: error: cannot create base_dir", "not a directory")
    assert _tree(tmp_path) == ["file"]


def test_run_refuses_a_read_only_base_dir_with_exit_2(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "ro") as ro:
        done = _run_daemon(ro)
        assert done.returncode == 2, done.stderr  # before: exit 3 and only a JSON log line
        _one_line(done.stderr, "juicefs-fsm: error: base_dir", "read-only filesystem")


def test_run_refuses_an_immutable_base_dir_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    with _immutable(tmp_path / "vol"):
        done = _run_daemon(tmp_path / "vol")
    assert done.returncode == 2, done.stderr
    _one_line(done.stderr, "juicefs-fsm: error: base_dir", "chattr -i")


def test_run_refuses_a_base_dir_too_long_for_a_socket_with_exit_2(tmp_path: Path) -> None:
    base = tmp_path / ("d" * (110 - len(str(tmp_path))))
    done = _run_daemon(base)
    assert done.returncode == 2, done.stderr  # before: "no control socket after 15s"
    _one_line(done.stderr, "bytes long, the limit is 91", "litestream.sock")
    assert not base.exists()


def test_run_refuses_a_mount_at_data_with_exit_2(tmp_path: Path) -> None:
    base = tmp_path / "vol"
    with _tmpfs(base / "data") as data:
        (data / "precious.txt").write_text("mine")
        done = _run_daemon(base)
        assert done.returncode == 2, done.stderr
        _one_line(done.stderr, f"{data} is already a mount point (tmpfs")
        assert mount_fstype(data) == "tmpfs" and (data / "precious.txt").read_text() == "mine"
        assert _tree(base) == ["data", "data/precious.txt"]


# ---- items 2, 7 through the API (the lead wires check_before_start into start()) ---------

async def _start_refusal(jfs: JuiceFS) -> ConfigError:
    """start() refuses with ConfigError (or a StartError caused by one) before the chart runs.
    The caller stops jfs whatever happens."""
    try:
        await jfs.start()
    except FsmError as exc:
        cause = exc.cause if isinstance(exc, StartError) else exc
        assert isinstance(cause, ConfigError), f"{WIRING}; got {type(exc).__name__}: {exc}"
        return cause
    pytest.fail(f"{WIRING}; start() succeeded", pytrace=False)


async def test_start_refuses_a_base_dir_under_a_file_before_touching_disk(
        tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "file").write_text("x")
    jfs = JuiceFS(_cfg(tmp_path / "file" / "vol"))
    try:
        assert "not a directory" in str(await _start_refusal(jfs))
    finally:
        await jfs.stop()


async def test_start_refuses_a_mount_at_data_and_mounts_nothing_over_it(tmp_path: Path) -> None:
    require_fuse()
    base = tmp_path / "vol"
    with _tmpfs(base / "data") as data:
        (data / "precious.txt").write_text("mine")
        jfs = JuiceFS(_cfg(base))
        try:
            assert "already a mount point" in str(await _start_refusal(jfs))
        finally:
            await jfs.stop()
        assert mount_fstype(data) == "tmpfs" and (data / "precious.txt").read_text() == "mine"
        assert _tree(base) == ["data", "data/precious.txt"], "nothing may be created"


# ---- item 9: a volume inside another (needs a real mount) --------------------------------

@pytest.mark.e2e
async def test_a_volume_inside_a_running_volume_is_refused_both_ways(
        jfs: JuiceFS, tmp_path: Path) -> None:
    mount_point = jfs.layout.mount_point
    check_before_start(jfs.config)  # its own mount at data/ is for fsm.leftovers, not refused
    inner = jfs.active_dir / "inner"
    with pytest.raises(ConfigError) as info:
        check_before_start(_cfg(inner))
    assert f"inside the JuiceFS mount {mount_point} (volume 'test-volume')" in str(info.value)
    assert not inner.exists()
    # The other way: a base_dir holding the running volume's base_dir.
    with pytest.raises(ConfigError, match=f"holds another running volume: {jfs.layout.base_dir} "
                                          f"\\(JuiceFS volume 'test-volume' mounted at"):
        check_before_start(_cfg(tmp_path))
    done = await asyncio.to_thread(_run_daemon, inner)
    assert done.returncode == 2, done.stderr
    _one_line(done.stderr, f"inside the JuiceFS mount {mount_point}")
    assert not inner.exists()


@pytest.mark.e2e
async def test_start_refuses_a_volume_inside_a_running_volume(jfs: JuiceFS) -> None:
    inner = jfs.active_dir / "inner"
    refused = JuiceFS(_cfg(inner))
    try:
        assert "inside the JuiceFS mount" in str(await _start_refusal(refused))
    finally:
        await refused.stop()  # without the refusal, the outer stop would abort under it
    assert not inner.exists()


# ---- item 10: a stop signal in the daemon's first moments --------------------------------

def _catches(pid: int, sig: int) -> bool:
    """The process has a handler for sig (SigCgt in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except FileNotFoundError:
        pass
    return False


def _spawn(base_dir: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "FSM_BASE_DIR"}}
    return subprocess.Popen(
        [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(base_dir),
         "--volume-name", "test-volume"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().decode(errors="replace") and \
                        pid_alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def _assert_nothing_running(base_dir: Path) -> None:
    assert mount_fstype(base_dir / "data") is None, f"{base_dir}/data is still mounted"
    assert _processes_naming(str(base_dir)) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_as_soon_as_it_is_caught_exits_0_having_created_nothing(
        tmp_path: Path, sig: signal.Signals) -> None:
    base = tmp_path / "vol"
    daemon = _spawn(base)
    try:
        # SIGTERM's bit, for all three: Python itself catches SIGINT from its first moment.
        deadline = time.monotonic() + 20
        while not _catches(daemon.pid, signal.SIGTERM) and daemon.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.001)
        assert _catches(daemon.pid, signal.SIGTERM), f"never caught (rc={daemon.poll()})"
        assert not base.exists(), "the handler must be in place before anything is created"
        daemon.send_signal(sig)
        _, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err.decode(errors="replace")[-2000:]
        assert not base.exists(), "an early stop must not start anything"
        assert b"stopped_before_start" in err
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    _assert_nothing_running(base)


@pytest.mark.e2e
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0])
def test_sigterm_at_any_moment_of_the_start_exits_0_and_leaves_nothing_running(
        tmp_path: Path, delay: float) -> None:
    require_fuse()
    base = tmp_path / "vol"
    daemon = _spawn(base)
    try:
        time.sleep(delay)
        caught = _catches(daemon.pid, signal.SIGTERM)
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=120)
        if daemon.returncode == -signal.SIGTERM:
            # Only before Python ran our first line (documented): nothing exists yet then.
            assert not caught and not base.exists(), err.decode(errors="replace")[-2000:]
        else:
            assert daemon.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    _assert_nothing_running(base)
