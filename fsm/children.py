"""The processes one controller owns: its juicefs mount (and mounts retired by a flush
remount), its litestream, the tasks watching them, and the chart actions a stop may cancel.

Every module that starts or stops a child goes through one `Children`, so a stop (fsm.shutdown)
finds all of them, and the next start after a crash finds them in the state file
(fsm.leftovers).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from . import leftovers
from .config import Config
from .errors import FsmError
from .proc import Child

# How often a watched child is checked on while it runs (a mount stuck while dying).
WATCH_POLL = 0.5
# The longest teardown waits for a cancelled action to unwind (it kills its child at once).
ACTION_UNWIND = 10.0

Send = Callable[..., Awaitable[Any]]
_Action = TypeVar("_Action", bound=Callable[..., Awaitable[Any]])


class Children:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.mount: Child | None = None
        self.mount_served = False  # the mount became usable (ends after that lose writes)
        self.retired_mounts: list[Child] = []  # handed the mount over to a remount
        self.replicator: Child | None = None
        self.watchers: list[asyncio.Task[None]] = []
        self.actions: set[asyncio.Task[Any]] = set()  # see unwound_before_teardown
        # Other owned mounts (browse mounts of fsm.history): their process groups.
        self.extra_groups: Callable[[], list[int]] = list

    @property
    def pids(self) -> dict[str, int | None]:
        return {"juicefs": self.mount.pid if self.mount and self.mount.running else None,
                "litestream": (self.replicator.pid
                               if self.replicator and self.replicator.running else None)}

    def process_groups(self) -> list[int]:
        """Our children's process groups (each leads its own), with whatever they forked."""
        children = [self.mount, self.replicator, *self.retired_mounts]
        return [c.pid for c in children if c is not None and c.pid is not None] + \
            self.extra_groups()

    def retired_running(self) -> bool:
        return any(c.running for c in self.retired_mounts)

    def kill_all(self) -> list[int]:
        """SIGKILL every child's process group at once (fencing: not one more write). They
        are reaped by whoever waits on them (the watchers, the teardown)."""
        killed = []
        for child in [self.mount, self.replicator, *self.retired_mounts]:
            if child is not None and child.running and child.pid is not None:
                child.kill_group()
                killed.append(child.pid)
        return killed

    def remember(self) -> None:
        """For the next start, should this process die (fsm.leftovers)."""
        leftovers.remember(self.config, [self.mount, self.replicator, *self.retired_mounts])

    def watch(self, child: Child, on_exit: Callable[[int], Awaitable[None]],
              meanwhile: Callable[[Child], Awaitable[None]] | None = None) -> None:
        """`on_exit(returncode)` once `child` exits; `meanwhile(child)` every WATCH_POLL s."""
        async def watch() -> None:
            rc = await (wait_checking(child, meanwhile) if meanwhile and child.running
                        else child.wait())
            await on_exit(rc)
        self.background(watch())

    def background(self, step: Awaitable[None]) -> None:
        """A task that lives until teardown (a watcher, a scheduled restart)."""
        self.watchers = [t for t in self.watchers if not t.done()]
        self.watchers.append(asyncio.ensure_future(step))

    async def cancel_watchers(self) -> None:
        # After mount_lost/replication_lost the teardown runs inside that child's watcher task:
        # cancelling or awaiting itself would abort the clean-up.
        others = [t for t in self.watchers if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self.watchers.clear()

    async def unwind_actions(self) -> None:
        """Chart actions cancelled by leaving their state: let them unwind first."""
        stopped = [t for t in self.actions if t is not asyncio.current_task()]
        if stopped:
            await asyncio.wait(stopped, timeout=ACTION_UNWIND)


def unwound_before_teardown(action: _Action) -> _Action:
    """Marks a chart action (an invoke) that a stop or a failure may cancel midway: teardown
    waits until it has unwound (its one-shot child killed and reaped, partial files removed)
    before it returns, so nothing of it outlives stop(). The owner has a `children`."""
    @functools.wraps(action)
    async def tracked(self: Any, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        assert task is not None
        actions: set[asyncio.Task[Any]] = self.children.actions
        actions.add(task)
        try:
            return await action(self, *args, **kwargs)
        finally:
            actions.discard(task)
    return cast(_Action, tracked)


async def wait_checking(child: Child, check: Callable[[Child], Awaitable[None]]) -> int:
    """child.wait(), running `check(child)` every WATCH_POLL seconds until it returns."""
    exited = asyncio.ensure_future(child.wait())
    try:
        while True:
            done, _ = await asyncio.wait({exited}, timeout=WATCH_POLL)
            if done:
                return exited.result()
            await check(child)
    finally:
        exited.cancel()  # no-op once done


async def together(*steps: Awaitable[Any]) -> list[Any]:
    """Await the steps concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # no-op once done; all of them if we are being cancelled
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc
    return [task.result() for task in tasks]


async def best_effort(step: Awaitable[Any], log: Any, name: str) -> None:
    """Run a fallback step of teardown: a failure is logged and the next fallback runs."""
    try:
        await step
    except FsmError as exc:
        log.warning(f"{name}_failed", error=str(exc))
