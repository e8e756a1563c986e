"""S3 mode: a small S3 client of our own, and whose metadata a start should use.

The client (stdlib only) sends one SigV4-signed request to check the bucket. Why not the
juicefs/litestream binaries: their SDKs retry internally for a long time (`litestream restore`
against a closed port took ~4 minutes, `juicefs format` ~12 s), and a wrong secret comes back
buried in a stderr tail. One signed request answers in milliseconds and says whether the
problem is transient (connection refused, timeout, 5xx) or not (403, 404).

At start, the local metadata.db is kept only when its format names the configured bucket;
otherwise it is moved under set-aside/ (never deleted) and litestream restores the bucket's copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config
from .errors import S3AccessError, S3Unavailable
from .juicefs import read_format
from .layout import Layout

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_REGION = "us-east-1"
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_REGION = re.compile(r"<Region>([^<]+)</Region>")


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
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def code(self) -> str:
        """The S3 error code from the XML body ('' when there is none, e.g. for HEAD)."""
        found = _CODE.search(self.body.decode("utf-8", "replace"))
        return found.group(1) if found else ""

    @property
    def message(self) -> str:
        found = _MESSAGE.search(self.body.decode("utf-8", "replace"))
        return found.group(1) if found else ""


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _quote(text: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(text, safe=safe)


def sign(target: S3Target, method: str, path: str, query: dict[str, str], host: str,
         payload_sha256: str = EMPTY_SHA256, now: datetime | None = None) -> dict[str, str]:
    """The headers of an AWS Signature Version 4 request (service s3)."""
    moment = now or datetime.now(timezone.utc)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        method,
        _quote(path, safe="/-_.~"),
        "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items())),
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
        signed,
        payload_sha256,
    ])
    scope = f"{day}/{target.region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{target.secret_key}".encode(), day), target.region),
                      "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={target.access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


def request(target: S3Target, method: str, key: str = "", query: dict[str, str] | None = None,
            body: bytes = b"", timeout: float = 5.0) -> Response:
    """One signed path-style request to the bucket (or an object in it). Blocking.
    Network failures raise OSError / http.client.HTTPException; any HTTP answer is returned."""
    parts = urllib.parse.urlsplit(target.endpoint)
    host = parts.netloc
    path = f"/{target.bucket}" + (f"/{key}" if key else "")
    query = query or {}
    headers = sign(target, method, path, query, host, hashlib.sha256(body).hexdigest())
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, timeout=timeout)
    url = _quote(path, safe="/-_.~")
    if query:
        url += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    try:
        conn.request(method, url, body=body or None, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    finally:
        conn.close()


def _redirected_region(target: S3Target, answer: Response) -> str | None:
    """The bucket's region when S3 says we signed for the wrong one."""
    if answer.status not in (301, 400):
        return None
    region = answer.headers.get("x-amz-bucket-region")
    if not region:
        found = _REGION.search(answer.body.decode("utf-8", "replace"))
        region = found.group(1) if found else None
    return region if region and region != target.region else None


def check_bucket_sync(target: S3Target, timeout: float = 5.0) -> str:
    """List at most one key of the bucket, as juicefs and litestream will. Returns the region
    the bucket answered in. Raises S3Unavailable (worth retrying) or S3AccessError (not)."""
    query = {"list-type": "2", "max-keys": "1"}
    try:
        answer = request(target, "GET", query=query, timeout=timeout)
        region = _redirected_region(target, answer)
        if region:
            target = S3Target(target.endpoint, target.bucket, target.access_key,
                              target.secret_key, region)
            answer = request(target, "GET", query=query, timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        raise S3AccessError(
            f"the TLS certificate of {target.endpoint} was not accepted ({exc.verify_message}); "
            f"fix the endpoint URL or install its CA (SSL_CERT_FILE)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise S3Unavailable(f"S3 endpoint {target.endpoint} is unreachable: "
                            f"{exc.__class__.__name__}: {exc}") from None
    _raise_for(target, answer)
    return target.region


def _raise_for(target: S3Target, answer: Response) -> None:
    if 200 <= answer.status < 300:
        return
    code, status = answer.code, answer.status
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (
        f": {answer.message}" if answer.message else "")
    if status >= 500 or status in (408, 429) or code in {"SlowDown", "RequestTimeout",
                                                         "InternalError", "ServiceUnavailable"}:
        raise S3Unavailable(f"S3 at {target.endpoint} is not serving yet ({detail})")
    if code == "NoSuchBucket" or (status == 404 and not code):
        raise S3AccessError(
            f"bucket {target.bucket!r} does not exist at {target.endpoint} ({detail}); "
            f"create it, or fix s3_bucket / s3_endpoint_url")
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        raise S3AccessError(
            f"S3 at {target.endpoint} rejected the credentials ({detail}); "
            f"check s3_access_key and s3_secret_access_key")
    if status in (401, 403):
        raise S3AccessError(
            f"S3 at {target.endpoint} denied listing bucket {target.bucket!r} ({detail}); "
            f"the credentials need read, write and list permission on it")
    raise S3AccessError(f"S3 at {target.endpoint} refused the request for bucket "
                        f"{target.bucket!r} ({detail}); check the endpoint and bucket settings")


async def check_bucket(target: S3Target, timeout: float = 5.0) -> str:
    return await asyncio.to_thread(check_bucket_sync, target, timeout)


def create_bucket_sync(target: S3Target, timeout: float = 10.0) -> None:
    """PUT the bucket (tests and set-up tools; the controller never creates buckets)."""
    answer = request(target, "PUT", timeout=timeout)
    if answer.status not in (200, 409):
        _raise_for(target, answer)


def list_keys_sync(target: S3Target, prefix: str = "", timeout: float = 10.0) -> list[str]:
    """Keys under `prefix` (first page only: enough for tests and diagnostics)."""
    answer = request(target, "GET", query={"list-type": "2", "prefix": prefix},
                     timeout=timeout)
    _raise_for(target, answer)
    with contextlib.suppress(UnicodeDecodeError):
        return re.findall(r"<Key>([^<]+)</Key>", answer.body.decode())
    return []


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
