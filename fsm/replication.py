"""Keeping litestream running: spawn it, watch it, restart it within a budget, and the
durability barrier (`litestream sync -wait`, asked on litestream's control socket) the
operations wait on.

litestream exiting is survivable: while the restart budget lasts (replication_restarts within
replication_restart_window seconds) the chart schedules a restart with backoff and the volume
stays where it is (fsm.chart: `replication_lost`, `restart_replication`); past the budget the
volume fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

from .checkpoints import Checkpoint
from .children import Children, Send
from .config import Config
from .errors import FsmError, NotReplicated, ReplicationLost, ToolError
from .litestream import LitestreamTool
from .proc import Child

# litestream restarts: the first after this many seconds, doubling up to the maximum.
RESTART_BACKOFF = 0.2
RESTART_BACKOFF_MAX = 5.0


class Replication:
    def __init__(self, config: Config, litestream: LitestreamTool, children: Children,
                 send: Send, log: Any) -> None:
        self.config = config
        self.litestream = litestream
        self.children = children
        self.send = send
        self.log = log
        self.up = asyncio.Event()  # litestream serves its control socket
        self._restart_times: deque[float] = deque()  # recent restarts (monotonic)
        self.restarts = 0

    async def spawn(self) -> Child:
        with contextlib.suppress(FileNotFoundError):
            self.config.layout.litestream_socket.unlink()  # a leftover would look alive
        child = self.litestream.replicate_child()
        self.children.replicator = child
        await child.start()
        self.children.remember()
        return child

    async def serving(self, replicator: Child) -> None:
        """Wait until litestream serves its control socket; watched from then on."""
        await self.litestream.wait_serving(replicator)
        self.up.set()
        self._watch(replicator)

    def _watch(self, child: Child) -> None:
        async def lost(rc: int) -> None:
            await self.send("replication_lost", error=ReplicationLost(
                f"litestream (pid {child.pid}) exited with {rc} while in use"
                f"{self._restart_note()}:\n{child.stderr_tail()}"))
        self.children.watch(child, lost)

    # ---- restarts (chart actions, wired by fsm.controller) -------------------------------

    def restartable(self) -> bool:
        """Within the budget: fewer than replication_restarts restarts in the window."""
        return self._recent_restarts() < self.config.replication_restarts

    def _recent_restarts(self) -> int:
        now = time.monotonic()
        while self._restart_times and \
                now - self._restart_times[0] > self.config.replication_restart_window:
            self._restart_times.popleft()
        return len(self._restart_times)

    def _restart_note(self) -> str:
        return (f" ({self._recent_restarts()} restart(s) in the last "
                f"{self.config.replication_restart_window:g} s; replication_restarts="
                f"{self.config.replication_restarts} allowed)")

    def schedule_restart(self, error: BaseException | None = None) -> None:
        self.up.clear()
        self._restart_times.append(time.monotonic())
        attempt = len(self._restart_times)
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (attempt - 1))
        self.log.warning("replication_restart_scheduled", attempt=attempt,
                         limit=self.config.replication_restarts,
                         window_s=self.config.replication_restart_window, in_s=delay,
                         error=str(error))

        async def after_backoff() -> None:
            await asyncio.sleep(delay)
            await self.send("restart_replication")
        self.children.background(after_backoff())

    async def respawn(self) -> None:
        child = await self.spawn()
        self.restarts += 1
        self.log.warning("replication_restarted", pid=child.pid, restarts=self.restarts)
        self._watch(child)
        self.children.background(self._serving_again(child))

    async def _serving_again(self, child: Child) -> None:
        try:
            await self.litestream.wait_serving(child)
        except ToolError as exc:
            if child.running:  # alive but not serving: end it, its watcher counts a restart
                self.log.error("replication_not_serving", pid=child.pid, error=str(exc))
                await child.kill()
            return
        self.up.set()
        self.log.info("replication_serving", pid=child.pid)

    # ---- the durability barrier ------------------------------------------------------------

    async def sync(self) -> str:
        """The `litestream sync -wait` barrier (fsm.litestream), after a restart in progress
        (bounded wait; the sync then reports a litestream that is still not back). A shared
        metadata engine commits each change durably itself: nothing to wait for."""
        if self.config.meta_url:
            return ""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.up.wait(), self.config.litestream_stop_timeout)
        return await self.litestream.sync()

    async def sync_made(self, done: str, result: Checkpoint) -> None:
        """The barrier after a change that is already made: its failure must say so, or the
        caller would repeat an operation that succeeded."""
        try:
            await self.sync()
        except FsmError as exc:
            self.log.error("not_replicated", what=done, error=str(exc))
            raise NotReplicated(
                f"{done}, but its replication could not be confirmed: {exc}. It is in the "
                f"local metadata.db and is replicated once litestream answers again (see "
                f"status()); do not repeat it", result) from exc
