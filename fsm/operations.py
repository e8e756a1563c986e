"""The checkpoint operations, the actions of the chart's `checkpointing`,
`restoring_checkpoint` and `delete_checkpoint`: instant tree copies with `juicefs clone
--preserve`, each confirmed in the replica before the caller hears of it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from . import checkpoints as cps
from .checkpoints import Checkpoint, Operation
from .children import Children, unwound_before_teardown
from .config import Config
from .errors import CheckpointExists, CheckpointNotFound
from .juicefs import JuiceFSTool
from .metaengine import volume_lock

# How long an operation waits for another machine's checkpoint, restore or delete before it
# fails with OperationLocked (nothing changed). A restore of a huge tree can take longer.
TREE_LOCK_WAIT = 60.0


class Barrier(Protocol):
    """The durability barrier (fsm.replication.Replication)."""

    async def sync(self) -> str: ...
    async def sync_made(self, done: str, result: Checkpoint) -> None: ...


class TreeOperations:
    def __init__(self, config: Config, juicefs: JuiceFSTool, children: Children,
                 barrier: Barrier, log: Any) -> None:
        self.config = config
        self.layout = config.layout
        self.juicefs = juicefs
        self.children = children
        self.barrier = barrier
        self.log = log

    def path(self, cp_id: str) -> Path:
        return self.layout.checkpoints_dir / cp_id

    @contextlib.asynccontextmanager
    async def _replacing_trees(self) -> AsyncIterator[None]:
        """On a shared engine other machines checkpoint, restore and delete too: those never
        interleave (the volume's cross-machine "tree" lock, fsm.metaengine; a bounded wait,
        then OperationLocked naming the holder). One machine's chart serializes its own."""
        if not self.config.meta_url:
            yield
            return
        async with volume_lock(self.config, "tree", log=self.log, wait=TREE_LOCK_WAIT):
            yield

    @unwound_before_teardown
    async def take(self, op: Operation) -> Operation:
        dst = self.path(op.cp_id)
        with op.capture(f"checkpoint {op.cp_id!r}"):
            # Under the lock too: a restore on another machine renames `active` away and clones
            # into it in batches; a checkpoint meanwhile would copy half a tree, or none.
            async with self._replacing_trees():
                if dst.exists():
                    raise CheckpointExists(f"checkpoint {op.cp_id!r} already exists; "
                                           f"delete it first or choose another id")
                await self.juicefs.clone(self.layout.active_root, dst)
            os.utime(dst)  # created_at: the clone copies the active tree's times
            op.result = Checkpoint.at(dst)
            self.log.info("checkpoint_created", id=op.cp_id)
            await self.barrier.sync_made(f"checkpoint {op.cp_id!r} was made", op.result)
        return op

    @unwound_before_teardown
    async def restore(self, op: Operation) -> Operation:
        src = self.path(op.cp_id)
        active = self.layout.active_root
        with op.capture(f"restore of {op.cp_id!r}"):
            # Checked under the lock: another machine may delete it until then.
            async with self._replacing_trees():
                if not src.is_dir():
                    raise CheckpointNotFound(
                        f"checkpoint {op.cp_id!r} does not exist; list them with "
                        f"list_checkpoints() or `juicefs-fsm checkpoints`")
                taken = {e.name for e in os.scandir(self.layout.checkpoints_dir)}
                aside = self.path(cps.pre_restore_id(op.cp_id, taken))
                os.rename(active, aside)
                try:
                    await self.juicefs.clone(src, active)
                except BaseException:
                    await self._put_back(aside)
                    raise
            os.utime(aside)
            op.result = Checkpoint.at(aside)
            self.log.info("checkpoint_restored", id=op.cp_id, kept_as=aside.name)
            await self.barrier.sync_made(f"checkpoint {op.cp_id!r} was restored (the previous "
                                         f"tree is kept as {aside.name!r})", op.result)
        return op

    async def _put_back(self, aside: Path) -> None:
        """Put the original active tree back; a half-made clone is moved away and removed."""
        active = self.layout.active_root
        if active.exists():
            partial = self.layout.mount_point / f".fsm-partial-{aside.name}"
            os.rename(active, partial)
            await self.juicefs.rmr(partial)
        os.rename(aside, active)
        self.log.warning("restore_rolled_back", kept=str(active))

    async def delete(self, op: Operation) -> None:
        path = self.path(op.cp_id)
        with op.capture(f"delete of {op.cp_id!r}"):
            async with self._replacing_trees():
                if not path.is_dir():
                    raise CheckpointNotFound(f"checkpoint {op.cp_id!r} does not exist")
                await self.juicefs.rmr(path)
            await self.barrier.sync()
            self.log.info("checkpoint_deleted", id=op.cp_id)
