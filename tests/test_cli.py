"""Fast checks of what a user of the CLI meets before any mount: configuration precedence, bad
input, the control protocol and its errors, and sd_notify. No FUSE needed."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from fsm import Config, ControlError, JuiceFS, NotReadyError
from fsm.cli import build_parser, client_base_dir, main, run_config
from fsm.config import ConfigError
from fsm.control import ControlServer, DaemonUnreachable, call
from fsm.errors import CheckpointNotFound, InvalidCheckpointId
from fsm.sdnotify import Notifier, parse, socket_address
from tests.helpers import logging_restored


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    """`main(["run", ...])` configures logging for the process; undo it for other tests."""
    with logging_restored():
        yield


def _run_args(*argv: str) -> Any:
    return build_parser().parse_args(["run", *argv])


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fsm.toml"
    path.write_text(text)
    return path


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


# ---- configuration -------------------------------------------------------------------------

def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    file = _toml(tmp_path, f'base_dir = "{tmp_path}/from-file"\nlocal_mode = true\n'
                           'volume_name = "from-file"\nupload_delay = 7\nready_timeout = 9\n')
    env = {"FSM_VOLUME_NAME": "from-env", "FSM_UPLOAD_DELAY": "3"}
    cfg = run_config(_run_args("--config", str(file), "--volume-name", "from-flag"), env)
    assert cfg.volume_name == "from-flag"        # flag over env and file
    assert cfg.upload_delay == 3                 # env over file
    assert cfg.ready_timeout == 9                # file when nothing else says
    assert cfg.base_dir == tmp_path / "from-file" and cfg.local_mode
    assert run_config(_run_args("--config", str(file)), env).volume_name == "from-env"
    assert run_config(_run_args("--config", str(file)), {}).volume_name == "from-file"


def test_no_local_flag_overrides_local_mode_from_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="S3 mode needs"):
        run_config(_run_args("--base-dir", str(tmp_path), "--no-local"),
                   {"FSM_LOCAL_MODE": "1"})


def test_the_go_package_s3_variables_are_accepted(tmp_path: Path) -> None:
    env = {"SPRITE_S3_ACCESS_KEY": "k", "SPRITE_S3_SECRET_ACCESS_KEY": "s",
           "SPRITE_S3_ENDPOINT_URL": "http://127.0.0.1:9000", "SPRITE_S3_BUCKET": "b"}
    cfg = run_config(_run_args("--base-dir", str(tmp_path)), env)
    assert (cfg.mode, cfg.s3_bucket, cfg.s3_access_key) == ("s3", "b", "k")


@pytest.mark.parametrize(("text", "fragments"), [
    ('volume_nmae = "x"\n', ("unknown key", "volume_nmae", "known keys")),
    ('upload_delay = "5"\n', ("upload_delay", "must be a number")),
    ("local_mode = 1\n", ("local_mode", "true or false")),
    ("cache_size_mib = 1.5\n", ("cache_size_mib", "integer")),
    ("base_dir = \n", ("not valid TOML",)),
])
def test_a_bad_config_file_is_refused_with_what_to_fix(tmp_path: Path, text: str,
                                                       fragments: tuple[str, ...]) -> None:
    file = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        run_config(_run_args("--config", str(file), "--base-dir", str(tmp_path)), {})
    for fragment in (*fragments, str(file)):
        assert fragment in str(info.value)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        run_config(_run_args("--config", str(tmp_path / "nope.toml")), {})


def test_run_with_a_bad_setting_exits_2_with_one_line(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--local", "--base-dir", str(tmp_path / "v"), "--volume-name", "Bad_Name"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "volume_name", "Bad_Name")
    assert not (tmp_path / "v").exists(), "a config error must not touch disk"


def test_run_without_a_base_dir_says_where_to_put_one(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FSM_BASE_DIR", raising=False)
    assert main(["run", "--local"]) == 2
    _one_error_line(capsys.readouterr().err, "--base-dir", "FSM_BASE_DIR", "--config")


def test_a_bad_log_level_from_the_environment_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FSM_LOG_LEVEL", "loud")
    assert main(["run", "--local", "--base-dir", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "FSM_LOG_LEVEL", "'loud'", "debug, info")


def test_a_bad_number_flag_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--upload-delay", "soon"])
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err, "--upload-delay", "soon")


def test_clients_find_the_base_dir_in_flag_env_or_config_file(tmp_path: Path) -> None:
    parser = build_parser()
    file = _toml(tmp_path, f'base_dir = "{tmp_path}/file"\n')
    assert client_base_dir(parser.parse_args(["status", "--base-dir", "/x"]), {}) == Path("/x")
    assert client_base_dir(parser.parse_args(["status"]), {"FSM_BASE_DIR": "/e"}) == Path("/e")
    args = parser.parse_args(["status", "--config", str(file)])
    assert client_base_dir(args, {}) == tmp_path / "file"


# ---- client verbs without a daemon ---------------------------------------------------------

@pytest.mark.parametrize("argv", [["status"], ["checkpoints", "--json"], ["checkpoint", "a"],
                                  ["restore", "a"], ["delete", "a"]])
def test_a_client_without_a_daemon_exits_3_and_says_how_to_start_one(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--base-dir", str(tmp_path)]) == 3
    _one_error_line(capsys.readouterr().err, "no daemon is running for", str(tmp_path),
                    f"juicefs-fsm run --base-dir {tmp_path}")


def test_a_client_without_a_base_dir_exits_2(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FSM_BASE_DIR", raising=False)
    monkeypatch.delenv("FSM_CONFIG", raising=False)
    assert main(["status"]) == 2
    _one_error_line(capsys.readouterr().err, "--base-dir", "FSM_BASE_DIR")


@pytest.mark.parametrize(("argv", "ago"), [(["browse", "--at", "-0.5s"], 0.5),
                                           (["rollback", "--at", "-5m"], 300.0),
                                           (["browse", "--at=-90s"], 90.0)])
def test_a_negative_duration_after_at_is_its_value_not_an_option(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        ago: float) -> None:
    import fsm.control

    asked: list[tuple[str, dict[str, Any]]] = []

    def call(base_dir: Any, op: str, **request: Any) -> dict[str, Any]:
        asked.append((op, request))
        return {"asked": op}

    monkeypatch.setattr(fsm.control, "call", call)
    assert main([*argv, "--base-dir", "/srv/vol", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == {"asked": argv[0]}
    [(op, request)] = asked
    took = (datetime.now(timezone.utc) - datetime.fromisoformat(request["at"])).total_seconds()
    assert op == argv[0] and ago <= took < ago + 30


def test_a_bad_checkpoint_id_is_refused_before_asking_the_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoint", "../escape", "--base-dir", str(tmp_path)]) == 1
    _one_error_line(capsys.readouterr().err, "invalid checkpoint id", "../escape")


def test_a_missing_id_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["restore"])
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err, "ID")


# ---- control protocol (a real controller that is not started: no mount needed) -------------

@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[ControlServer]:
    jfs = JuiceFS(Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume"))
    server = ControlServer(jfs, extra_status=lambda: {"versions": {"juicefs": "test"}})
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _call(base_dir: Path, op: str, **args: Any) -> Any:
    return await asyncio.to_thread(call, base_dir, op, **args)


async def test_the_control_socket_is_private_and_answers_status(
        served: ControlServer) -> None:
    assert stat.S_IMODE(served.path.stat().st_mode) == 0o600
    status = await _call(served.path.parent, "status")
    assert status["state"] == "uninitialized" and status["versions"] == {"juicefs": "test"}
    assert status["base_dir"] == str(served.path.parent)


async def test_refusals_come_back_as_the_same_error_class(served: ControlServer) -> None:
    base_dir = served.path.parent
    with pytest.raises(NotReadyError, match="cannot checkpoint while the volume is uninit"):
        await _call(base_dir, "checkpoint", id="cp-1")
    with pytest.raises(InvalidCheckpointId, match="invalid checkpoint id"):
        await _call(base_dir, "restore", id="../x")
    with pytest.raises(ControlError, match="needs \"id\""):
        await _call(base_dir, "delete")
    with pytest.raises(ControlError, match="unknown op 'reboot'; use one of status"):
        await _call(base_dir, "reboot")


async def test_one_json_object_per_line_and_garbage_gets_an_error_line(
        served: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(served.path))
    writer.write(b'{"op": "status"}\nnot json\n[1]\n{"op": "checkpoints"}\n')
    answers = [json.loads(await reader.readline()) for _ in range(4)]
    writer.close()
    await writer.wait_closed()
    assert answers[0]["ok"] is True and answers[0]["result"]["state"] == "uninitialized"
    assert answers[1] == {"ok": False, "type": "ControlError", "error": answers[1]["error"]}
    assert "not valid JSON" in answers[1]["error"]
    assert "must be a JSON object" in answers[2]["error"]
    assert answers[3]["type"] == "NotReadyError"


async def test_a_live_daemon_socket_is_never_taken_over_but_a_stale_one_is(
        served: ControlServer, tmp_path: Path) -> None:
    rival = ControlServer(served.jfs)
    with pytest.raises(ControlError, match="already running"):
        await rival.start()
    assert (await _call(served.path.parent, "status"))["state"] == "uninitialized"

    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale_dir / "fsm.sock"))
    leftover.close()  # a crashed daemon's socket file: nobody answers
    jfs = JuiceFS(Config(base_dir=stale_dir, local_mode=True, volume_name="test-volume"))
    server = ControlServer(jfs)
    await server.start()
    try:
        assert (await _call(stale_dir, "status"))["state"] == "uninitialized"
    finally:
        await server.close()
    assert not (stale_dir / "fsm.sock").exists()


async def test_a_base_dir_too_deep_for_a_unix_socket_name_still_works(tmp_path: Path) -> None:
    # Config refuses such a base_dir (litestream.sock would not fit), but a client may still
    # reach a daemon's socket by a longer path (a symlink or bind mount to its base_dir).
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "fsm.sock")) > 108
    jfs = JuiceFS(Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume"))
    server = ControlServer(jfs)
    server.path = deep / "fsm.sock"
    await server.start()
    try:
        assert (await _call(deep, "status"))["base_dir"] == str(tmp_path / "vol")
    finally:
        await server.close()


def test_remote_errors_keep_their_class_and_message() -> None:
    from fsm.control import remote_error

    err = remote_error("CheckpointNotFound", "checkpoint 'x' does not exist")
    assert isinstance(err, CheckpointNotFound) and str(err) == "checkpoint 'x' does not exist"
    unknown = remote_error("KeyError", "boom")
    assert type(unknown) is ControlError and str(unknown) == "boom"
    assert not isinstance(remote_error("SystemExit", "x"), SystemExit)


def test_an_unreachable_daemon_is_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable):
        call(tmp_path, "status")


# ---- sd_notify -------------------------------------------------------------------------------

@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    name = f"@juicefs-fsm-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name[1:])
    receiver.settimeout(2)
    try:
        yield name, receiver
    finally:
        receiver.close()


def test_notifications_reach_an_abstract_socket_and_children_do_not_inherit_it(
        abstract_receiver: tuple[str, socket.socket]) -> None:
    name, receiver = abstract_receiver
    env = {"NOTIFY_SOCKET": name}
    notifier = Notifier.from_env(env)
    assert "NOTIFY_SOCKET" not in env  # juicefs/litestream get our environment
    assert notifier.ready("ready")
    assert parse(receiver.recv(4096)) == {"READY": "1", "STATUS": "ready",
                                          "MAINPID": str(os.getpid())}
    assert notifier.stopping()
    assert parse(receiver.recv(4096)) == {"STOPPING": "1"}
    notifier.close()


def test_without_notify_socket_notifications_are_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled and not notifier.status("ready")


def test_a_vanished_notify_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(socket_address(str(tmp_path / "gone.sock")))
    assert notifier.status("ready") is False
    assert socket_address("relative/path") is None
