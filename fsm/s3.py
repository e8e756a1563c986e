"""S3 mode: our own S3 calls (through obstore), and whose metadata a start should use.

Why our own calls and not the juicefs/litestream binaries: their SDKs retry internally for a
long time (`litestream restore` against a closed port took ~4 minutes, `juicefs format` ~12 s),
and a wrong secret comes back buried in a stderr tail. One request with obstore's own retries
off answers in milliseconds and says whether the problem is transient (connection refused,
timeout, 5xx: S3Unavailable, retried by fsm.retry) or not (403, no such bucket: S3AccessError).

At start, the local metadata.db is kept only when its format names the configured bucket;
otherwise it is moved under set-aside/ (never deleted) and litestream restores the bucket's copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from .config import Config
from .errors import (
    ConfigError,
    FsmError,
    S3AccessError,
    S3ObjectMissing,
    S3PreconditionFailed,
    S3Unavailable,
)
from .juicefs import read_format
from .layout import LEGACY_REPLICA_PREFIX, Layout, replica_prefix

DEFAULT_REGION = "us-east-1"
# Short on purpose: an outage must show as S3Unavailable within seconds, so that fsm.retry's
# backoff (and the lease's fence deadline) decide how long to wait, not the HTTP client.
CONNECT_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0

_CODE = re.compile(r"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_REGION = re.compile(r"<Region>([^<]+)</Region>")
_STATUS = re.compile(r"status code: (\d{3})|\bstatus: (\d{3})\b")
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "ConditionalRequestConflict", "OperationAborted"}


@dataclass(frozen=True)
class S3Target:
    """Where and as whom: a path-style endpoint (http(s)://host[:port]) and a bucket."""

    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = DEFAULT_REGION

    @property
    def url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.bucket}"


@dataclass(frozen=True)
class Stored:
    """An object's body and the ETag to make a conditional write (If-Match) against it."""

    body: bytes
    etag: str


@lru_cache(maxsize=32)
def _store(target: S3Target, timeout: float) -> S3Store:
    # Cached: building a client costs ~4 ms, and it keeps its connections alive between calls.
    return S3Store(
        target.bucket, endpoint=target.endpoint.rstrip("/"), access_key_id=target.access_key,
        secret_access_key=target.secret_key, region=target.region,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True, "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
                        "timeout": timedelta(seconds=timeout)},
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=timeout)})


@dataclass(frozen=True)
class _Failure:
    """What an obstore error says, parsed out of its text (obstore exposes no fields)."""

    status: int | None
    code: str
    message: str
    reason: str  # why no answer came back (connection refused, timed out), when none did

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        text = str(exc)
        found = _STATUS.search(text)
        status = int(found.group(1) or found.group(2)) if found else None
        code = _CODE.search(text)
        message = _MESSAGE.search(text)
        reason = ""
        if status is None:
            os_message = _OS_MESSAGE.search(text)
            if "kind: Timeout" in text or "timed out" in text.lower():
                reason = "timed out"
            elif os_message:
                reason = os_message.group(1)
            else:
                reason = text.split("\n", 1)[0].rsplit(" - ", 1)[-1][:200]
        return cls(status, code.group(1) if code else "", message.group(1) if message else "",
                   reason)

    @property
    def detail(self) -> str:
        return f"HTTP {self.status}" + (f" {self.code}" if self.code else "") + (
            f": {self.message}" if self.message else "")


def _scrub(text: str, target: S3Target) -> str:
    for secret in (target.secret_key, target.access_key):
        if secret:
            text = text.replace(secret, "***")
    return text


def _error(target: S3Target, exc: BaseException, doing: str) -> FsmError:
    """The FsmError for an obstore failure while `doing` (e.g. "listing bucket 'b'")."""
    failure = _Failure.of(exc)
    return _judge(target, failure, doing, exc)


def _judge(target: S3Target, f: _Failure, doing: str, exc: BaseException) -> FsmError:
    where = target.endpoint
    if f.status is None:
        if "certificate" in str(exc).lower():
            return S3AccessError(
                f"the TLS certificate of {where} was not accepted; fix the endpoint URL or "
                f"install its CA (SSL_CERT_FILE)")
        return S3Unavailable(_scrub(f"S3 endpoint {where} is unreachable: {f.reason}", target))
    detail = _scrub(f.detail, target)
    if f.status >= 500 or f.status in (408, 409, 429) or f.code in _TRANSIENT_CODES:
        return S3Unavailable(f"S3 at {where} is not serving yet ({detail})")
    if f.code == "NoSuchBucket":
        return S3AccessError(
            f"bucket {target.bucket!r} does not exist at {where} ({detail}); "
            f"create it, or fix s3_bucket / s3_endpoint_url")
    if isinstance(exc, (AlreadyExistsError, PreconditionError)) or f.status == 412:
        return S3PreconditionFailed(f"S3 at {where} refused a conditional write {doing} "
                                    f"({detail}): the object exists or has changed")
    if isinstance(exc, FileNotFoundError) or f.status == 404:
        return S3ObjectMissing(f"no such object {doing} in bucket {target.bucket!r} at {where}")
    if f.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return S3AccessError(
            f"S3 at {where} rejected the credentials ({detail}); "
            f"check s3_access_key and s3_secret_access_key")
    if f.status in (401, 403) or isinstance(exc, (PermissionDeniedError, UnauthenticatedError)):
        return S3AccessError(
            f"S3 at {where} denied {doing} ({detail}); "
            f"the credentials need read, write and list permission on it")
    return S3AccessError(f"S3 at {where} refused {doing} ({detail}); "
                         f"check the endpoint and bucket settings")


# obstore raises its own BaseError subclasses, and the builtin FileNotFoundError for a 404.
_OBSTORE_ERRORS = (BaseError, FileNotFoundError)


class Bucket:
    """Object operations on one bucket. Every failure is an FsmError: S3Unavailable (worth
    retrying), S3AccessError (not), S3PreconditionFailed, S3ObjectMissing."""

    def __init__(self, target: S3Target, timeout: float = REQUEST_TIMEOUT) -> None:
        self.target = target
        self.store = _store(target, timeout)

    async def get(self, key: str) -> Stored | None:
        """The object, or None when there is no such key."""
        try:
            result = await obstore.get_async(self.store, key)
            body = bytes(await result.bytes_async())
        except _OBSTORE_ERRORS as exc:
            error = _error(self.target, exc, f"reading {key}")
            if isinstance(error, S3ObjectMissing):
                return None
            raise error from None
        return Stored(body, result.meta["e_tag"] or "")

    async def put(self, key: str, data: bytes, *, create: bool = False,
                  if_match: str | None = None) -> str:
        """Write `data`; `create`: only if the key does not exist (If-None-Match: *);
        `if_match`: only if its ETag is still this one. Returns the new ETag."""
        mode: Any = "create" if create else ({"e_tag": if_match} if if_match else "overwrite")
        try:
            result = await obstore.put_async(self.store, key, data, mode=mode)
        except _OBSTORE_ERRORS as exc:
            raise _error(self.target, exc, f"writing {key}") from None
        return result["e_tag"] or ""

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, key)
        except _OBSTORE_ERRORS as exc:
            error = _error(self.target, exc, f"deleting {key}")
            if not isinstance(error, S3ObjectMissing):
                raise error from None

    async def any_key(self, prefix: str) -> bool:
        """Whether at least one key starts with `prefix` (one short listing page)."""
        try:
            chunks = obstore.list(self.store, prefix, chunk_size=1)
            async for chunk in chunks:
                if chunk:
                    return True
            return False
        except _OBSTORE_ERRORS as exc:
            raise _error(self.target, exc, f"listing bucket {self.target.bucket!r}") from None

    async def list_keys(self, prefix: str = "") -> list[str]:
        try:
            chunks = obstore.list(self.store, prefix or None, chunk_size=1000)
            return [meta["path"] async for chunk in chunks for meta in chunk]
        except _OBSTORE_ERRORS as exc:
            raise _error(self.target, exc, f"listing bucket {self.target.bucket!r}") from None


def _with_region(target: S3Target, exc: BaseException) -> S3Target | None:
    """The target in the bucket's own region, when S3 says we signed for another one."""
    failure = _Failure.of(exc)
    if failure.status not in (301, 400):
        return None
    found = _REGION.search(str(exc))
    region = found.group(1) if found else None
    if not region or region == target.region:
        return None
    return S3Target(target.endpoint, target.bucket, target.access_key, target.secret_key, region)


def check_bucket_sync(target: S3Target, timeout: float = REQUEST_TIMEOUT) -> str:
    """List the bucket's top level once, as juicefs and litestream will. Returns the region the
    bucket answered in. Raises S3Unavailable (worth retrying) or S3AccessError (not). For
    code with no event loop running (tests, set-up tools)."""
    return asyncio.run(check_bucket(target, timeout))


async def check_bucket(target: S3Target, timeout: float = REQUEST_TIMEOUT) -> str:
    """List the bucket once (as juicefs and litestream will); its region. S3Unavailable is
    worth retrying, S3AccessError is not."""
    for _ in range(2):
        try:
            await obstore.list_with_delimiter_async(_store(target, timeout), None)
            return target.region
        except _OBSTORE_ERRORS as exc:
            elsewhere = _with_region(target, exc)
            if elsewhere is None:
                raise _list_error(target, exc) from None
            target = elsewhere
    raise S3AccessError(f"S3 at {target.endpoint} keeps redirecting bucket {target.bucket!r} "
                        f"between regions; check s3_endpoint_url")


def _list_error(target: S3Target, exc: BaseException) -> FsmError:
    error = _error(target, exc, f"listing bucket {target.bucket!r}")
    if isinstance(error, S3ObjectMissing):  # a 404 to a listing has no other meaning
        return S3AccessError(f"bucket {target.bucket!r} does not exist at {target.endpoint} "
                             f"(HTTP 404); create it, or fix s3_bucket / s3_endpoint_url")
    return error


def create_bucket_sync(target: S3Target, timeout: float = 10.0) -> None:
    """Create the bucket if it is missing (tests and set-up tools; the controller never
    creates buckets). Needs boto3 (the `dev` extra): obstore has no bucket operations."""
    try:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError("create_bucket_sync needs boto3: pip install 'juicefs-fsm[dev]' "
                          "or pip install boto3") from None
    client = boto3.client(
        "s3", endpoint_url=target.endpoint, aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key, region_name=target.region,
        config=BotoConfig(s3={"addressing_style": "path"}, connect_timeout=CONNECT_TIMEOUT,
                          read_timeout=timeout, retries={"max_attempts": 1}))
    try:
        client.create_bucket(Bucket=target.bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            return
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        raise _judge(target, _Failure(status, code, message, ""),
                     f"creating bucket {target.bucket!r}", exc) from None
    except BotoCoreError as exc:
        raise S3Unavailable(_scrub(f"S3 endpoint {target.endpoint} is unreachable: {exc}",
                                   target)) from None


def list_keys_sync(target: S3Target, prefix: str = "", timeout: float = 10.0) -> list[str]:
    """Every key under `prefix` (tests and diagnostics)."""
    try:
        return [meta["path"] for chunk in obstore.list(_store(target, timeout), prefix or None,
                                                        chunk_size=1000) for meta in chunk]
    except _OBSTORE_ERRORS as exc:
        raise _list_error(target, exc) from None


def _as_target(where: Config | S3Target) -> S3Target:
    return where if isinstance(where, S3Target) else target_of(where)


async def get_text(where: Config | S3Target, key: str) -> str | None:
    """The text of an object of ours (UTF-8), or None when there is no such key."""
    found = await Bucket(_as_target(where), timeout=10.0).get(key)
    return found.body.decode() if found is not None else None


async def put_text(where: Config | S3Target, key: str, text: str) -> None:
    """Write an object of ours (unconditionally; the lease has its own conditional writes)."""
    await Bucket(_as_target(where), timeout=10.0).put(key, text.encode())


# ---- S3 mode at start: whose metadata is this? ------------------------------------------------

def target_of(cfg: Config) -> S3Target:
    return S3Target(cfg.s3_endpoint_url, cfg.s3_bucket, cfg.s3_access_key,
                    cfg.s3_secret_access_key)


def same_bucket(stored: str, configured: str) -> bool:
    """JuiceFS keeps --bucket as given; compare ignoring a trailing slash and the case of the
    scheme and host (the bucket name itself is case-sensitive)."""
    def norm(url: str) -> tuple[str, str, str]:
        parts = urllib.parse.urlsplit(url.strip().rstrip("/"))
        return parts.scheme.lower(), parts.netloc.lower(), parts.path
    return norm(stored) == norm(configured)


def metadata_files(layout: Layout) -> list[Path]:
    """metadata.db and what SQLite and litestream keep beside it."""
    db = layout.metadata_db
    candidates = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                  db.with_name(f".{db.name}-litestream")]
    return [p for p in candidates if p.exists() or p.is_symlink()]


def set_aside(layout: Layout) -> Path:
    """Move the metadata files into a new folder under set-aside/ (kept, never deleted)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = layout.set_aside_dir / f"metadata-{stamp}"
    folder.mkdir(mode=0o700, parents=True)
    os.chmod(layout.set_aside_dir, 0o700)
    for path in metadata_files(layout):
        os.rename(path, folder / path.name)
    return folder


def keep_or_set_aside(cfg: Config, log: Any) -> bool:
    """Keep the local metadata.db only when its format names the configured bucket; otherwise
    move it aside so litestream restores the bucket's copy. True when a db was kept.
    Writeback blocks (cache/<uuid>/rawstaging) are left where they are: they are keyed by the
    volume's UUID, so another volume never uploads them, and the old one finds them again."""
    layout = cfg.layout
    db = layout.metadata_db
    if not db.exists():
        leftovers = metadata_files(layout)
        if leftovers:  # a WAL or litestream state without its db would confuse the restore
            folder = set_aside(layout)
            log.warning("metadata_leftovers_set_aside", files=[p.name for p in leftovers],
                        moved_to=str(folder))
        log.info("metadata_absent", db=str(db))
        return False
    fmt = read_format(db)
    found = str(fmt.get("Bucket", "")) if fmt else ""
    if found and same_bucket(found, cfg.bucket_url):
        log.info("metadata_kept", db=str(db), reason="bucket matches", bucket=found,
                 volume=fmt.get("Name") if fmt else None)
        return True
    reason = (f"it belongs to bucket {found}, not {cfg.bucket_url}" if found
              else "it is not a formatted JuiceFS database")
    folder = set_aside(layout)
    log.warning("metadata_set_aside", db=str(db), reason=reason, found_bucket=found or None,
                configured_bucket=cfg.bucket_url, moved_to=str(folder))
    return False


def make_private(layout: Layout) -> None:
    """metadata.db holds the volume's format, credentials included: owner-only. SQLite gives
    its -wal/-shm files the database's mode."""
    for path in metadata_files(layout):
        if path.is_dir():
            os.chmod(path, 0o700)
            for root, dirs, files in os.walk(path):
                for name in dirs:
                    os.chmod(os.path.join(root, name), 0o700)
                for name in files:
                    os.chmod(os.path.join(root, name), 0o600)
        else:
            os.chmod(path, 0o600)


# ---- the layout before per-volume prefixes -----------------------------------------------------

async def legacy_replica(cfg: Config) -> bool:
    """True when this volume's replica root is empty and the bucket holds a replica at the
    pre-per-volume path `juicefs-metadata/` (shared by every volume of the bucket then)."""
    bucket = Bucket(target_of(cfg), timeout=10.0)
    if await bucket.any_key(replica_prefix(cfg.volume_name) + "/"):
        return False
    return await bucket.any_key(LEGACY_REPLICA_PREFIX + "/")


def legacy_refusal(cfg: Config, fmt: dict[str, Any] | None) -> ConfigError:
    """What to do about a legacy replica that may be this volume's (`fmt`: its format)."""
    source = f"s3://{cfg.s3_bucket}/{LEGACY_REPLICA_PREFIX}/"
    dest = f"s3://{cfg.s3_bucket}/{replica_prefix(cfg.volume_name)}/"
    whose = (f"it is volume {fmt.get('Name')!r} (UUID {fmt.get('UUID')}, bucket "
             f"{fmt.get('Bucket')})" if fmt else "its volume could not be read")
    return ConfigError(
        f"bucket {cfg.s3_bucket!r} is laid out by an older juicefs-fsm: the metadata replica is "
        f"at {LEGACY_REPLICA_PREFIX}/ (shared by every volume of the bucket), not at "
        f"{replica_prefix(cfg.volume_name)}/; {whose}. Nothing was changed. If it is this "
        f"volume's, copy it to the new place and start again (the old keys may stay until you "
        f"are satisfied): `aws s3 cp --recursive --endpoint-url {cfg.s3_endpoint_url} {source} "
        f"{dest}`. If another volume used this bucket too, it holds only the last one's "
        f"metadata: check the Name and UUID above before copying.")


async def legacy_format(cfg: Config, log: Any) -> dict[str, Any] | None:
    """The format (Name, UUID, Bucket) in the legacy replica's latest state, restored into a
    scratch folder under base_dir that is removed afterwards. None when it cannot be read."""
    from .litestream import LitestreamTool

    class Legacy(LitestreamTool):
        @property
        def replica_location(self) -> str:
            return LEGACY_REPLICA_PREFIX

    # Short: its litestream.sock must fit a unix socket path (Config checks base_dir's length).
    scratch = Path(tempfile.mkdtemp(prefix="lr-", dir=cfg.base_dir))
    try:
        os.chmod(scratch, 0o700)  # the format holds the bucket's credentials
        tool = Legacy(dataclasses.replace(cfg, base_dir=scratch), log)
        tool.write_config()
        if not await tool.restore():
            return None
        return read_format(tool.layout.metadata_db)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
