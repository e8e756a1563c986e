"""Properties of the lifecycle chart, checked on random sequences of calls to the controller's
public API (start, checkpoint, restore, delete_checkpoint, list_checkpoints, stop, hurry) mixed
with injected failures of any adapter step and with processes dying at any time.

The adapters are the fakes in tests/fakes.py. That is fault injection: the real juicefs and
litestream cannot be made to fail, or to pause, at an exact step on demand. The end-to-end tests
(tests/test_core.py, tests/test_stateful_real.py) run the real binaries.

Properties, checked after every step:
- exactly one leaf state is active, with its ancestors, and it is `JuiceFS.state`;
- no action runs outside the state that owns it (the fakes record the active leaf at each call);
- checkpoint/restore/delete succeed only from `ready`; elsewhere they raise NotReadyError and
  touch nothing (no adapter call, no file, no transition);
- every injected failure is reported to the caller and recorded in the history: a failing start
  step or a dying process ends in `failed`; a failing operation step returns to `ready`;
- after stop(), from any state, the state is `stopped` and nothing is mounted or running;
- every transition taken is an edge of the chart, and the history is a connected path;
- in `ready` the volume holds exactly what the model expects (the tree and the checkpoints);
- lease_lost, in any state (also while a start step, an operation or the stop's unmount is
  held): the `fence` action has SIGKILLed the mount and litestream by the time the event is
  handled, the controller ends in `failed` (a stop goes on to `stopped`), and it never starts a
  mount or litestream again; stop() then leaves nothing;
- a start after an unclean loss (Claim.takeover set) goes acquiring_lease -> taking_over ->
  replicating, never through restoring_metadata; a takeover that fails ends in `failed` with
  StartError(stage="taking_over");
- on a shared metadata engine (meta_url): no restoring_metadata, replicating or taking_over, no
  litestream at all; checkpoints, restores and deletes hold the volume's tree lock and never
  overlap;
  browse/rollback are refused (HistoryOff) naming the engine.

A failure prints the steps and a `@reproduce_failure` blob (print_blob=True).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fsm import (
    Config,
    FsmError,
    HistoryOff,
    JuiceFS,
    NotReadyError,
    StartError,
    StopError,
    Transition,
    metaengine,
    operations,
)
from fsm.chart import Lifecycle
from tests.fakes import START_FAULTS, FakeEngine, FakeJuiceFS, FakeLitestream, World, fake_takeover
from tests.helpers import require

EXAMPLES = 500
STEP_LIMIT = 5.0  # seconds for one awaited call; the fakes never sleep, so a hang is a bug
IDS = st.sampled_from(["a", "b", "c"])
FILE = "data.txt"
# Validated, never connected to: fsm.metaengine's server calls are FakeEngine's (see the test).
META_URL = "redis://127.0.0.1:1/1"
# What starts a mount or litestream: never again once the lease is lost.
SPAWNS = frozenset({"juicefs.mount_child", "juicefs.start", "litestream.replicate_child",
                    "litestream.start"})
# The running example's FakeEngine, which the patched fsm.metaengine calls reach.
ENGINE: dict[str, FakeEngine] = {}


def _leaves(state: Any) -> list[Any]:
    return [state] if not state.states else [x for s in state.states for x in _leaves(s)]


def _entry_leaf(state: Any) -> Any:
    while state.states:
        state = next(s for s in state.states if s.initial)
    return state


def chart_edges() -> set[tuple[str, str, str]]:
    """(source leaf, target leaf, event) for every transition of the chart: a compound source
    stands for each of its leaves, a compound target for the leaf it enters."""
    edges = set()
    for source in Lifecycle.states_map.values():
        for t in source.transitions:
            if t.initial or not t.targets:
                continue
            for leaf in _leaves(t.source):
                for target in t.targets:
                    for event in t.events:
                        edges.add((leaf.id, _entry_leaf(target).id, str(event)))
    return edges


EDGES = chart_edges()


class Volume:
    """What the model says the user's data is: the active tree's file and the checkpoints."""

    def __init__(self) -> None:
        self.tree: str | None = None
        self.checkpoints: dict[str, str | None] = {}


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="fsm-prop-"))
        self.world = World()
        self.volume = Volume()
        self.tokens = itertools.count(1)
        self.upload_delay = 0.0
        self.jfs: JuiceFS | None = None
        self.taken: list[Transition] = []
        self.flush_failed = False
        self.fenced_at: int | None = None  # len(world.calls) when lease_lost was handled
        self.took_over = False             # this controller's start is a takeover
        ENGINE["now"] = FakeEngine(self.world)

    # ---- plumbing ------------------------------------------------------------------------------

    @initialize(upload_delay=st.sampled_from([0.0, 0.0, 30.0]),
                engine=st.sampled_from(["sqlite", "sqlite", "shared"]))
    def create(self, upload_delay: float, engine: str) -> None:
        self.world.shared_engine = engine == "shared"
        # A shared engine mounts without writeback (Config refuses an upload_delay with it).
        self.upload_delay = 0.0 if self.world.shared_engine else upload_delay
        self.new_controller()

    def new_controller(self) -> None:
        # replication_restarts=0: litestream exiting fails the volume at once, as this model
        # expects (restarts with backoff are tested on real processes in tests/test_faults.py).
        cfg = Config(base_dir=self.tmp / "vol", local_mode=True, volume_name="test-volume",
                     upload_delay=self.upload_delay, history_size=500, replication_restarts=0,
                     meta_url=META_URL if self.world.shared_engine else "")
        jfs = JuiceFS(cfg, juicefs=FakeJuiceFS(self.world, cfg),  # type: ignore[arg-type]
                      litestream=FakeLitestream(self.world, cfg))  # type: ignore[arg-type]
        self.taken = []
        self.flush_failed = False
        self.fenced_at = None
        self.took_over = False
        jfs.add_observer(self.taken.append)
        self.world.where = lambda: self.chart_leaf(jfs)
        self.jfs = jfs

    @property
    def c(self) -> JuiceFS:
        assert self.jfs is not None
        return self.jfs

    @staticmethod
    def chart_leaf(jfs: JuiceFS) -> str:
        leaves = [s.id for s in jfs._chart.configuration if not s.states]
        return ",".join(leaves)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_LIMIT))

    def attempt(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, BaseException | None]:
        try:
            return self.run(coro), None
        except FsmError as exc:
            return None, exc

    def spin_until(self, done: Any, what: str) -> None:
        """Let the loop run (tasks, watchers) until `done()`; the fakes never sleep."""
        async def wait() -> None:
            while not done():  # noqa: ASYNC110 - polls the fakes' bookkeeping, turn by turn
                await asyncio.sleep(0)
        try:
            self.run(wait())
        except asyncio.TimeoutError:
            raise AssertionError(f"never happened: {what} (state {self.c.state})") from None

    def settle(self, what: str) -> None:
        """Wait for the controller to go quiet: no adapter call for many turns of the loop.
        After a process dies nothing public signals the end of the clean-up in `failed`
        (stop() would), and the fakes never sleep, so quiet means done."""
        quiet = {"turns": 0, "calls": -1}

        def still() -> bool:
            if len(self.world.calls) != quiet["calls"]:
                quiet["turns"], quiet["calls"] = 0, len(self.world.calls)
            quiet["turns"] += 1
            return quiet["turns"] > 500

        self.spin_until(still, what)

    def token(self, step: str) -> str:
        return f"injected failure #{next(self.tokens)} in {step}"

    @property
    def shared(self) -> bool:
        return self.world.shared_engine

    def applicable(self, fault: str | None) -> str | None:
        """A shared engine runs no litestream: its steps cannot fail there."""
        return None if self.shared and fault and fault.startswith("litestream.") else fault

    def tree_locks(self) -> int:
        return sum(c.step == "metaengine.volume_lock" for c in self.world.calls)

    def teardown(self) -> None:
        try:
            if self.jfs is not None and self.world.hold_at is not None:
                self.world.let_go()
            if self.jfs is not None and self.c.state != "stopped":
                with contextlib.suppress(FsmError, asyncio.TimeoutError):
                    self.run(self.c.stop())
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- what the fake volume holds ---------------------------------------------------------

    def snapshot(self) -> dict[str, str]:
        root = self.c.layout.mount_point
        out = {}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                out[str(path.relative_to(root))] = path.read_text()
        return out

    def quiet(self) -> tuple[int, int, dict[str, str]]:
        return len(self.world.calls), len(self.taken), self.snapshot()

    def assert_untouched(self, before: tuple[int, int, dict[str, str]], what: str) -> None:
        calls, taken, files = before
        assert self.world.calls[calls:] == [], f"{what} called adapters: {self.world.calls[calls:]}"
        assert self.taken[taken:] == [], f"{what} took transitions: {self.taken[taken:]}"
        assert self.snapshot() == files, f"{what} changed files"

    def assert_failed_with(self, token: str, exc: BaseException | None) -> None:
        assert exc is not None and token in str(exc), f"caller not told: {exc!r}"
        self.settle("clean-up after failure")
        assert self.c.state == "failed"
        assert token in str(self.c.error)
        recorded = [t for t in self.taken if t.target == "failed"]
        assert recorded and token in (recorded[-1].error or ""), recorded
        assert self.c.status()["error"] and token in self.c.status()["error"]

    def assert_stopped(self) -> None:
        assert self.c.state == "stopped"
        assert self.world.leftovers() == []

    # ---- start ---------------------------------------------------------------------------------

    @rule(fault=st.none() | st.sampled_from(START_FAULTS))
    def start(self, fault: str | None) -> None:
        before_state = self.c.state
        if before_state != "uninitialized":
            before = self.quiet()
            _, exc = self.attempt(self.c.start())
            assert (exc is None) == (before_state == "ready"), exc
            self.assert_untouched(before, f"start() in {before_state}")
            return
        token = self.token(fault or "")
        if fault:
            self.world.inject(fault, token)
        _, exc = self.attempt(self.c.start())
        fired = fault is not None and self.world.faults.pop(fault, None) is None
        if fired:
            assert isinstance(exc, StartError), exc
            self.assert_failed_with(token, exc)
        else:
            assert exc is None, exc
            self.assert_ready()

    def assert_ready(self) -> None:
        assert self.c.state == "ready"
        assert self.world.mounted
        tools = {"juicefs"} if self.shared else {"juicefs", "litestream"}
        assert {c.tool for c in self.world.running()} == tools
        assert self.c.pids["juicefs"] and bool(self.c.pids["litestream"]) != self.shared

    @precondition(lambda self: self.jfs is not None and self.c.state == "uninitialized")
    @rule(stage=st.sampled_from(["litestream.restore", "juicefs.format", "litestream.start",
                                 "juicefs.start", "litestream.wait_serving",
                                 "juicefs.wait_mounted", "metaengine.format_once"]),
          then=st.sampled_from(["stop", "operate", "lose_litestream", "lose_mount", "hurry",
                                "lease_lost"]))
    def interrupted_start(self, stage: str, then: str) -> None:
        """Hold start at one step, then act while the chart sits in that step's state."""
        self.world.hold(stage)
        starting = self.loop.create_task(self.c.start())
        assert self.world.reached is not None
        reached = self.world.reached
        self.spin_until(lambda: reached.is_set() or starting.done(), f"{stage} reached")
        if starting.done():  # the step is skipped on this start (e.g. already formatted)
            self.world.let_go()
            assert self.run(starting) is None
            self.assert_ready()
            return
        self.check_one_leaf()
        replicator = next((c for c in self.world.running() if c.tool == "litestream"), None)
        mount = next((c for c in self.world.running() if c.tool == "juicefs"), None)
        if then == "operate":
            self.refused_everywhere_but_ready()
            self.world.let_go()
            self.run(starting)
            self.assert_ready()
        elif then in ("stop", "hurry"):
            stopping = self.loop.create_task(self.c.stop())
            if then == "hurry":
                self.c.hurry()
            self.run(stopping)
            _, exc = self.attempt(starting)  # type: ignore[arg-type]
            assert isinstance(exc, StartError), exc
            self.world.let_go()
            self.assert_stopped()
        elif then == "lease_lost":
            self.lose_lease()
            self.world.let_go()
            _, exc = self.attempt(starting)  # type: ignore[arg-type]
            assert isinstance(exc, StartError) and "test" in str(exc), exc
            self.assert_fenced_and_failed()
        elif then == "lose_litestream" and replicator is not None:
            replicator.exit(1)
            self.world.let_go()
            _, exc = self.attempt(starting)  # type: ignore[arg-type]
            assert isinstance(exc, StartError) and self.c.state == "failed", exc
            self.settle("clean-up after failure")
        elif then == "lose_mount" and mount is not None:
            mount.exit(1)
            self.world.let_go()
            _, exc = self.attempt(starting)  # type: ignore[arg-type]
            assert isinstance(exc, StartError) and self.c.state == "failed", exc
            self.settle("clean-up after failure")
        else:
            self.world.let_go()
            self.run(starting)
            self.assert_ready()

    def refused_everywhere_but_ready(self) -> None:
        for call in (lambda: self.c.checkpoint("x"), lambda: self.c.restore("a"),
                     lambda: self.c.delete_checkpoint("a"), self.c.list_checkpoints):
            before = self.quiet()
            _, exc = self.attempt(call())
            assert isinstance(exc, NotReadyError), exc
            assert self.c.state in str(exc) and "ready" in str(exc)
            self.assert_untouched(before, "a refused operation")

    # ---- operations ----------------------------------------------------------------------------

    @precondition(lambda self: self.jfs is not None and self.c.state != "ready")
    @rule()
    def operations_are_refused_unless_ready(self) -> None:
        self.refused_everywhere_but_ready()

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(content=st.text("xyz", min_size=1, max_size=3))
    def write(self, content: str) -> None:
        (self.c.active_dir / FILE).write_text(content)
        self.volume.tree = content

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(cp_id=IDS, fault=st.none() | st.sampled_from(["juicefs.clone", "litestream.sync"]))
    def checkpoint(self, cp_id: str, fault: str | None) -> None:
        fault = self.applicable(fault)
        exists = cp_id in self.volume.checkpoints
        token = self.token(fault or "")
        if fault and not exists:
            self.world.inject(fault, token)
        locks = self.tree_locks()
        result, exc = self.attempt(self.c.checkpoint(cp_id))
        assert self.c.state == "ready"
        assert self.tree_locks() - locks == (1 if self.shared else 0)  # the tree lock
        if exists:
            assert exc is not None and "already exists" in str(exc), exc
        elif fault == "juicefs.clone":
            self.assert_operation_failed(token, exc)
        else:
            if fault:  # the clone is made; only its replication is unconfirmed
                self.assert_operation_failed(token, exc)
            else:
                assert exc is None and result.id == cp_id, exc
            self.volume.checkpoints[cp_id] = self.volume.tree

    def assert_operation_failed(self, token: str, exc: BaseException | None) -> None:
        assert exc is not None and token in str(exc), exc
        assert self.taken[-1].target == "ready" and token in (self.taken[-1].error or "")

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(cp_id=IDS, fault=st.none() | st.sampled_from(["juicefs.clone", "litestream.sync"]))
    def restore(self, cp_id: str, fault: str | None) -> None:
        fault = self.applicable(fault)
        exists = cp_id in self.volume.checkpoints
        token = self.token(fault or "")
        if fault and exists:
            self.world.inject(fault, token)
        names_before = set(self.listed())
        locks = self.tree_locks()
        result, exc = self.attempt(self.c.restore(cp_id))
        assert self.c.state == "ready"
        # On a shared engine a restore replaces the tree under the volume's tree lock.
        assert self.tree_locks() - locks == (1 if self.shared else 0)
        if not exists:
            assert exc is not None and "does not exist" in str(exc), exc
        elif fault == "juicefs.clone":
            self.assert_operation_failed(token, exc)
        else:
            if fault:
                self.assert_operation_failed(token, exc)
                (kept,) = set(self.listed()) - names_before
            else:
                assert exc is None, exc
                kept = result.id
                assert kept.startswith(f"pre-restore-{cp_id}-")
            self.volume.checkpoints[kept] = self.volume.tree
            self.volume.tree = self.volume.checkpoints[cp_id]

    def listed(self) -> list[str]:
        return sorted(p.name for p in self.c.layout.checkpoints_dir.iterdir())

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(cp_id=IDS, fault=st.none() | st.sampled_from(["juicefs.rmr", "litestream.sync"]))
    def delete_checkpoint(self, cp_id: str, fault: str | None) -> None:
        fault = self.applicable(fault)
        exists = cp_id in self.volume.checkpoints
        token = self.token(fault or "")
        if fault and exists:
            self.world.inject(fault, token)
        locks = self.tree_locks()
        _, exc = self.attempt(self.c.delete_checkpoint(cp_id))
        assert self.c.state == "ready"
        assert self.tree_locks() - locks == (1 if self.shared else 0)
        if not exists:
            assert exc is not None and "does not exist" in str(exc), exc
        elif fault == "juicefs.rmr":
            assert exc is not None and token in str(exc), exc
        else:
            assert (exc is None) == (fault is None), exc
            del self.volume.checkpoints[cp_id]

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule()
    def list_checkpoints(self) -> None:
        listed = self.run(self.c.list_checkpoints())
        assert sorted(c.id for c in listed) == sorted(self.volume.checkpoints)

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(operation=st.sampled_from(["checkpoint", "restore", "delete_checkpoint"]),
          then=st.sampled_from(["stop", "lose_mount", "lose_litestream", "another",
                                "lease_lost"]))
    def interrupted_operation(self, operation: str, then: str) -> None:
        """Hold an operation in its adapter step, then stop, lose a process or the lease, or
        queue another."""
        if then == "lose_litestream" and self.shared:
            then = "another"  # no litestream to lose
        cp_id = f"held-{next(self.tokens)}" if operation == "checkpoint" else "held"
        if operation != "checkpoint" and cp_id not in self.volume.checkpoints:
            self.checkpoint(cp_id, None)
        self.world.hold("juicefs.rmr" if operation == "delete_checkpoint" else "juicefs.clone")
        running = self.loop.create_task(getattr(self.c, operation)(cp_id))
        reached = self.world.reached
        assert reached is not None
        self.spin_until(lambda: reached.is_set() or running.done(), "operation held")
        assert not running.done(), running
        self.check_one_leaf()
        held_in = self.c.state
        if then in ("stop", "another"):
            follow = self.loop.create_task(
                self.c.stop() if then == "stop" else self.c.checkpoint("queued"))
            self.spin_until(lambda: True, "a turn of the loop")
            assert self.c.state == held_in, "the second call did not wait for the operation"
            self.world.let_go()
            result = self.run(running)
            self.apply_operation(operation, cp_id, result)
            self.run(follow)
            if then == "stop":
                self.assert_stopped()
            else:
                self.volume.checkpoints["queued"] = self.volume.tree
                self.delete_checkpoint("queued", None)
            return
        if then == "lease_lost":
            if operation == "delete_checkpoint":
                # Delete is a transition action (see below): the chart handles lease_lost, and
                # so fences, only once the rmr returns. A known gap: a long delete delays the
                # fence by as long.
                losing = self.loop.create_task(self.c.lose_lease("test"))
                self.spin_until(lambda: True, "a turn of the loop")
                assert self.world.running(), "fenced during a transition action?"
                self.world.let_go()
                self.fenced_at = len(self.world.calls)
                self.run(losing)
                assert self.world.running() == [], f"not fenced: {self.world.running()}"
                _, exc = self.attempt(running)  # type: ignore[arg-type]
                assert exc is None, exc  # it finished before the fence
                del self.volume.checkpoints[cp_id]
            else:
                self.lose_lease()
                self.world.let_go()
                _, exc = self.attempt(running)  # type: ignore[arg-type]
                assert exc is not None and "interrupted" in str(exc), exc
            self.assert_fenced_and_failed()
            return
        child = next(c for c in self.world.running()
                     if c.tool == ("juicefs" if then == "lose_mount" else "litestream"))
        child.exit(1)
        if operation == "delete_checkpoint":
            # Delete is a transition action, run inside the chart's step (not an invoke, which
            # leaving the state cancels): the loss is handled once it returns.
            self.world.let_go()
            _, exc = self.attempt(running)  # type: ignore[arg-type]
            assert exc is not None, "delete succeeded without a mount or a replicator"
            if then == "lose_litestream":  # removed; only the sync barrier failed
                del self.volume.checkpoints[cp_id]
        else:
            _, exc = self.attempt(running)  # type: ignore[arg-type]
            assert exc is not None and "interrupted" in str(exc), exc
        self.settle("clean-up after failure")
        assert self.c.state == "failed"
        assert self.taken[-1].target == "failed" and self.taken[-1].error
        self.world.let_go()

    def apply_operation(self, operation: str, cp_id: str, result: Any) -> None:
        if operation == "checkpoint":
            self.volume.checkpoints[cp_id] = self.volume.tree
        elif operation == "restore":
            self.volume.checkpoints[result.id] = self.volume.tree
            self.volume.tree = self.volume.checkpoints[cp_id]
        else:
            del self.volume.checkpoints[cp_id]

    # ---- processes dying -----------------------------------------------------------------------

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(tool=st.sampled_from(["juicefs", "litestream"]), rc=st.sampled_from([0, 1, -9]))
    def process_dies_while_ready(self, tool: str, rc: int) -> None:
        child = next((c for c in self.world.running() if c.tool == tool), None)
        if child is None:  # litestream, on a shared engine
            return
        child.exit(rc)
        self.spin_until(lambda: self.c.state == "failed", f"{tool} death noticed")
        self.settle("clean-up after failure")
        lost = self.taken[-1]
        assert lost.event == ("mount_lost" if tool == "juicefs" else "replication_lost")
        assert lost.error and f"exited with {rc}" in lost.error
        _, exc = self.attempt(self.c.start())
        assert isinstance(exc, StartError) and f"exited with {rc}" in str(exc), exc

    # ---- stop ----------------------------------------------------------------------------------

    @rule(fault=st.none() | st.just("juicefs.umount"))
    def stop(self, fault: str | None) -> None:
        if fault:
            self.world.inject(fault, self.token(fault))
        _, exc = self.attempt(self.c.stop())
        # A stop never reports a success it did not have: a flush that failed (the force
        # fallback ran) is a StopError naming where the unflushed data lies.
        flush_failed = (fault is not None or self.flush_failed) and \
            self.c.pids["juicefs"] is None and "force-unmounted" in str(exc)
        # Fenced while stopping: the killed mount could not flush, and stop() says so.
        flush_failed = flush_failed or (self.fenced_at is not None and
                                        isinstance(exc, StopError))
        self.flush_failed = flush_failed  # stop() says it again until a new controller
        assert exc is None or flush_failed, exc
        self.world.faults.pop("juicefs.umount", None)
        self.assert_stopped()
        again, exc = self.attempt(self.c.stop())  # idempotent
        assert again is None and (isinstance(exc, StopError) if flush_failed else exc is None)

    @precondition(lambda self: self.jfs is not None and self.c.state == "ready")
    @rule(then=st.sampled_from(["stop", "checkpoint", "hurry", "lease_lost"]))
    def interrupted_stop(self, then: str) -> None:
        """Hold stop in its unmount, then call stop() again, an operation, hurry(), or lose the
        lease."""
        self.world.hold("juicefs.umount")
        stopping = self.loop.create_task(self.c.stop())
        reached = self.world.reached
        assert reached is not None
        self.spin_until(reached.is_set, "unmount reached")
        self.check_one_leaf()
        assert self.c.state == "stopping"
        if then == "hurry":
            self.c.hurry()  # a second SIGTERM: skip the flush, force the unmount
            follow = None
        elif then == "lease_lost":
            self.lose_lease()
            assert self.c.state == "stopping"  # fenced in place; the stop goes on
            follow = None
        else:
            follow = self.loop.create_task(
                self.c.stop() if then == "stop" else self.c.checkpoint("late"))
        self.world.let_go()
        _, exc = self.attempt(stopping)
        if then == "hurry":  # a flush that was cut short is said, not hidden (it may also
            # have finished just as the hurry came)
            assert exc is None or (isinstance(exc, StopError) and "hurried" in str(exc)), exc
        elif then == "lease_lost":
            # The mount was SIGKILLed before its unmount. What it left in rawstaging would be
            # said (counted on disk; the fakes stage nothing), so stop() may return.
            assert exc is None or isinstance(exc, StopError), exc
            self.flush_failed = exc is not None
        else:
            assert exc is None, exc
        if follow is not None:
            _, exc = self.attempt(follow)  # type: ignore[arg-type]
            assert (exc is None) if then == "stop" else isinstance(exc, NotReadyError), exc
        self.assert_stopped()

    @precondition(lambda self: self.jfs is not None and self.c.state == "stopped")
    @rule()
    def start_again_on_the_same_volume(self) -> None:
        self.new_controller()

    # ---- the lease -------------------------------------------------------------------------

    def lose_lease(self) -> None:
        """What fsm.claim's lease holder sends when a refresh fails or another machine holds
        the lease. The fence is a transition action: once handled, nothing of ours runs."""
        before = self.c.state
        calls = len(self.world.calls)
        self.run(self.c.lose_lease("test"))
        if before in ("uninitialized", "stopped"):
            return  # no lease held yet, or released: nothing to fence
        self.fenced_at = calls if self.fenced_at is None else self.fenced_at
        assert self.world.running() == [], f"not fenced: {self.world.running()}"

    def assert_fenced_and_failed(self) -> None:
        self.settle("clean-up after the fence")
        assert self.c.state == "failed", self.c.state
        assert self.world.leftovers() == [], self.world.leftovers()
        lost = [t for t in self.taken if t.event == "lease_lost"]
        assert lost and lost[-1].target == "failed" and "test" in (lost[-1].error or ""), lost

    @precondition(lambda self: self.jfs is not None)
    @rule()
    def lease_is_lost(self) -> None:
        before = self.c.state
        before_calls, before_taken, _ = self.quiet()
        self.lose_lease()
        if before in ("uninitialized", "stopped"):
            assert self.c.state == before
            assert self.world.calls[before_calls:] == [] and self.taken[before_taken:] == []
            return
        if before == "failed":  # fenced again in place: the first error stays
            self.settle("a second fence")
            assert self.c.state == "failed" and "lease_lost" not in \
                [t.event for t in self.taken[before_taken:]]
            return
        self.assert_fenced_and_failed()
        _, exc = self.attempt(self.c.start())
        assert isinstance(exc, StartError) and "test" in str(exc), exc

    # ---- a start after an unclean loss --------------------------------------------------------

    @precondition(lambda self: self.jfs is not None and self.c.state == "uninitialized"
                  and not self.world.shared_engine)
    @rule(fault=st.booleans(), then=st.sampled_from(["finish", "stop", "lease_lost"]))
    def start_after_unclean_loss(self, fault: bool, then: str) -> None:
        """fsm.claim plans a takeover only in S3 mode (the previous holder's lease expired);
        the fakes run in local mode, so the plan and Takeover.run (which restores the replica
        from S3) are injected here: what is checked is the chart's path, not the restore
        (tests/test_lease.py runs the real one)."""
        self.c._claim.takeover = {"watermark": None, "holder": {"host": "lost-machine"},
                                  "source_subpath": None}
        self.c._takeover.run = fake_takeover(  # type: ignore[method-assign]
            self.world, self.c.layout)
        self.took_over = True
        token = self.token("takeover.run")
        if fault:
            self.world.inject("takeover.run", token)
        if then != "finish":
            self.world.hold("takeover.run")
        starting = self.loop.create_task(self.c.start())
        if then != "finish":
            reached = self.world.reached
            assert reached is not None
            self.spin_until(reached.is_set, "takeover reached")
            assert self.c.state == "taking_over"
            if then == "stop":
                self.run(self.c.stop())
                self.world.let_go()
                _, exc = self.attempt(starting)  # type: ignore[arg-type]
                assert isinstance(exc, StartError), exc
                self.world.faults.pop("takeover.run", None)
                self.assert_stopped()
                return
            self.lose_lease()
            self.world.let_go()
            _, exc = self.attempt(starting)  # type: ignore[arg-type]
            assert isinstance(exc, StartError), exc
            self.world.faults.pop("takeover.run", None)
            self.assert_fenced_and_failed()
            return
        _, exc = self.attempt(starting)  # type: ignore[arg-type]
        if fault:
            assert isinstance(exc, StartError) and exc.stage == "taking_over", exc
            self.assert_failed_with(token, exc)
        else:
            assert exc is None, exc
            self.assert_ready()

    # ---- a shared metadata engine ---------------------------------------------------------

    @precondition(lambda self: self.jfs is not None and self.world.shared_engine)
    @rule(call=st.sampled_from(["browse", "rollback", "list_restore_points"]))
    def time_travel_is_refused_on_a_shared_engine(self, call: str) -> None:
        before = self.quiet()
        args = () if call == "list_restore_points" else ("2024-01-01T00:00:00Z",)
        _, exc = self.attempt(getattr(self.c, call)(*args))
        assert isinstance(exc, HistoryOff) and "shared metadata engine" in str(exc), exc
        self.assert_untouched(before, f"{call} on a shared engine")

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def never_a_mount_after_the_lease_is_lost(self) -> None:
        if self.fenced_at is None:
            return
        late = [c for c in self.world.calls[self.fenced_at:] if c.step in SPAWNS]
        assert late == [], f"started after lease_lost: {late}"
        assert self.world.running() == [], self.world.running()

    @invariant()
    def a_takeover_start_skips_the_restore(self) -> None:
        if not self.took_over:
            return
        visited = [t.target for t in self.taken]
        assert "restoring_metadata" not in visited, visited
        if "replicating" in visited:
            assert visited.index("taking_over") < visited.index("replicating"), visited

    @invariant()
    def a_shared_engine_has_no_litestream(self) -> None:
        if not self.shared:
            return
        visited = {t.target for t in self.taken}
        assert not visited & {"restoring_metadata", "replicating", "taking_over"}, visited
        litestream = [c for c in self.world.calls if c.step.startswith("litestream.")]
        assert litestream == [], litestream
        assert self.world.overlaps == [], self.world.overlaps

    def check_one_leaf(self) -> None:
        config = list(self.c._chart.configuration)
        leaves = [s for s in config if not s.states]
        assert len(leaves) == 1, f"active leaves: {leaves}"
        (leaf,) = leaves
        ancestors = set()
        parent = leaf.parent
        while parent is not None:
            ancestors.add(parent.id)
            parent = parent.parent
        assert {s.id for s in config} == {leaf.id} | ancestors, config
        assert self.c.state == leaf.id

    @invariant()
    def exactly_one_leaf_is_active(self) -> None:
        if self.jfs is not None and self.c._chart.configuration:
            self.check_one_leaf()

    @invariant()
    def actions_run_only_in_their_states(self) -> None:
        assert self.world.misplaced() == [], self.world.misplaced()

    @invariant()
    def every_transition_is_an_edge_of_the_chart(self) -> None:
        previous = "uninitialized"
        for t in self.taken:
            assert (t.source, t.target, t.event) in EDGES, f"not in the chart: {t}"
            assert t.source == previous, f"history is not a path at {t}"
            assert t.target != "failed" or t.error, f"failure without its error: {t}"
            previous = t.target
        if self.jfs is not None:
            history = list(self.c.history)
            assert history == self.taken[-len(history):] if history else not self.taken
            assert self.c.status()["transitions"] == [t.to_json() for t in history]

    @invariant()
    def nothing_is_left_once_stopped(self) -> None:
        if self.jfs is not None and self.c.state in ("stopped", "failed"):
            assert self.world.leftovers() == [], self.world.leftovers()

    @invariant()
    def ready_volume_holds_what_the_model_says(self) -> None:
        if self.jfs is None or self.c.state != "ready":
            return
        files = self.snapshot()
        tree = files.get(f"active/fs/{FILE}")
        assert tree == self.volume.tree
        assert set(self.listed()) == set(self.volume.checkpoints)
        for cp_id, content in self.volume.checkpoints.items():
            assert files.get(f"checkpoints/{cp_id}/fs/{FILE}") == content, cp_id


LifecycleMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    # Not `explain`: it traces every line, which makes shrinking a failure take minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Hundreds of controllers would log thousands of lines nobody reads. The library's
    logger is quieted, and put back as it was for the tests that run after this one."""
    logger = logging.getLogger("fsm")
    level, handlers = logger.level, list(logger.handlers)
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.handlers = handlers


def test_chart_properties_hold_under_random_calls_and_failures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require(os.path.exists("/dev/fuse") and shutil.which("umount") is not None,
            "the controller checks for /dev/fuse and umount before it starts")
    # The shared engine's server calls (fsm.startup format_volume, fsm.operations' tree lock).
    monkeypatch.setattr(metaengine, "format_once",
                        lambda *a, **kw: ENGINE["now"].format_once(*a, **kw))
    monkeypatch.setattr(operations, "volume_lock",
                        lambda *a, **kw: ENGINE["now"].volume_lock(*a, **kw))
    LifecycleMachine.TestCase().runTest()
