"""The live view: `juicefs-fsm run --http HOST:PORT` (docs/live-view.md).

Serves, read-only:
- `/`: one page (fsm/web.html, no build step, no CDN) with the chart as inline SVG from
  fsm.diagram, the current state, the recent transitions, progress, checkpoints and the rest of
  the status. It updates itself from `/events`.
- `/events`: server-sent events; `status` (the full status, as `juicefs-fsm status --json`) on
  connect and after every transition or progress report, `checkpoints` whenever the list may
  have changed.
- `/status`: the status as JSON. `/metrics`: Prometheus text (fsm.metrics).

The socket is bound before the volume starts (a port in use is a configuration error, exit 2,
not a crash mid-start); serving never delays READY, and stops when the daemon exits.
"""

from __future__ import annotations

import asyncio
import errno
import html
import ipaddress
import json
import re
import socket
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .chart import LEAF_STATES
from .config import http_address
from .errors import ConfigError, FsmError
from .logs import get_logger
from .metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from .controller import JuiceFS
    from .transitions import Transition

StatusFn = Callable[[], dict[str, Any]]

# Within this, a dead client is noticed (the write fails) and proxies keep the stream open.
KEEPALIVE = 15.0
# Messages a slow client may fall behind by before it is dropped (its browser reconnects).
_BACKLOG = 256
# The SSE handlers end at once on close; this bounds the wait for any other request.
_SHUTDOWN = 2.0
_NODE = re.compile(r'<g id="(node\d+)" class="node">\s*<title>([^<]+)</title>')
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) can only be reached from this machine."""
    if host.lower() in _LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or 0.0.0.0-style wildcards


def chart_markup() -> str:
    """The chart as inline SVG, each leaf state's node marked `data-state="<id>"`; a plain list
    of the states when Graphviz cannot draw it (dot missing or failing)."""
    from statemachine.contrib.diagram import GraphvizError

    from . import diagram

    try:
        svg = diagram.image("svg").decode()
    except (GraphvizError, OSError, ValueError) as exc:  # no dot, or a broken one: degrade
        get_logger().warning("live_view_chart_unavailable", error=str(exc).strip()[:200],
                             fallback="a list of states")
        items = "".join(f'<li data-state="{s}">{s}</li>' for s in LEAF_STATES)
        return f'<ul class="states">{items}</ul>'
    svg = svg[svg.index("<svg"):]  # no XML prolog/doctype inside HTML
    # Sized by the page: keep the viewBox, drop the fixed width/height in points.
    svg = re.sub(r'<svg width="[^"]*" height="[^"]*"', "<svg", svg, count=1)

    def mark(match: re.Match[str]) -> str:
        state = html.unescape(match.group(2))
        if state not in LEAF_STATES:
            return match.group(0)
        return match.group(0).replace('class="node"', f'class="node" data-state="{state}"', 1)

    return _NODE.sub(mark, svg)


class WebServer:
    """The live view of one controller. bind() (sync, before anything starts), start(),
    close()."""

    def __init__(self, jfs: JuiceFS, address: str, status: StatusFn, log: Any = None) -> None:
        self.jfs = jfs
        self.address = address
        self.host, self.port = http_address(address)
        self.status = status
        self.metrics = Metrics(jfs)
        self.log = (log or get_logger()).bind(component="web")
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._clients: dict[asyncio.Queue[bytes | None], asyncio.Task[Any]] = {}
        self._checkpoints: list[dict[str, Any]] | None = None
        self._listing: asyncio.Task[None] | None = None
        self._relist = False
        self._chart: str | None = None
        self._closing = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def bind(self) -> None:
        """Take the address now: a port in use or a bad host is a ConfigError, before start."""
        fix = "pick another --http address (FSM_HTTP) or stop what listens there"
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"cannot listen on http {self.address}: {exc}; {fix}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            reason = ("the address is already in use" if exc.errno == errno.EADDRINUSE
                      else str(exc))
            raise ConfigError(f"cannot listen on http {self.address}: {reason}; {fix}") from None
        sock.setblocking(False)
        self._sock = sock

    async def start(self) -> None:
        """Serve on the bound socket and follow the controller from now on."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/events", self._events)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=_SHUTDOWN)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        self.metrics.attach()
        self.metrics.after_operation.append(lambda _operation: self._list_checkpoints())
        self.jfs.add_observer(self._on_transition)
        self.jfs.add_progress_observer(lambda _text: self._push_status())
        self.log.info("live_view_listening", url=self.url)
        if not is_loopback(self.host):
            self.log.warning(
                "live_view_not_loopback", url=self.url,
                risk="anyone who can reach this address sees the volume's paths, pids and "
                     "errors, and its metrics; bind 127.0.0.1 and use an SSH tunnel "
                     "(docs/live-view.md)")

    async def close(self) -> None:
        """End the event streams and stop listening (idempotent)."""
        self._closing = True
        for queue in list(self._clients):
            self._send(queue, None)
        if self._listing is not None:
            self._listing.cancel()
            await asyncio.gather(self._listing, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- following the controller ---------------------------------------------------------

    def _on_transition(self, transition: Transition) -> None:
        self._push_status()
        if transition.target == "ready":
            self._list_checkpoints()  # a checkpoint, restore or rollback has just finished

    def _push_status(self) -> None:
        # Taken now, in the observer: the state of this very transition, not a later one.
        if self._clients:
            self._broadcast(_event("status", self.status()))

    def _list_checkpoints(self) -> None:
        """Refresh the list in the background; one listing at a time, again if asked meanwhile."""
        if self._closing:
            return
        if self._listing is not None and not self._listing.done():
            self._relist = True
            return
        self._listing = asyncio.create_task(self._refresh_checkpoints())

    async def _refresh_checkpoints(self) -> None:
        while True:
            self._relist = False
            try:
                listed = [cp.to_json() for cp in await self.jfs.list_checkpoints()]
            except FsmError as exc:  # not ready any more: keep showing the last list
                self.log.debug("live_view_checkpoints_skipped", reason=str(exc))
            else:
                self._checkpoints = listed
                self._broadcast(_event("checkpoints", listed))
            if not self._relist:
                return

    def _broadcast(self, message: bytes) -> None:
        for queue in list(self._clients):
            self._send(queue, message)

    def _send(self, queue: asyncio.Queue[bytes | None], message: bytes | None) -> None:
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:  # too slow to keep up: drop it, its browser reconnects
            task = self._clients.pop(queue, None)
            if task is not None:
                task.cancel()

    # ---- HTTP -------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # On loopback, answer only requests addressed to loopback: a web page elsewhere that
        # points its own name at 127.0.0.1 (DNS rebinding) must not read the status.
        if is_loopback(self.host) and not is_loopback(_host_name(request.host)):
            raise web.HTTPMisdirectedRequest(text="this live view answers loopback names only\n")
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def _page(self, request: web.Request) -> web.Response:
        if self._chart is None:
            self._chart = await asyncio.to_thread(chart_markup)  # dot: once, off the loop
        status = self.status()
        values = {
            "title": html.escape(f"juicefs-fsm: {status.get('volume_name', '')} "
                                 f"({status.get('state')})"),
            "state": html.escape(str(status.get("state"))),
            "chart": self._chart,
            # Inside <script>: "</" must not end the element early.
            "status": _json(status).replace("</", "<\\/"),
        }
        page = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], _template())
        return web.Response(text=page, content_type="text/html")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(text=_json(self.status()) + "\n", content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.metrics.refresh()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        if self._closing:
            raise web.HTTPServiceUnavailable(text="the daemon is exiting\n")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_BACKLOG)
        task = asyncio.current_task()
        assert task is not None
        await response.prepare(request)
        self._clients[queue] = task
        try:
            # The browser reconnects after 1 s when the stream ends (a daemon restart).
            await response.write(b"retry: 1000\n\n" + _event("status", self.status()))
            if self._checkpoints is not None:
                await response.write(_event("checkpoints", self._checkpoints))
            elif self.jfs.state == "ready":
                self._list_checkpoints()
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    message = b": keep-alive\n\n"
                if message is None:
                    break
                await response.write(message)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the browser went away, it fell too far behind, or the server is closing
        finally:
            self._clients.pop(queue, None)
        return response


def _host_name(host: str | None) -> str:
    """The name in a Host header: `[::1]:8080` -> `::1`, `localhost:8080` -> `localhost`."""
    if not host:
        return ""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _json(value: Any) -> str:
    return json.dumps(value, default=str)  # as the control socket encodes it


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {_json(data)}\n\n".encode()


def _template() -> str:
    return resources.files("fsm").joinpath("web.html").read_text(encoding="utf-8")

