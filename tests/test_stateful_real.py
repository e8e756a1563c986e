"""Random sequences of write, checkpoint, restore, delete, stop and start against the real
juicefs and litestream binaries in local mode, on a real FUSE mount, checked against an
in-memory model of the tree and its checkpoints.

A stop and a start are a new `JuiceFS` on the same base_dir: what survives them is what the
metadata (SQLite, replicated by litestream) and the local object storage hold. Nothing may stay
mounted or running after a stop, nor after the test, even when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fsm import CheckpointExists, CheckpointNotFound, Config, JuiceFS
from fsm.juicefs import mount_fstype
from tests.helpers import assert_nothing_left, mount_pids, pid_alive, require_fuse

EXAMPLES = 20
STEP_LIMIT = 60.0
PATHS = st.sampled_from(["a.txt", "dir/b.txt", "dir/sub/c.bin"])
IDS = st.sampled_from(["one", "two", "three"])
# Empty, small, and one that spans several 64 KiB JuiceFS blocks.
SIZES = st.sampled_from([0, 7, 5000, 300_000])

Tree = dict[str, bytes]


def read_tree(root: Path) -> Tree:
    """Files under root (relative path -> content); empty directories are not part of it."""
    out: Tree = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


class RealVolume(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="fsm-stateful-"))
        self.config = Config(base_dir=self.tmp / "vol", local_mode=True,
                             volume_name="test-volume")
        self.jfs: JuiceFS | None = None
        self.pids: list[int] = []
        self.tree: Tree = {}
        self.checkpoints: dict[str, Tree] = {}
        try:
            self.start()
        except BaseException:
            self.teardown()  # hypothesis only tears down machines that were built
            raise

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_LIMIT))

    @property
    def c(self) -> JuiceFS:
        assert self.jfs is not None
        return self.jfs

    def teardown(self) -> None:
        mount_point = self.config.layout.mount_point
        try:
            if self.jfs is not None:
                self.run(self.c.stop())
                assert_nothing_left(self.tmp / "vol", self.pids)
        finally:
            # If stop failed, still leave nothing mounted or running.
            if mount_fstype(mount_point) is not None:
                subprocess.run(["umount", "-l", str(mount_point)], check=False)
            for pid in self.pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- lifecycle -----------------------------------------------------------------------------

    @precondition(lambda self: self.jfs is None)
    @rule()
    def start(self) -> None:
        jfs = JuiceFS(self.config)
        try:
            self.run(jfs.start())
        except BaseException:
            with contextlib.suppress(Exception):
                self.run(jfs.stop())
            raise
        self.jfs = jfs
        self.pids = [p for p in jfs.pids.values() if p] + mount_pids(jfs.layout.mount_point)
        # Everything survived the restart: the tree and every checkpoint's content.
        for cp_id, tree in self.checkpoints.items():
            assert read_tree(jfs.layout.checkpoints_dir / cp_id / "fs") == tree, cp_id

    @precondition(lambda self: self.jfs is not None)
    @rule()
    def stop(self) -> None:
        self.run(self.c.stop())
        assert self.c.state == "stopped"
        assert_nothing_left(self.tmp / "vol", self.pids)
        self.jfs = None

    # ---- the user's tree -----------------------------------------------------------------------

    @precondition(lambda self: self.jfs is not None)
    @rule(path=PATHS, size=SIZES, seed=st.integers(0, 255))
    def write(self, path: str, size: int, seed: int) -> None:
        data = bytes((seed + i) % 251 for i in range(size))
        target = self.c.active_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.tree[path] = data

    @precondition(lambda self: self.jfs is not None)
    @rule(path=PATHS)
    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.c.active_dir / path).unlink()
        self.tree.pop(path, None)

    # ---- checkpoints ---------------------------------------------------------------------------

    @precondition(lambda self: self.jfs is not None)
    @rule(cp_id=IDS)
    def checkpoint(self, cp_id: str) -> None:
        if cp_id in self.checkpoints:
            with pytest.raises(CheckpointExists):
                self.run(self.c.checkpoint(cp_id))
            return
        made = self.run(self.c.checkpoint(cp_id))
        assert made.id == cp_id
        self.checkpoints[cp_id] = dict(self.tree)
        assert read_tree(made.tree) == self.tree

    @precondition(lambda self: self.jfs is not None and self.checkpoints)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        cp_id = data.draw(st.sampled_from(sorted(self.checkpoints)))
        kept = self.run(self.c.restore(cp_id))
        assert kept.id.startswith(f"pre-restore-{cp_id}-") and kept.id not in self.checkpoints
        self.checkpoints[kept.id] = self.tree
        self.tree = dict(self.checkpoints[cp_id])

    @precondition(lambda self: self.jfs is not None and self.checkpoints)
    @rule(data=st.data())
    def delete_checkpoint(self, data: st.DataObject) -> None:
        cp_id = data.draw(st.sampled_from(sorted(self.checkpoints)))
        self.run(self.c.delete_checkpoint(cp_id))
        del self.checkpoints[cp_id]

    @precondition(lambda self: self.jfs is not None)
    @rule()
    def a_missing_checkpoint_cannot_be_restored_or_deleted(self) -> None:
        with pytest.raises(CheckpointNotFound):
            self.run(self.c.restore("missing"))
        with pytest.raises(CheckpointNotFound):
            self.run(self.c.delete_checkpoint("missing"))

    # ---- what must hold ------------------------------------------------------------------------

    @invariant()
    def the_volume_holds_what_the_model_says(self) -> None:
        if self.jfs is None:
            assert mount_fstype(self.config.layout.mount_point) is None
            return
        assert self.c.state == "ready"
        assert read_tree(self.c.active_dir) == self.tree
        listed = self.run(self.c.list_checkpoints())
        assert sorted(cp.id for cp in listed) == sorted(self.checkpoints)


RealVolume.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=15, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


def test_random_sequences_on_real_binaries_match_the_model() -> None:
    require_fuse()
    RealVolume.TestCase().runTest()
