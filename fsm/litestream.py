"""Adapter for the `litestream` binary (0.5): config, restore, replicate, and the sync barrier
(asked on the control socket of the running `litestream replicate`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ToolError
from .layout import replica_prefix
from .logs import ms_since
from .proc import Child, child_env, run
from .timepoints import snapshot_lines

# Makes litestream 0.5 fail to start its S3 replica ("unable to add custom RootCAs").
_DROPPED_ENV = ("AWS_CA_BUNDLE",)
# The sync barrier's answer may take litestream's own timeout; this long more, and it is late.
SYNC_MARGIN = 5.0


def _q(value: str) -> str:
    # A JSON string is a valid YAML scalar, so paths with odd characters stay intact.
    return json.dumps(value)


def _has_entries(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False


async def _accepts(sock: Path) -> bool:
    """True when a process listens on the unix socket `sock`."""
    try:
        _reader, writer = await asyncio.open_unix_connection(str(sock))
    except OSError:  # absent, refused (not listening yet), or gone
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Received:
    """A whole HTTP answer, as http.client.HTTPResponse reads one from a socket."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def makefile(self, *_args: Any, **_kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._raw)


async def _post(sock: Path, path: str, payload: dict[str, Any]) -> tuple[int, str]:
    """POST `payload` as JSON to `path` of the HTTP server on the unix socket `sock`:
    (status, body). asyncio carries it (cancellable, no thread); the standard library's
    http.client parses the answer (Content-Length or chunked). `Connection: close`: the
    answer ends where the stream does. An HTTP client library costs this process ~100 ms of
    import and ~10 MiB for one request per barrier."""
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: litestream\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    response = http.client.HTTPResponse(_Received(raw))  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read().decode(errors="replace")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def write_private(path: Path, text: str, *, durable: bool = True) -> None:
    """Write atomically with mode 0600 from the first byte (never briefly world-readable).
    `durable=False` skips the fsync (~1 ms, more under I/O load) for files that need not
    survive a power loss, e.g. one rewritten on every start."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _DebugOutput:
    """A logger whose info events go out at debug: `ltx -json` and `restore -json` print
    several stdout lines per LTX file, which would flood the log at info."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def info(self, event: str, **fields: Any) -> None:
        self._log.debug(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class LitestreamTool:
    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg = cfg
        self.layout = cfg.layout
        self.bin = str(cfg.litestream_bin)
        self.log = log.bind(tool="litestream")
        extra = {} if cfg.local_mode else {
            "LITESTREAM_ACCESS_KEY_ID": cfg.s3_access_key,
            "LITESTREAM_SECRET_ACCESS_KEY": cfg.s3_secret_access_key}
        self.env = child_env(extra, drop=_DROPPED_ENV)
        self.secrets = cfg.secrets()
        # Below the replica root: "" (the root itself) until a rollback starts a new history
        # there (fsm.rollback records the switch and sets this before the config is written).
        self.replica_subpath = ""

    @property
    def replica_location(self) -> str:
        """The replica in use: a folder (local mode) or a key prefix in the bucket (S3)."""
        if self.cfg.local_mode:
            root = str(self.layout.litestream_replica_dir)
            return f"{root}/{self.replica_subpath}" if self.replica_subpath else root
        root = replica_prefix(self.cfg.volume_name)
        return f"{root}/{self.replica_subpath}" if self.replica_subpath else root

    def config_text(self) -> str:
        lay = self.layout
        if self.cfg.local_mode:
            replica = ["      type: file", f"      path: {_q(self.replica_location)}"]
        else:
            replica = [
                "      type: s3",
                f"      endpoint: {_q(self.cfg.s3_endpoint_url)}",
                f"      bucket: {_q(self.cfg.s3_bucket)}",
                f"      path: {_q(self.replica_location)}",
                "      force-path-style: true",
                # Placeholders expanded by litestream from its own environment.
                "      access-key-id: ${LITESTREAM_ACCESS_KEY_ID}",
                "      secret-access-key: ${LITESTREAM_SECRET_ACCESS_KEY}",
            ]
        return "\n".join([
            "# Written by juicefs-fsm; regenerated on every start.",
            "socket:",
            "  enabled: true",
            f"  path: {_q(str(lay.litestream_socket))}",
            "  permissions: 0600",
            *snapshot_lines(self.cfg),
            "dbs:",
            f"  - path: {_q(str(lay.metadata_db))}",
            "    replica:",
            *replica,
            "",
        ])

    def write_config(self) -> None:
        # Rewritten before every use, so a power loss cannot leave a stale one behind.
        write_private(self.layout.litestream_config, self.config_text(), durable=False)

    async def _run(self, action: str, *args: str, timeout: float | None = None,
                   quiet: bool = False) -> str:
        log = _DebugOutput(self.log) if quiet else self.log
        done = await run("litestream", action, [self.bin, *args], env=self.env, log=log,
                         secrets=self.secrets, timeout=timeout)
        return done.stdout

    async def version(self) -> str:
        return (await self._run("version", "version")).strip()

    async def restore(self) -> bool:
        """Restore metadata.db from the replica if it has one. True when a db was restored."""
        if self.cfg.local_mode and not _has_entries(self.layout.litestream_replica_dir):
            # Nothing to restore from an empty folder, whatever the replica layout; skipping
            # the process saves ~25 ms of every first start (bench/, BENCHMARKS.md).
            return False
        db = self.layout.metadata_db
        try:
            await self._run("restore", "restore", "-config", str(self.layout.litestream_config),
                            "-if-replica-exists", str(db))
        except BaseException:
            # litestream writes <db>.tmp and renames it when complete, so an interrupted
            # restore leaves no metadata.db, only that partial copy (as big as the db).
            partial = db.with_name(db.name + ".tmp")
            if partial.exists():
                partial.unlink()
                self.log.info("partial_restore_removed", path=str(partial))
            raise
        return db.exists()

    def replicate_child(self) -> Child:
        return Child("litestream", [self.bin, "replicate", "-config",
                                    str(self.layout.litestream_config)],
                     env=self.env, log=self.log, secrets=self.secrets)

    async def wait_serving(self, child: Child, timeout: float = 15.0) -> None:
        """litestream is replicating once its control socket accepts a connection (the file
        appears at bind(), a moment before listen(): a connection then is refused)."""
        deadline = time.monotonic() + timeout
        sock = self.layout.litestream_socket
        while not await _accepts(sock):
            if not child.running:
                await child.wait()
                raise ToolError("litestream", "replicate", child.returncode, child.stderr_tail())
            if time.monotonic() > deadline:
                raise ToolError("litestream", f"replicate (no control socket after {timeout:g}s)",
                                None, child.stderr_tail())
            await asyncio.sleep(0.005)

    async def sync(self, timeout: float = 30.0) -> str:
        """Durability barrier: returns once the replica holds the db's current transaction;
        returns that transaction id (decimal; "" if litestream gave none). Asked of the
        running `litestream replicate` on its control socket, the request `litestream sync
        -wait` sends: that process cost ~30 ms per barrier on 2 busy cores, paid by every
        start (the watermark sample), checkpoint and stop (bench/, BENCHMARKS.md)."""
        sock = self.layout.litestream_socket
        request = {"path": str(self.layout.metadata_db), "wait": True,
                   "timeout": max(1, math.ceil(timeout))}
        started = time.monotonic()
        try:
            status, text = await asyncio.wait_for(_post(sock, "/sync", request),
                                                  timeout + SYNC_MARGIN)
        except asyncio.TimeoutError as exc:
            raise ToolError("litestream", "sync", None,
                            f"no answer on {sock} within {timeout + SYNC_MARGIN:g}s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ToolError("litestream", "sync", 1,
                            f"cannot reach litestream's control socket {sock}: {exc!r}") from exc
        answer = _json_object(text)
        if status != 200:
            raise ToolError("litestream", "sync", 1,
                            f"HTTP {status}: {answer.get('error') or text.strip()}")
        txid = answer.get("txid")
        self.log.debug("litestream_synced", txid=txid, replicated_txid=answer.get(
            "replicated_txid"), status=answer.get("status"), duration_ms=ms_since(started))
        return str(txid) if isinstance(txid, int) else ""

    # ---- time travel (fsm.history, fsm.pointintime) -----------------------------------------

    async def ltx_files(self) -> list[dict[str, Any]]:
        """Every LTX file of the replica in use, all levels (`litestream ltx -json`): `level`,
        `min_txid`, `max_txid` (hex), `size`, `timestamp` (RFC 3339, whole seconds)."""
        out = await self._run("ltx", "ltx", "-config", str(self.layout.litestream_config),
                              "-level", "all", "-json", str(self.layout.metadata_db),
                              timeout=120, quiet=True)
        files = json.loads(out) if out.strip() else []
        return files if isinstance(files, list) else []

    async def restore_to(self, output: Path, timestamp: str, *,
                         dry_run: bool = False) -> dict[str, Any]:
        """Restore the replica's state at `timestamp` (RFC 3339) into `output`, a new file
        (never metadata.db). `dry_run` returns litestream's plan (`files`, `max_txid`)
        without writing; otherwise the summary (`txid`)."""
        args = ["restore", "-config", str(self.layout.litestream_config), "-json",
                "-timestamp", timestamp, "-o", str(output)]
        if dry_run:
            args.append("-dry-run")
        out = await self._run("restore (point in time)", *args, str(self.layout.metadata_db),
                              timeout=600, quiet=True)
        summary = json.loads(out) if out.strip() else {}
        return summary if isinstance(summary, dict) else {}
