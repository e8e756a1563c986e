"""The core lifecycle in local mode, end to end, with the real juicefs and litestream binaries
and real FUSE mounts."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fsm import (
    CheckpointExists,
    CheckpointNotFound,
    Config,
    FsmError,
    InvalidCheckpointId,
    JuiceFS,
    NotReadyError,
    StartError,
)
from fsm.juicefs import mount_fstype
from tests.helpers import assert_nothing_left, capture_events, mount_pids
from tests.tree import make_rich_tree, snapshot

pytestmark = pytest.mark.usefixtures("fuse")

ConfigFactory = Callable[..., Config]


def _wrapped_juicefs(tmp_path: Path, subcommand: str, body: str) -> str:
    """A juicefs that behaves like the real one except for one subcommand. This is fault
    injection: the real binary cannot be made to fail (or hang) on demand."""
    real = Config(base_dir=tmp_path, local_mode=True).juicefs_bin
    script = tmp_path / "juicefs-faulty"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "{subcommand}" ]; then\n{body}\nfi\n'
        f'exec "{real}" "$@"\n')
    script.chmod(0o755)
    return str(script)


async def test_the_whole_cycle_start_write_checkpoint_change_restore_stop(
        local_config: ConfigFactory) -> None:
    jfs = JuiceFS(local_config())
    assert jfs.state == "uninitialized"
    started = time.monotonic()
    await jfs.start()
    assert time.monotonic() - started < 10
    assert jfs.state == "ready"
    assert mount_fstype(jfs.layout.mount_point) == "fuse.juicefs"
    assert jfs.active_dir.is_dir() and jfs.layout.checkpoints_dir.is_dir()
    pids = [p for p in jfs.pids.values() if p] + mount_pids(jfs.layout.mount_point)

    (jfs.active_dir / "notes.txt").write_text("version 1")
    cp = await jfs.checkpoint("cp-1")
    assert cp.id == "cp-1" and (cp.tree / "notes.txt").read_text() == "version 1"
    (jfs.active_dir / "notes.txt").write_text("version 2")
    (jfs.active_dir / "new.txt").write_text("added after the checkpoint")

    kept = await jfs.restore("cp-1")
    assert (jfs.active_dir / "notes.txt").read_text() == "version 1"
    assert not (jfs.active_dir / "new.txt").exists()
    assert kept.id.startswith("pre-restore-cp-1-")
    assert (kept.tree / "notes.txt").read_text() == "version 2"
    assert {c.id for c in await jfs.list_checkpoints()} == {"cp-1", kept.id}

    await jfs.stop()
    assert jfs.state == "stopped"
    assert_nothing_left(jfs.layout.base_dir, pids)
    await jfs.stop()  # idempotent
    visited = [t.target for t in jfs.history]
    assert visited == ["acquiring_lease", "restoring_metadata", "formatting", "replicating",
                       "mounting", "ready", "checkpointing", "ready", "restoring_checkpoint",
                       "ready", "stopping", "stopped"]


async def test_restore_brings_back_content_modes_owners_symlinks_and_empty_dirs(
        jfs: JuiceFS) -> None:
    make_rich_tree(jfs.active_dir)
    before = snapshot(jfs.active_dir)
    cp = await jfs.checkpoint("rich")
    assert snapshot(cp.tree) == before

    (jfs.active_dir / "docs" / "readme.txt").write_text("changed")
    os.chmod(jfs.active_dir / "private", 0o644)
    os.chown(jfs.active_dir / "owned-by-1000", 0, 0)
    (jfs.active_dir / "empty-dir").rmdir()
    (jfs.active_dir / "link-to-readme").unlink()
    assert snapshot(jfs.active_dir) != before

    await jfs.restore("rich")
    assert snapshot(jfs.active_dir) == before
    owned = (jfs.active_dir / "owned-by-1000").stat()
    assert (owned.st_uid, owned.st_gid) == (1000, 1000)
    assert stat.S_IMODE((jfs.active_dir / "private").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad_id", [
    "", ".", "..", "a/b", "../escape", "/abs", "with space", "tab\there", "nul\0byte",
    "x" * 201, "ünïcode", "semi;colon", "star*", "new\nline", None, 42, b"bytes",
])
async def test_bad_checkpoint_ids_are_refused_before_touching_disk(jfs: JuiceFS,
                                                                   bad_id: object) -> None:
    before = sorted(os.listdir(jfs.layout.checkpoints_dir))
    transitions = len(jfs.history)
    for call in (jfs.checkpoint, jfs.restore, jfs.delete_checkpoint):
        with pytest.raises(InvalidCheckpointId) as info:
            await call(bad_id)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError) and isinstance(info.value, FsmError)
        assert "A-Z, a-z, 0-9" in str(info.value)
    assert sorted(os.listdir(jfs.layout.checkpoints_dir)) == before
    assert len(jfs.history) == transitions, "a refused id must not move the chart"
    assert jfs.state == "ready"


async def test_longest_valid_id_works_and_restore_keeps_a_valid_pre_restore_id(
        jfs: JuiceFS) -> None:
    long_id = "L" * 200
    await jfs.checkpoint(long_id)
    kept = await jfs.restore(long_id)
    assert len(kept.id) <= 200
    await jfs.restore(kept.id)  # the kept tree is itself restorable by its id


async def test_duplicate_checkpoint_is_refused_and_changes_nothing(jfs: JuiceFS) -> None:
    (jfs.active_dir / "f").write_text("one")
    await jfs.checkpoint("dup")
    (jfs.active_dir / "f").write_text("two")
    with pytest.raises(CheckpointExists, match="dup"):
        await jfs.checkpoint("dup")
    assert (jfs.layout.checkpoints_dir / "dup" / "fs" / "f").read_text() == "one"
    assert jfs.state == "ready"


async def test_unknown_checkpoint_cannot_be_restored_or_deleted(jfs: JuiceFS) -> None:
    (jfs.active_dir / "f").write_text("keep me")
    with pytest.raises(CheckpointNotFound, match="nope"):
        await jfs.restore("nope")
    with pytest.raises(CheckpointNotFound, match="nope"):
        await jfs.delete_checkpoint("nope")
    assert (jfs.active_dir / "f").read_text() == "keep me"
    assert await jfs.list_checkpoints() == []
    assert jfs.state == "ready"


async def test_delete_removes_only_that_checkpoint(jfs: JuiceFS) -> None:
    await jfs.checkpoint("a")
    await jfs.checkpoint("b")
    await jfs.delete_checkpoint("a")
    assert [c.id for c in await jfs.list_checkpoints()] == ["b"]
    await jfs.checkpoint("a")  # the id is free again


async def test_operations_outside_ready_name_the_current_state(
        local_config: ConfigFactory) -> None:
    jfs = JuiceFS(local_config())
    with pytest.raises(NotReadyError, match="uninitialized"):
        await jfs.checkpoint("early")
    with pytest.raises(NotReadyError, match="uninitialized"):
        await jfs.list_checkpoints()
    await jfs.start()
    await jfs.stop()
    with pytest.raises(NotReadyError, match="stopped"):
        await jfs.restore("late")
    assert not jfs.layout.checkpoints_dir.exists()


async def test_concurrent_operations_are_serialized_never_interleaved(jfs: JuiceFS) -> None:
    (jfs.active_dir / "f").write_text("x")
    results = await asyncio.gather(
        jfs.checkpoint("c1"), jfs.checkpoint("c2"), jfs.checkpoint("c1"),
        return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["Checkpoint", "Checkpoint", "CheckpointExists"]
    steps = [(t.source, t.target) for t in jfs.history][-6:]
    assert steps == [("ready", "checkpointing"), ("checkpointing", "ready")] * 3


async def test_restart_keeps_data_and_checkpoints(local_config: ConfigFactory) -> None:
    cfg = local_config()
    async with JuiceFS(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("survives a restart")
        await jfs.checkpoint("before-restart")
    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "kept.txt").read_text() == "survives a restart"
        assert [c.id for c in await again.list_checkpoints()] == ["before-restart"]
        assert "formatting" not in [t.target for t in again.history]


async def test_a_lost_metadata_db_comes_back_from_the_local_replica(
        local_config: ConfigFactory) -> None:
    cfg = local_config()
    async with JuiceFS(cfg) as jfs:
        (jfs.active_dir / "precious.txt").write_text("replicated")
        await jfs.checkpoint("cp")
    for leftover in cfg.layout.base_dir.glob("metadata.db*"):
        leftover.unlink()
    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "precious.txt").read_text() == "replicated"
        assert [c.id for c in await again.list_checkpoints()] == ["cp"]
        assert "formatting" not in [t.target for t in again.history]


async def test_a_failed_restore_clone_puts_the_original_tree_back(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    faulty = _wrapped_juicefs(tmp_path, "clone",
                              '[ -e "$(dirname "$0")/fail-clone" ] && '
                              '{ echo "injected clone failure" >&2; exit 3; }')
    async with JuiceFS(local_config(juicefs_bin=faulty)) as jfs:
        (jfs.active_dir / "f").write_text("checkpointed")
        await jfs.checkpoint("cp")
        (jfs.active_dir / "f").write_text("current work")
        before = snapshot(jfs.active_dir)
        (tmp_path / "fail-clone").touch()
        with pytest.raises(FsmError, match="injected clone failure"):
            await jfs.restore("cp")
        assert jfs.state == "ready"
        assert snapshot(jfs.active_dir) == before
        assert [c.id for c in await jfs.list_checkpoints()] == ["cp"]


async def test_a_mount_that_exits_before_ready_fails_start_with_its_stderr(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    faulty = _wrapped_juicefs(tmp_path, "mount", 'echo "injected mount crash" >&2; exit 7')
    jfs = JuiceFS(local_config(juicefs_bin=faulty))
    with pytest.raises(StartError) as info:
        await jfs.start()
    assert info.value.stage == "mounting"
    assert "injected mount crash" in str(info.value) and "exited 7" in str(info.value)
    assert jfs.state == "failed"
    assert jfs.pids == {"juicefs": None, "litestream": None}
    await jfs.stop()
    assert jfs.state == "stopped"
    assert_nothing_left(jfs.layout.base_dir, [])


async def test_a_mount_that_never_gets_ready_is_killed_at_the_ready_timeout(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    faulty = _wrapped_juicefs(tmp_path, "mount", "echo $$ > \"$(dirname \"$0\")/hung.pid\"\n"
                              "exec sleep 600")
    jfs = JuiceFS(local_config(juicefs_bin=faulty, ready_timeout=1))
    started = time.monotonic()
    with pytest.raises(StartError, match="not ready after 1s"):
        await jfs.start()
    assert time.monotonic() - started < 15
    hung = int((tmp_path / "hung.pid").read_text())
    await jfs.stop()
    assert_nothing_left(jfs.layout.base_dir, [hung])


async def test_stop_during_start_leaves_nothing_behind(local_config: ConfigFactory,
                                                       tmp_path: Path) -> None:
    faulty = _wrapped_juicefs(tmp_path, "mount", "echo $$ > \"$(dirname \"$0\")/slow.pid\"\n"
                              "sleep 2")
    jfs = JuiceFS(local_config(juicefs_bin=faulty))
    starting = asyncio.create_task(jfs.start())
    while not (tmp_path / "slow.pid").exists():  # noqa: ASYNC110 - another process writes it
        await asyncio.sleep(0.01)
    await jfs.stop()
    with pytest.raises(StartError, match="interrupted by stop"):
        await starting
    assert jfs.state == "stopped"
    assert_nothing_left(jfs.layout.base_dir, [int((tmp_path / "slow.pid").read_text())])


async def test_every_transition_is_one_structured_event(local_config: ConfigFactory) -> None:
    with capture_events() as logs:
        async with JuiceFS(local_config()) as jfs:
            await jfs.checkpoint("logged")
    transitions = [e for e in logs if e["event"] == "transition"]
    assert len(transitions) == len(jfs.history)
    for entry, record in zip(transitions, jfs.history, strict=True):
        assert (entry["from"], entry["to"]) == (record.source, record.target)
        assert isinstance(entry["duration_ms"], float) and entry["trigger"]
    tools = {e.get("tool") for e in logs if e["event"] == "child_output"}
    assert {"juicefs", "litestream"} <= tools, "child output must be forwarded as events"
    assert all("\x1b[" not in str(e.get("line", "")) for e in logs), "ANSI codes must be stripped"


async def test_litestream_config_is_private_and_holds_no_secret(jfs: JuiceFS) -> None:
    mode = stat.S_IMODE(jfs.layout.litestream_config.stat().st_mode)
    assert mode == 0o600
    assert "replica:" in jfs.layout.litestream_config.read_text()


async def test_a_mount_dying_during_a_checkpoint_fails_the_volume_and_wakes_the_caller(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    faulty = _wrapped_juicefs(tmp_path, "clone", "touch \"$(dirname \"$0\")/cloning\"; sleep 3")
    jfs = JuiceFS(local_config(juicefs_bin=faulty))
    await jfs.start()
    pids = [p for p in jfs.pids.values() if p] + mount_pids(jfs.layout.mount_point)
    checkpointing = asyncio.create_task(jfs.checkpoint("doomed"))
    while not (tmp_path / "cloning").exists():  # noqa: ASYNC110 - another process writes it
        await asyncio.sleep(0.01)
    for pid in mount_pids(jfs.layout.mount_point):
        os.kill(pid, 9)
    with pytest.raises(FsmError, match="interrupted"):
        await asyncio.wait_for(checkpointing, 10)
    assert jfs.state == "failed"
    assert "juicefs" in str(jfs.error)
    await jfs.stop()
    assert_nothing_left(jfs.layout.base_dir, pids)
