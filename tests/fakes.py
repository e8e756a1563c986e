"""Fake juicefs/litestream adapters for the property-based tests of the chart.

These are fault injection, and nothing else: a real juicefs or litestream cannot be made to fail
at an exact step on demand (format refusing, a mount dying while a clone runs, a sync failing
after the clone succeeded), nor held at a step while the test calls stop() or checkpoint(). The
end-to-end tests use the real binaries.

The fakes implement the methods `fsm.controller.JuiceFS` calls on `JuiceFSTool`,
`LitestreamTool` and `Child`, and stand-ins for what a start after an unclean loss runs
(`fake_takeover`: fsm.takeover restores the replica, which needs S3) and for a shared metadata
engine's calls (`FakeEngine`: fsm.metaengine.format_once and volume_lock, which need a
server). The volume is a plain directory (`{base_dir}/data`), so clone is copytree and rmr is
rmtree. A `World` keeps the bookkeeping the properties check: what is
"mounted", which fake processes "run", and which chart state was active at every call.
Nothing sleeps: a held step waits on an asyncio.Event the test releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsm.config import Config
from fsm.errors import MissingPrerequisite, ToolError

# The steps a test can make fail or hold (the async ones; holding needs an await).
FAULTS = {
    "litestream.restore": "restoring_metadata",
    "juicefs.format": "formatting",
    "litestream.start": "replicating",           # litestream cannot be spawned
    "litestream.wait_serving": "mounting",       # litestream exits before serving
    "juicefs.start": "mounting",                 # juicefs mount cannot be spawned
    "juicefs.wait_mounted": "mounting",          # the mount exits before it is ready
    "juicefs.mount_timeout": "mounting",         # not ready in time; the process stays up
    "juicefs.clone": "checkpointing/restoring_checkpoint",
    "juicefs.rmr": "ready (delete) / restoring_checkpoint (rollback)",
    "litestream.sync": "checkpointing/restoring_checkpoint/ready (delete)",
    "juicefs.umount": "stopping/failed (flush fails; force is the fallback)",
    "takeover.run": "taking_over",
    "metaengine.format_once": "formatting (shared engine)",
}

START_FAULTS = ("litestream.restore", "juicefs.format", "litestream.start",
                "litestream.wait_serving", "juicefs.start", "juicefs.wait_mounted",
                "juicefs.mount_timeout", "metaengine.format_once")

# Which chart states may run each recorded step: the state whose action owns it.
# acquiring_lease (fsm.controller claim_volume: preflight, base_dir lock, leftovers, dirs, the
# replica pointer) calls no adapter: litestream's config is written by restoring_metadata.
TEARDOWN = frozenset({"stopping", "failed"})
# `fence` is the action of the transition lease_lost: from an active state it runs between the
# states (no leaf active: ""); in stopping/failed it is targetless and runs in place.
FENCE = frozenset({""}) | TEARDOWN
OWNERS: dict[str, frozenset[str]] = {
    "takeover.run": frozenset({"taking_over"}),
    "metaengine.format_once": frozenset({"formatting"}),
    # The tree lock: checkpoint, restore and delete (fsm.operations).
    "metaengine.volume_lock": frozenset({"checkpointing", "restoring_checkpoint", "ready"}),
    "juicefs.kill_group": FENCE,
    "litestream.kill_group": FENCE,
    "litestream.write_config": frozenset({"restoring_metadata"}),
    "litestream.restore": frozenset({"restoring_metadata"}),
    "juicefs.read_format": frozenset({"restoring_metadata"}),
    "juicefs.format": frozenset({"formatting"}),
    "litestream.replicate_child": frozenset({"replicating"}),
    "litestream.start": frozenset({"replicating"}),
    # Awaited alongside the mount (fsm.controller.mount_volume), and before the final sync.
    "litestream.wait_serving": frozenset({"mounting"}) | TEARDOWN,
    "juicefs.is_stale": frozenset({"mounting"}) | TEARDOWN,
    "juicefs.lazy_unmount": frozenset({"mounting"}) | TEARDOWN,
    # Teardown starts a second mount that takes the FUSE session over to flush writeback data.
    "juicefs.mount_child": frozenset({"mounting"}) | TEARDOWN,
    "juicefs.start": frozenset({"mounting"}) | TEARDOWN,
    "juicefs.wait_taken_over": TEARDOWN,
    "juicefs.staging": TEARDOWN,
    "juicefs.wait_mounted": frozenset({"mounting"}),
    "juicefs.clone": frozenset({"checkpointing", "restoring_checkpoint"}),
    "juicefs.rmr": frozenset({"ready", "restoring_checkpoint"}),
    "litestream.sync": frozenset({"checkpointing", "restoring_checkpoint", "ready"}) | TEARDOWN,
    "juicefs.is_mounted": TEARDOWN,
    "juicefs.umount": TEARDOWN,
    "juicefs.force_unmount": TEARDOWN,
    "juicefs.abort_connection": TEARDOWN,
    "juicefs.terminate": TEARDOWN,
    "juicefs.kill": TEARDOWN,
    "litestream.terminate": TEARDOWN,
    "litestream.kill": TEARDOWN,
}


@dataclass(frozen=True)
class Call:
    step: str
    state: str  # the chart's active leaf when the fake was called ("" if none)


@dataclass
class World:
    """What the fakes share: the volume's persistent facts and the test's bookkeeping."""

    where: Callable[[], str] = lambda: ""
    calls: list[Call] = field(default_factory=list)
    children: list[FakeChild] = field(default_factory=list)
    formatted: bool = False
    replica_has_data: bool = False
    attached: bool = False           # a kernel mount exists at data/
    server: FakeChild | None = None  # the mount process serving it
    faults: dict[str, str] = field(default_factory=dict)  # step -> message, fires once
    shared_engine: bool = False      # meta_url set: FakeEngine instead of format + litestream
    tree_lock_holders: int = 0       # FakeEngine.volume_lock("tree") held by this many
    overlaps: list[str] = field(default_factory=list)  # a tree lock taken while held
    hold_at: str | None = None
    reached: asyncio.Event | None = None
    release: asyncio.Event | None = None
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(10_000))

    # ---- test controls -------------------------------------------------------------------------

    def inject(self, step: str, message: str) -> None:
        assert step in FAULTS, step
        self.faults[step] = message

    def hold(self, step: str) -> None:
        """The next call of `step` waits (after recording) until `let_go()`."""
        self.hold_at, self.reached, self.release = step, asyncio.Event(), asyncio.Event()

    def let_go(self) -> None:
        if self.release is not None:
            self.release.set()
        self.hold_at = None

    @property
    def mounted(self) -> bool:
        return self.attached and self.server is not None and self.server.running

    @property
    def stale(self) -> bool:
        return self.attached and not self.mounted

    def running(self) -> list[FakeChild]:
        return [c for c in self.children if c.running]

    def leftovers(self) -> list[str]:
        found = [f"{c.tool} pid {c.pid} still running" for c in self.running()]
        return found + (["data/ still mounted"] if self.attached else [])

    def misplaced(self) -> list[Call]:
        """Calls made while a state that does not own the step was active."""
        return [c for c in self.calls if c.state not in OWNERS[c.step]]

    # ---- used by the fakes ---------------------------------------------------------------------

    def record(self, step: str) -> None:
        self.calls.append(Call(step, self.where()))

    async def step(self, step: str) -> str | None:
        """Record a step; wait if it is held; return the injected fault's message, if any."""
        self.record(step)
        if self.hold_at == step and self.reached is not None and self.release is not None:
            self.hold_at = None  # once: a later call of the same step (teardown) runs on
            self.reached.set()
            await self.release.wait()
        return self.faults.pop(step, None)

    def next_pid(self) -> int:
        return next(self._pids)


class FakeChild:
    """A long-running process that only exists in the World's bookkeeping."""

    def __init__(self, world: World, tool: str) -> None:
        self.world = world
        self.tool = tool
        self._pid: int | None = None
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None and self.returncode is None

    def stderr_tail(self, lines: int = 20) -> str:
        return f"fake {self.tool} stderr (pid {self._pid})"

    async def start(self) -> None:
        if message := await self.world.step(f"{self.tool}.start"):
            raise MissingPrerequisite(f"cannot run {self.tool}: {message}")
        self._pid = self.world.next_pid()
        self.world.children.append(self)

    def exit(self, rc: int) -> None:
        """The process ends (on its own, or because the test killed it)."""
        if self.running:
            self.returncode = rc
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def exits_within(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self._exited.is_set()

    async def terminate(self, timeout: float) -> int | None:
        self.world.record(f"{self.tool}.terminate")
        if self._pid is None:
            return None
        self.exit(-15)
        return self.returncode

    async def kill(self) -> None:
        self.world.record(f"{self.tool}.kill")
        self.exit(-9)

    def kill_group(self) -> None:
        """SIGKILL of the process group (fsm.children.Children.kill_all: the fence)."""
        self.world.record(f"{self.tool}.kill_group")
        self.exit(-9)


def _fail(tool: str, action: str, message: str, rc: int | None = 1) -> ToolError:
    return ToolError(tool, action, rc, message)


class FakeJuiceFS:
    """Stands in for fsm.juicefs.JuiceFSTool."""

    def __init__(self, world: World, config: Config) -> None:
        self.world = world
        self.layout = config.layout

    def read_format(self) -> dict[str, Any] | None:
        self.world.record("juicefs.read_format")
        return {"Name": "test-volume"} if self.world.formatted else None

    async def format(self) -> None:
        if message := await self.world.step("juicefs.format"):
            raise _fail("juicefs", "format", message)
        self.world.formatted = True
        self.layout.metadata_db.write_text("fake metadata")

    def mount_child(self, upload_delay: float | None = None) -> FakeChild:
        self.world.record("juicefs.mount_child")
        return FakeChild(self.world, "juicefs")

    async def wait_taken_over(self, child: Any, timeout: float) -> float:
        """The seamless remount: `child` now serves the mount and the old process exits."""
        await self.world.step("juicefs.wait_taken_over")
        if not self.world.mounted or not child.running:
            raise _fail("juicefs", "mount (take-over)", child.stderr_tail(), child.returncode)
        old, self.world.server = self.world.server, child
        if old is not None:
            old.exit(0)
        return 0.001

    async def staging(self) -> dict[str, int]:
        """Blocks not uploaded yet: none, the fake volume has no object storage."""
        await self.world.step("juicefs.staging")
        return {"blocks": 0, "bytes": 0, "writing": 0}

    async def wait_mounted(self, child: Any, timeout: float) -> float:
        message = await self.world.step("juicefs.wait_mounted")
        if timed_out := self.world.faults.pop("juicefs.mount_timeout", None):
            raise _fail("juicefs", f"mount (not ready after {timeout:g}s)", timed_out, None)
        if message:
            child.exit(1)
            raise _fail("juicefs", "mount", message)
        if not child.running:
            raise _fail("juicefs", "mount", child.stderr_tail(), child.returncode)
        self.world.attached, self.world.server = True, child
        return 0.001

    def _require_mount(self, action: str) -> None:
        if not self.world.mounted:
            raise _fail("juicefs", action, f"{self.layout.mount_point} is not a JuiceFS mount")

    async def clone(self, src: Path, dst: Path) -> None:
        message = await self.world.step("juicefs.clone")
        self._require_mount("clone")
        if message:
            raise _fail("juicefs", "clone", message)
        shutil.copytree(src, dst, symlinks=True)

    async def rmr(self, path: Path) -> None:
        message = await self.world.step("juicefs.rmr")
        self._require_mount("rmr")
        if message:
            raise _fail("juicefs", "rmr", message)
        shutil.rmtree(path)

    def is_mounted(self) -> bool:
        self.world.record("juicefs.is_mounted")
        return self.world.mounted

    def is_stale(self) -> bool:
        self.world.record("juicefs.is_stale")
        return self.world.stale

    async def lazy_unmount(self) -> None:
        self.world.record("juicefs.lazy_unmount")
        self.world.attached = False

    async def unstick(self, child: Any) -> None:
        """A fake process never gets stuck while dying (the real case: docs/faults.md)."""

    async def abort_connection(self, mount_point: Any = None) -> None:
        """After the fence (its processes are already gone): nothing left to end."""
        self.world.record("juicefs.abort_connection")

    async def force_unmount(self) -> None:
        """Aborting the FUSE connection ends the server, busy or not; then it is detached."""
        self.world.record("juicefs.force_unmount")
        self.world.attached = False
        server, self.world.server = self.world.server, None
        if server is not None:
            server.exit(0)

    async def umount(self, *, flush: bool, timeout: float) -> None:
        if message := await self.world.step("juicefs.umount"):
            raise _fail("juicefs", "umount", message)
        if not self.world.mounted:
            raise _fail("juicefs", "umount", f"{self.layout.mount_point} is not mounted")
        self.world.attached = False
        server, self.world.server = self.world.server, None
        if server is not None:
            server.exit(0)  # juicefs mount exits once its mount point is unmounted


class FakeLitestream:
    """Stands in for fsm.litestream.LitestreamTool."""

    def __init__(self, world: World, config: Config) -> None:
        self.world = world
        self.layout = config.layout
        self.replicator: FakeChild | None = None

    def write_config(self) -> None:
        self.world.record("litestream.write_config")

    async def restore(self) -> bool:
        if message := await self.world.step("litestream.restore"):
            raise _fail("litestream", "restore", message)
        if self.world.replica_has_data:
            self.layout.metadata_db.write_text("fake metadata")
        return self.world.replica_has_data

    def replicate_child(self) -> FakeChild:
        self.world.record("litestream.replicate_child")
        self.replicator = FakeChild(self.world, "litestream")
        return self.replicator

    async def wait_serving(self, child: Any, timeout: float = 15.0) -> None:
        if message := await self.world.step("litestream.wait_serving"):
            child.exit(1)
            raise _fail("litestream", "replicate", message)
        if not child.running:
            raise _fail("litestream", "replicate", child.stderr_tail(), child.returncode)
        self.world.replica_has_data = self.world.formatted

    async def sync(self, timeout: float = 30.0) -> str:
        message = await self.world.step("litestream.sync")
        if message:
            raise _fail("litestream", "sync", message)
        if self.replicator is None or not self.replicator.running:
            raise _fail("litestream", "sync", "no litestream server is running", None)
        return ""  # the real one: the txid as decimal text


def fake_takeover(world: World, layout: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    """Stands in for fsm.takeover.Takeover.run: restores the replica to the lost holder's
    watermark, i.e. a formatted metadata.db (the real one needs S3 and a replica)."""
    async def run() -> None:
        if message := await world.step("takeover.run"):
            raise _fail("litestream", "restore (takeover)", message)
        world.formatted = True
        layout.metadata_db.write_text("fake metadata (taken over)")
    return run


class FakeEngine:
    """Stands in for fsm.metaengine's format_once and volume_lock (the real ones talk to a
    PostgreSQL or Redis server, tests/test_shared_engine.py)."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def format_once(self, cfg: Config, *, log: Any, **_: Any) -> str:
        if message := await self.world.step("metaengine.format_once"):
            raise _fail("juicefs", "format (shared engine)", message)
        outcome = "joined" if self.world.formatted else "formatted"
        self.world.formatted = True
        return outcome

    @contextlib.asynccontextmanager
    async def volume_lock(self, cfg: Config, name: str, *, log: Any,
                          **_: Any) -> AsyncIterator[None]:
        await self.world.step("metaengine.volume_lock")
        if self.world.tree_lock_holders:
            self.world.overlaps.append(f"{name} lock taken while held ({self.world.where()})")
        self.world.tree_lock_holders += 1
        try:
            yield
        finally:
            self.world.tree_lock_holders -= 1
