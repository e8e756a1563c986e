"""The daemon's control socket, `{base_dir}/fsm.sock` (mode 0600), and its client.

Protocol (fixed; `juicefs-fsm diagram --base-dir` and the CLI verbs use it): one JSON object per
line. Request `{"op": "status" | "checkpoint" | "restore" | "checkpoints" | "delete" | "history" |
"browse" | "unbrowse" | "rollback", ...args}` (checkpoint, restore and delete take `"id"`; browse
and rollback take `"at"`, a time as fsm.timepoints.parse_time reads it; unbrowse takes `"at"` (a
time or a browse mount's path) or `"all": true`). Response `{"ok": true, "result": ...}` or
`{"ok": false, "error": "<message>", "type": "<ErrorClass>"}`. A connection may carry several
requests in turn; each gets one response line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoints as cps
from . import errors
from .errors import ConfigError, ControlError, FsmError
from .layout import Layout
from .logs import get_logger, ms_since

if TYPE_CHECKING:
    from .controller import JuiceFS

OPS = ("status", "checkpoint", "restore", "checkpoints", "delete", "history", "browse",
       "unbrowse", "rollback")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SUN_PATH = 107
# Requests are a verb, an id or a time: a few hundred bytes. Anything bigger is refused unread.
_LINE_LIMIT = 64 << 10
# {"op": "x", "id": "y"} is depth 1; deeper structure is never needed.
MAX_DEPTH = 8
# A number in a request is a Unix time at most (int() of a longer one costs quadratic time).
_MAX_NUMBER_CHARS = 40
# A connection that sends no complete request (or does not read its answer) for this long is
# closed: otherwise silent clients would hold a descriptor each, forever.
IDLE_TIMEOUT = 60.0
# Beyond this many open connections a new one is answered with an error and closed.
MAX_CONNECTIONS = 64
# A client's wait: finite, and at most a week (a checkpoint of a huge tree takes hours).
MAX_CLIENT_TIMEOUT = 7 * 24 * 3600.0
# Reading state answers at once; clone/rmr of a big tree can take a while.
_TIMEOUTS = {"status": 10.0, "checkpoints": 30.0, "history": 60.0}
_OP_TIMEOUT = 600.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class DaemonUnreachable(ControlError):
    """No daemon answers on the control socket (not running, or not ours to talk to)."""


def socket_path(base_dir: Path | str) -> Path:
    return Layout(Path(base_dir).expanduser().absolute()).control_socket


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A name connect()/bind() accept. Paths longer than sun_path go through the directory's
    /proc/self/fd entry, so a deep base_dir still works."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answers(path: Path) -> bool:
    """True when something accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, _address(path) as addr:
        probe.settimeout(2.0)
        try:
            probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
    return True


# ---- server --------------------------------------------------------------------------------

class ControlServer:
    """Serves the protocol for one JuiceFS controller. `extra_status()` is merged into the
    status result (the daemon adds versions and its own pid)."""

    def __init__(self, jfs: JuiceFS, *,
                 extra_status: Callable[[], dict[str, Any]] | None = None,
                 log: Any = None) -> None:
        self.jfs = jfs
        self.path = jfs.layout.control_socket
        self._extra_status = extra_status or dict
        self.log = (log or get_logger()).bind(component="control")
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._ops: dict[str, Handler] = {
            "status": self._status, "checkpoint": self._checkpoint, "restore": self._restore,
            "checkpoints": self._checkpoints, "delete": self._delete,
            "history": self._history, "browse": self._browse, "unbrowse": self._unbrowse,
            "rollback": self._rollback,
        }

    async def start(self) -> None:
        """Bind {base_dir}/fsm.sock with mode 0600. Refuses when another daemon answers there:
        two controllers on one volume would corrupt it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(self.path) as addr:
                # The umask makes the socket 0600 from its creation (no window where it is
                # world-connectable); nothing else runs in this process between the two calls.
                old = os.umask(0o177)
                try:
                    sock.bind(addr)
                finally:
                    os.umask(old)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=_LINE_LIMIT)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self.path}: {exc}") from exc
        self.log.info("control_listening", socket=str(self.path))

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{self.path} exists and is not a socket; move it away")
        if _answers(self.path):
            raise ControlError(
                f"another juicefs-fsm daemon is already running for {self.path.parent} (its "
                f"control socket answers); stop it first, or use another --base-dir")
        self.path.unlink()
        self.log.info("control_stale_socket_removed", socket=str(self.path))

    def cancel_requests(self) -> None:
        """Drop requests in flight (the volume failed, or stop was escalated): their callers get
        a closed connection instead of waiting on an operation that will not finish."""
        for task in self._connections:
            task.cancel()

    async def close(self) -> None:
        """Stop listening, end open connections, remove the socket file if it is still ours."""
        if self._server is None:
            return
        self._server.close()
        self.cancel_requests()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        crowded = len(self._connections) >= MAX_CONNECTIONS
        self._connections.add(task)
        try:
            if crowded:
                self.log.warning("control_connection_refused", open=len(self._connections) - 1,
                                 limit=MAX_CONNECTIONS)
                await self._answer(writer, _failure(ControlError(
                    f"too many open connections to the control socket ({MAX_CONNECTIONS}); "
                    f"try again (idle ones are closed after {IDLE_TIMEOUT:g}s)")))
                return
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.CancelledError, asyncio.TimeoutError):
            pass  # the client went away or stalled, or the daemon is closing this connection
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                await self._answer(writer, _failure(ControlError(
                    f"no complete request for {IDLE_TIMEOUT:g}s: closing the connection")))
                return
            except ValueError:  # longer than the limit: answer, then hang up
                await self._answer(writer, _failure(ControlError(
                    f"request longer than {_LINE_LIMIT} bytes: a request is one short JSON "
                    f"object on one line, e.g. {{\"op\": \"status\"}}")))
                return
            if not line:
                return
            await self._answer(writer, await self.dispatch(line))

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        """Write one response line; a client that does not read it in IDLE_TIMEOUT is dropped
        (TimeoutError) rather than holding the connection."""
        writer.write(_encode(response))
        await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """One request line -> one response object. Never raises for a bad request."""
        started = time.monotonic()
        op = "?"
        try:
            request = _decode(line)
            op = str(request.get("op"))
            handler = self._ops.get(op)
            if handler is None:
                raise ControlError(f"unknown op {request.get('op')!r}; use one of "
                                   + ", ".join(OPS))
            response = {"ok": True, "result": await handler(request)}
        except FsmError as exc:
            response = _failure(exc)
        except Exception as exc:  # a bug: answer, keep serving, log the traceback
            self.log.exception("control_request_crashed", op=op)
            response = _failure(exc)
        level = self.log.debug if op == "status" and response["ok"] else self.log.info
        level("control_request", op=op, ok=response["ok"],
              duration_ms=ms_since(started),
              **({} if response["ok"] else {"error": response["error"]}))
        return response

    # ---- operations ----------------------------------------------------------------------

    async def _status(self, request: dict[str, Any]) -> Any:
        return {**self.jfs.status(), **self._extra_status()}

    async def _checkpoint(self, request: dict[str, Any]) -> Any:
        return (await self.jfs.checkpoint(_id(request))).to_json()

    async def _restore(self, request: dict[str, Any]) -> Any:
        return (await self.jfs.restore(_id(request))).to_json()

    async def _checkpoints(self, request: dict[str, Any]) -> Any:
        return [cp.to_json() for cp in await self.jfs.list_checkpoints()]

    async def _delete(self, request: dict[str, Any]) -> Any:
        cp_id = _id(request)
        await self.jfs.delete_checkpoint(cp_id)
        return {"id": cp_id}


    # ---- time travel (fsm.history) ----------------------------------------------------

    async def _history(self, request: dict[str, Any]) -> Any:
        window = (await self.jfs.list_restore_points()).to_json()
        return {**window, "browsing": [b.to_json() for b in self.jfs.browsing()]}

    async def _browse(self, request: dict[str, Any]) -> Any:
        return (await self.jfs.browse(_at(request))).to_json()

    async def _unbrowse(self, request: dict[str, Any]) -> Any:
        if request.get("all"):
            closed: list[dict[str, Any]] = []
            busy: list[str] = []
            for browse in self.jfs.browsing():
                try:
                    closed.append((await self.jfs.unbrowse(browse)).to_json())
                except errors.InUse as exc:  # the others are still closed
                    busy.append(str(exc))
            if busy:
                raise errors.InUse(f"closed {len(closed)}, not all: " + "; ".join(busy))
            return {"closed": closed}
        return {"closed": [(await self.jfs.unbrowse(_at(request))).to_json()]}

    async def _rollback(self, request: dict[str, Any]) -> Any:
        return (await self.jfs.rollback(_at(request))).to_json()


def _at(request: dict[str, Any]) -> str:
    at = request.get("at")
    if not isinstance(at, (str, int, float)) or isinstance(at, bool) or at == "":
        raise ControlError(f"op {request['op']!r} needs \"at\": a time such as "
                           f"2026-01-02T03:04:05Z, Unix seconds, or -5m")
    return str(at)


def _id(request: dict[str, Any]) -> str:
    if "id" not in request:
        raise ControlError(f"op {request['op']!r} needs \"id\": the checkpoint id")
    return cps.validate_id(request["id"])


def _decode(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("request is not UTF-8: send one JSON object per line, "
                           "e.g. {\"op\": \"status\"}") from None
    try:
        request = json.loads(text, parse_int=_number(int), parse_float=_number(float),
                             parse_constant=_no_constant)
    except RecursionError:
        raise ControlError(_too_deep()) from None
    except ValueError:
        raise ControlError("request is not valid JSON: send one JSON object per line, "
                           "e.g. {\"op\": \"status\"}") from None
    if not isinstance(request, dict):
        raise ControlError("request must be a JSON object, e.g. {\"op\": \"status\"}")
    if _depth(request) > MAX_DEPTH:
        raise ControlError(_too_deep())
    return request


def _too_deep() -> str:
    return (f"request nested deeper than {MAX_DEPTH} levels: a request is a flat JSON object, "
            f"e.g. {{\"op\": \"checkpoint\", \"id\": \"cp-1\"}}")


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > _MAX_NUMBER_CHARS:
            raise ControlError(f"a number in the request has {len(text)} characters; at most "
                               f"{_MAX_NUMBER_CHARS} (numbers are Unix times)")
        value = kind(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise ControlError(f"the number {text} in the request is out of range")
        return value
    return parse


def _no_constant(name: str) -> Any:
    raise ControlError(f"{name} is not a number a request may carry (not JSON either)")


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep `value` nests, counting no further than limit + 1."""
    if not isinstance(value, (dict, list)) or limit < 0:
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def check_timeout(timeout: float) -> float:
    """A client's wait in seconds: finite, > 0 and at most MAX_CLIENT_TIMEOUT."""
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
            and math.isfinite(timeout) and 0 < timeout <= MAX_CLIENT_TIMEOUT):
        raise ConfigError(f"timeout must be a number of seconds > 0 and <= "
                          f"{MAX_CLIENT_TIMEOUT:.0f} (a week), got {timeout!r}")
    return float(timeout)


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": str(exc) or type(exc).__name__, "type": type(exc).__name__}


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode() + b"\n"


# ---- client --------------------------------------------------------------------------------

def call(base_dir: Path | str, op: str, *, timeout: float | None = None, **args: Any) -> Any:
    """Send one request to the daemon for `base_dir` and return its result.

    Raises DaemonUnreachable (a ControlError) when no daemon answers, the FsmError subclass the
    daemon reported (e.g. CheckpointNotFound, NotReadyError) when it refused, or ControlError."""
    path = socket_path(base_dir)
    wait = check_timeout(timeout) if timeout is not None else _TIMEOUTS.get(op, _OP_TIMEOUT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        _connect(sock, path)
        try:
            sock.sendall(_encode({"op": op, **args}))
            raw = _read_line(sock)
        except TimeoutError:
            raise ControlError(f"the daemon for {path.parent} did not answer {op!r} within "
                               f"{wait:g}s") from None
        except OSError as exc:
            raise ControlError(f"lost the connection to {path}: {exc}") from exc
    if not raw:
        raise ControlError(f"the daemon for {path.parent} closed the connection without "
                           f"answering {op!r} (it may be stopping or failed; see its log)")
    try:
        response = json.loads(raw)
    except ValueError:
        raise ControlError(f"{path} answered something that is not JSON: {raw[:80]!r}") from None
    if not isinstance(response, dict):
        raise ControlError(f"{path} answered {raw[:80]!r}, not a JSON object")
    if response.get("ok"):
        return response.get("result")
    raise remote_error(str(response.get("type", "")), str(response.get("error", "")))


def _connect(sock: socket.socket, path: Path) -> None:
    base_dir = path.parent
    try:
        with _address(path) as addr:
            sock.connect(addr)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonUnreachable(
            f"no daemon is running for {base_dir}: start it with "
            f"`juicefs-fsm run --base-dir {base_dir}`") from None
    except PermissionError:
        raise DaemonUnreachable(
            f"permission denied on {path}: the control socket is mode 0600, so run this as "
            f"the daemon's user (usually root)") from None
    except OSError as exc:
        raise DaemonUnreachable(f"cannot connect to {path}: {exc}") from exc


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks).split(b"\n", 1)[0]


def remote_error(type_name: str, message: str) -> FsmError:
    """The daemon's error as the same FsmError subclass when we know it, else ControlError.
    Only the message travels: attributes such as NotReadyError.state are not restored."""
    cls = getattr(errors, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, FsmError)):
        return ControlError(message or f"the daemon answered with {type_name or 'an error'}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc
