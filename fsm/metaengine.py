"""A shared JuiceFS metadata engine (PostgreSQL, Redis, ...) instead of SQLite + Litestream.

What this module gives the controller (docs/shared-engine.md):
- `parse_meta_url`: the URL checked, its password taken out. Children get the password-free URL
  in argv and the password only as META_PASSWORD in their environment (juicefs 1.4.2 reads it
  for postgres and redis URLs with or without a user: checked with format, mount, status, dump
  and load). `MetaURL.display` is what messages, logs and status() may show.
- `volume_exists`: `juicefs status` (a few ms); False only for "not formatted".
- `format_once`: format only when the engine holds no volume, exactly once when several
  machines start at the same moment, under `volume_lock(cfg, "format")`.
- `volume_lock`: a cross-machine lock for operations on trees (checkpoint, restore, delete)
  and for format: a conditional-write object in the bucket (S3 mode), an flock()ed
  file beside the volume's data (local mode).

Why the lock and not juicefs's own behaviour: three `juicefs format` started together on one
empty PostgreSQL database (6 trials) gave one, sometimes two, exit 0 and "Storage is not
empty" or a unique-constraint error for the others; once the storage's `juicefs_uuid` object
named a UUID that was not the volume's. The metadata itself always ended with one volume, but
"exactly one formats" needs a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError, EngineUnavailable, FsmError, OperationLocked, ToolError
from .layout import control_key
from .proc import child_env, run

if TYPE_CHECKING:
    from .config import Config

# juicefs 1.4 drivers that serve many machines. `postgresql` is libpq's alias; juicefs only
# knows `postgres`, so it is rewritten.
SHARED_SCHEMES = frozenset({"postgres", "redis", "rediss", "unix", "mysql", "tikv", "etcd",
                            "fdb"})
_ALIASES = {"postgresql": "postgres"}
_SINGLE_MACHINE = {
    "sqlite3": "SQLite is the embedded default: leave meta_url unset to use it (with Litestream)",
    "badger": "Badger is an embedded store that one process at a time can open",
    "memkv": "memkv lives in one process's memory and is lost when it exits",
}

NOT_FORMATTED = "database is not formatted"
STATUS_TIMEOUT = 30.0  # juicefs retries an unreachable tikv for ~100 s, redis over unix ~70 s
FORMAT_TIMEOUT = 120.0
LOCK_TTL = 60.0
LOCK_POLL = 0.25

TIME_TRAVEL_REFUSED = (
    "time travel (history_hours, browse, rollback) needs Litestream's history of the SQLite "
    "metadata, which a shared metadata engine does not have; use the engine's own point-in-time "
    "recovery instead (PostgreSQL: WAL archiving + recovery_target_time; Redis: AOF/RDB "
    "snapshots), or leave meta_url unset")

WRITEBACK_REFUSED = (
    "with a shared engine the volume is mounted without writeback, so a file other machines "
    "see has its data in the bucket already (close() waits for the upload); a delayed upload "
    "would let them see files whose blocks are only in this machine's staging folder")


@dataclass(frozen=True)
class MetaURL:
    """A checked meta URL: `url` has no password (it may go in argv), `password` goes only in
    the children's environment as META_PASSWORD."""

    scheme: str
    url: str
    password: str = field(default="", repr=False)

    @property
    def display(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        return {"META_PASSWORD": self.password} if self.password else {}

    @property
    def secrets(self) -> list[str]:
        return [self.password] if self.password else []


def split_password(url: str) -> tuple[str, str]:
    """(url without its password, the password unquoted). A password in the userinfo
    (`user:pw@`, `:pw@`) or in the query (`?password=`, which PostgreSQL URLs allow)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, ""
    authority, slash, tail = rest.partition("/")
    password = ""
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        if colon:
            password = urllib.parse.unquote(pw)
            authority = f"{user}@{host}" if user else host
    path, qmark, query = tail.partition("?")
    if qmark:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        in_query = [v for k, v in pairs if k == "password"]
        if in_query:
            if password and in_query[0] != password:
                raise ConfigError("meta_url has two different passwords (user:password@ and "
                                  "?password=); keep one, or better, none: use FSM_META_PASSWORD")
            password = in_query[0]
            kept = [(k, v) for k, v in pairs if k != "password"]
            query = urllib.parse.urlencode(kept, safe="/:,()")
            qmark = "?" if kept else ""
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}", password


def parse_meta_url(url: str, password: str = "") -> MetaURL:
    """Check a meta URL for a shared engine and take its password out. `password` is
    FSM_META_PASSWORD / Config.meta_password; it must agree with one in the URL."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not scheme or not rest:
        raise ConfigError(
            f"meta_url {display_of(text)!r} is not a URL; use e.g. "
            f"postgres://USER@HOST:5432/DB?sslmode=disable or redis://HOST:6379/1")
    if scheme in _SINGLE_MACHINE:
        raise ConfigError(f"meta_url: {scheme}:// cannot be shared by several machines "
                          f"({_SINGLE_MACHINE[scheme]}); use postgres:// or redis://")
    scheme = _ALIASES.get(scheme, scheme)
    if scheme not in SHARED_SCHEMES:
        raise ConfigError(
            f"meta_url scheme {scheme!r} is not a JuiceFS metadata engine; use one of "
            + ", ".join(sorted(SHARED_SCHEMES | set(_ALIASES))) + " (JuiceFS 1.4)")
    clean, in_url = split_password(f"{scheme}://{rest}")
    if password and in_url and password != in_url:
        raise ConfigError("meta_url carries a password and meta_password (FSM_META_PASSWORD) "
                          "another; remove the one in the URL")
    return MetaURL(scheme, clean, password or in_url)


def display_of(url: str) -> str:
    """A URL as messages may show it: without any password (no checks)."""
    with contextlib.suppress(ConfigError):
        return split_password(url)[0]
    return url.partition("://")[0] + "://..."


def engine_of(cfg: Config) -> MetaURL | None:
    """The shared engine of a Config, or None in the SQLite mode."""
    url = getattr(cfg, "meta_url", "")
    return parse_meta_url(url, getattr(cfg, "meta_password", "")) if url else None


def meta_url_for(cfg: Config) -> str:
    """What `juicefs mount/format/clone...` get as META-URL: the engine's password-free URL,
    else the local SQLite file."""
    engine = engine_of(cfg)
    return engine.url if engine else cfg.layout.meta_url


def engine_env(cfg: Config, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a juicefs child: object-store credentials and META_PASSWORD."""
    values: dict[str, str] = {}
    if not cfg.local_mode:
        values.update(ACCESS_KEY=cfg.s3_access_key, SECRET_KEY=cfg.s3_secret_access_key)
    engine = engine_of(cfg)
    if engine:
        values.update(engine.env())
    values.update(extra or {})
    return child_env(values)


# ---- asking the engine -------------------------------------------------------------------------

async def engine_status(juicefs_bin: str, engine: MetaURL, *, log: Any,
                        timeout: float = STATUS_TIMEOUT) -> dict[str, Any] | None:
    """`juicefs status` of the engine: its JSON (Setting, Sessions, ...), or None when the
    engine answers but holds no volume. EngineUnavailable when it cannot be asked."""
    try:
        done = await run("juicefs", "status", [juicefs_bin, "status", engine.url],
                         env=child_env(engine.env()), log=_Quiet(log), secrets=engine.secrets,
                         timeout=timeout)
    except ToolError as exc:
        if NOT_FORMATTED in exc.stderr_tail:
            return None
        why = "did not answer in time" if exc.returncode is None else "could not be asked"
        raise EngineUnavailable(
            f"metadata engine {engine.display} {why}: {_fatal(exc.stderr_tail)}; check that "
            f"it runs and is reachable, and the user and password (FSM_META_PASSWORD)") from None
    try:
        info = json.loads(done.stdout)
    except ValueError:
        raise EngineUnavailable(f"juicefs status of {engine.display} printed no JSON; "
                                f"is {juicefs_bin} juicefs 1.4?") from None
    return info if isinstance(info, dict) else {}


class _Quiet:
    """A probe's output at debug level: "not formatted" is an answer, not an error (juicefs
    prints it as FATAL); a real failure is raised with its stderr tail anyway."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def bind(self, **values: Any) -> _Quiet:
        return _Quiet(self._log.bind(**values))

    def __getattr__(self, level: str) -> Any:
        return self._log.debug if level in {"info", "warning", "error"} else getattr(
            self._log, level)


def _fatal(tail: str) -> str:
    """The FATAL line of a juicefs stderr tail, without juicefs's timestamp/pid prefix."""
    lines = [line for line in tail.splitlines() if "<FATAL>" in line] or tail.splitlines()[-1:]
    text = lines[-1] if lines else "no output"
    return text.split(">: ", 1)[-1].rsplit(" [", 1)[0]


async def volume_exists(juicefs_bin: str, engine: MetaURL, *, log: Any,
                        timeout: float = STATUS_TIMEOUT) -> bool:
    return await engine_status(juicefs_bin, engine, log=log, timeout=timeout) is not None


def _check_same_volume(cfg: Config, engine: MetaURL, setting: Mapping[str, Any]) -> None:
    from .s3 import same_bucket

    name, bucket = str(setting.get("Name", "")), str(setting.get("Bucket", ""))
    if name != cfg.volume_name or not same_bucket(bucket, cfg.bucket_url):
        raise ConfigError(
            f"metadata engine {engine.display} holds volume {name!r} on {bucket}, not "
            f"{cfg.volume_name!r} on {cfg.bucket_url}; point meta_url at that volume's database "
            f"(one database or Redis db number per volume) or fix volume_name / the bucket")


FormatOutcome = Literal["formatted", "joined"]


async def format_once(cfg: Config, *, log: Any, lock_wait: float = FORMAT_TIMEOUT,
                      timeout: float = FORMAT_TIMEOUT) -> FormatOutcome:
    """Format the volume on the shared engine unless it is there already. Machines that start
    together: one formats under the volume's format lock, the others wait for the lock and
    then find the volume ("joined"). A volume already on the engine must be this one (same
    name and bucket): ConfigError otherwise, nothing changed."""
    engine = engine_of(cfg)
    if engine is None:
        raise ConfigError("format_once needs meta_url (a shared metadata engine)")
    juicefs = str(cfg.juicefs_bin)
    found = await engine_status(juicefs, engine, log=log)
    if found is not None:
        _check_same_volume(cfg, engine, found.get("Setting") or {})
        log.info("volume_joined", engine=engine.display, volume=cfg.volume_name)
        return "joined"
    async with volume_lock(cfg, "format", log=log, wait=lock_wait):
        found = await engine_status(juicefs, engine, log=log)
        if found is not None:
            _check_same_volume(cfg, engine, found.get("Setting") or {})
            log.info("volume_joined", engine=engine.display, volume=cfg.volume_name,
                     after="waiting for another machine's format")
            return "joined"
        await _refuse_foreign_data(cfg)
        storage = "file" if cfg.local_mode else "s3"
        # Our own checks replaced juicefs's "storage is not empty" test: the lock object of
        # S3 mode lives under the volume's prefix and would fail it.
        extra = {} if cfg.local_mode else {"JFS_NO_CHECK_OBJECT_STORAGE": "1"}
        if not cfg.local_mode:
            from .s3 import check_bucket, target_of

            await check_bucket(target_of(cfg))
        await run("juicefs", "format",
                  [juicefs, "format", "--storage", storage, "--bucket", cfg.bucket_url,
                   "--no-update", engine.url, cfg.volume_name],
                  env=engine_env(cfg, extra), log=log,
                  secrets=[*engine.secrets, *cfg.secrets()], timeout=timeout)
        log.info("volume_formatted", engine=engine.display, volume=cfg.volume_name)
        return "formatted"


async def _refuse_foreign_data(cfg: Config) -> None:
    """Refuse to format a new volume over objects another volume of this name left: JuiceFS
    would start an empty tree there, and its gc could later delete the old volume's data."""
    prefix = f"{cfg.volume_name}/"
    ours = control_key(cfg.volume_name, "")
    if cfg.local_mode:
        root = cfg.layout.local_storage_dir / cfg.volume_name

        def walk() -> list[str]:
            found: list[str] = []
            for dirpath, _dirs, files in os.walk(root):
                found += [os.path.relpath(os.path.join(dirpath, f), cfg.layout.local_storage_dir)
                          for f in files]
            return found

        keys = await asyncio.to_thread(walk)
    else:
        from .s3 import Bucket, target_of

        keys = await Bucket(target_of(cfg)).list_keys(prefix)
    foreign = sorted(k for k in keys if not k.startswith((ours, f"{prefix}testing")))
    if foreign:
        sqlite = any(k.startswith(f"{prefix}metadata/") for k in foreign)
        hint = ("an SQLite volume of this name is there: move it with `juicefs-fsm migrate "
                "--to URL` instead of starting on an empty engine" if sqlite else
                "another volume's data is there: pick another volume_name, or point meta_url "
                "at the engine that holds that volume")
        raise ConfigError(f"the engine holds no volume {cfg.volume_name!r}, but the storage "
                          f"already has objects under {prefix} (e.g. {foreign[0]}); {hint}")


# ---- the cross-machine lock ---------------------------------------------------------------------

def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}


def _since(body: Mapping[str, Any]) -> str:
    return f"{body.get('host', '?')} pid {body.get('pid', '?')} ({body.get('operation', '?')})"


class VolumeLock:
    """Base of the two lock kinds: `acquire(wait)` then `release()`, or `async with`."""

    name: str
    held: bool = False

    async def acquire(self, wait: float) -> None:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError


class BucketLock(VolumeLock):
    """`{volume}/fsm/locks/<name>.json`, created with If-None-Match: *, refreshed every ttl/3 with
    If-Match. A holder that vanished without releasing is taken over once the *same* ETag has been
    seen for a full ttl on the waiter's own clock (no clocks are compared across machines)."""

    def __init__(self, cfg: Config, name: str, *, log: Any, ttl: float = LOCK_TTL) -> None:
        from .s3 import Bucket, target_of

        self.bucket = Bucket(target_of(cfg))
        self.name = name
        self.key = control_key(cfg.volume_name, f"locks/{name}.json")
        self.ttl = ttl
        self.log = log
        self.me = _identity() | {"operation": name}
        self.etag = ""
        self._refresher: asyncio.Task[None] | None = None

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({**self.me, "released": released, "ttl": self.ttl,
                           "at": time.time()}).encode()

    async def acquire(self, wait: float) -> None:
        from .errors import S3PreconditionFailed

        deadline = time.monotonic() + wait
        seen: tuple[str, float] | None = None  # (etag, first seen on our clock)
        holder: dict[str, Any] = {}
        while True:
            with contextlib.suppress(S3PreconditionFailed):
                found = await self.bucket.get(self.key)
                if found is None:
                    self.etag = await self.bucket.put(self.key, self._body(), create=True)
                    break
                holder = _loads(found.body)
                now = time.monotonic()
                if seen is None or seen[0] != found.etag:
                    seen = (found.etag, now)
                stale = now - seen[1] >= float(holder.get("ttl", self.ttl))
                if holder.get("released") or stale:
                    self.etag = await self.bucket.put(self.key, self._body(),
                                                      if_match=found.etag)
                    if stale and not holder.get("released"):
                        self.log.warning("lock_taken_over", lock=self.name,
                                         previous=_since(holder))
                    break
            if time.monotonic() >= deadline:
                raise OperationLocked(
                    f"the volume's {self.name!r} lock is held by {_since(holder)} on another "
                    f"machine (or process); gave up after {wait:g}s: retry when it is done",
                    holder)
            await asyncio.sleep(LOCK_POLL)
        self.held = True
        self._refresher = asyncio.create_task(self._refresh())
        self.log.info("lock_acquired", lock=self.name, key=self.key)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                self.etag = await self.bucket.put(self.key, self._body(), if_match=self.etag)
            except FsmError as exc:
                # The operation under the lock cannot be stopped half-way: say so loudly.
                self.log.error("lock_refresh_failed", lock=self.name, error=str(exc))

    async def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        try:
            await self.bucket.put(self.key, self._body(released=True), if_match=self.etag)
        except FsmError as exc:  # taken over meanwhile, or S3 away: it runs out after ttl
            self.log.warning("lock_release_failed", lock=self.name, error=str(exc))
        else:
            self.log.info("lock_released", lock=self.name)


class FileLock(VolumeLock):
    """Local mode: flock() on `{base_dir}/local/{volume}/fsm/locks/<name>.lock`, beside the
    volume's data, so every machine that can reach the data (a shared folder) sees the lock. The
    file stays empty (juicefs format ignores empty objects) and the kernel frees the lock when
    its holder dies."""

    def __init__(self, cfg: Config, name: str, *, log: Any) -> None:
        self.name = name
        self.path = (cfg.layout.local_storage_dir / control_key(cfg.volume_name, "locks")
                     / f"{name}.lock")
        self.log = log
        self._fd: int | None = None

    def _try(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not self._try():
            if time.monotonic() >= deadline:
                raise OperationLocked(
                    f"the volume's {self.name!r} lock ({self.path}) is held by another "
                    f"process; gave up after {wait:g}s: retry when it is done")
            await asyncio.sleep(LOCK_POLL)
        self.held = True
        self.log.info("lock_acquired", lock=self.name, path=str(self.path))

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
        if self.held:
            self.held = False
            self.log.info("lock_released", lock=self.name)


def _loads(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        value = json.loads(body)
        if isinstance(value, dict):
            return value
    return {}


def make_lock(cfg: Config, name: str, *, log: Any, ttl: float = LOCK_TTL) -> VolumeLock:
    if cfg.local_mode:
        return FileLock(cfg, name, log=log)
    return BucketLock(cfg, name, log=log, ttl=ttl)


@contextlib.asynccontextmanager
async def volume_lock(cfg: Config, name: str, *, log: Any, wait: float = 60.0,
                      ttl: float = LOCK_TTL) -> AsyncIterator[VolumeLock]:
    """Hold the volume's `name` lock across machines: "format", and "tree" for restore and
    delete. OperationLocked when another holder keeps it longer than `wait` seconds."""
    lock = make_lock(cfg, name, log=log, ttl=ttl)
    await lock.acquire(wait)
    try:
        yield lock
    finally:
        await lock.release()
