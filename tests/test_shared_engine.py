"""A shared metadata engine (issue 12): meta URLs and their passwords, format exactly once,
the cross-machine lock, and moving an SQLite volume to PostgreSQL and Redis (real servers from
tests/db_servers.py; real juicefs; FUSE for the round trips)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from fsm import Config, JuiceFS, operations
from fsm.cli import build_parser
from fsm.errors import (
    ConfigError,
    EngineUnavailable,
    HistoryOff,
    LeaseHeld,
    MigrationFailed,
    OperationLocked,
    StartError,
    VolumeMoved,
)
from fsm.juicefs import is_juicefs_mount
from fsm.metaengine import (
    BucketLock,
    FileLock,
    engine_status,
    format_once,
    parse_meta_url,
    split_password,
    volume_exists,
    volume_lock,
)
from fsm.migrate import check_not_moved, migrate_metadata, moved_file
from tests.db_servers import PostgresServer, RedisServer
from tests.helpers import (
    capture_events,
    mount_pids,
    mounts_under,
    require_fuse,
    running,
    wait_until,
)
from tests.tree import make_rich_tree, snapshot

LOG = structlog.get_logger("test")


# ---- URLs and passwords (no server) ------------------------------------------------------------

@pytest.mark.parametrize(("url", "clean", "password"), [
    ("postgres://u:pw@127.0.0.1:5432/db?sslmode=disable",
     "postgres://u@127.0.0.1:5432/db?sslmode=disable", "pw"),
    ("postgresql://u:p%40ss%3Aw%2Frd%25@h/db", "postgres://u@h/db", "p@ss:w/rd%"),
    ("redis://:secret@127.0.0.1:6379/3", "redis://127.0.0.1:6379/3", "secret"),
    ("rediss://default:secret@h:6380/1", "rediss://default@h:6380/1", "secret"),
    ("redis://127.0.0.1:6379/1", "redis://127.0.0.1:6379/1", ""),
    ("postgres://u@h/db?password=pw&sslmode=disable", "postgres://u@h/db?sslmode=disable", "pw"),
    ("mysql://u:pw@(127.0.0.1:3306)/jfs", "mysql://u@(127.0.0.1:3306)/jfs", "pw"),
    ("tikv://h1:2379,h2:2379/jfs", "tikv://h1:2379,h2:2379/jfs", ""),
])
def test_password_taken_out(url: str, clean: str, password: str) -> None:
    engine = parse_meta_url(url)
    assert (engine.url, engine.password) == (clean, password)
    assert engine.env() == ({"META_PASSWORD": password} if password else {})
    assert (not password) or password not in repr(engine)


@pytest.mark.parametrize(("url", "words"), [
    ("sqlite3:///tmp/x.db", "leave meta_url unset"),
    ("badger:///tmp/b", "one process"),
    ("foo://h/1", "not a JuiceFS metadata engine"),
    ("postgres-without-scheme", "not a URL"),
])
def test_bad_meta_urls_refused(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_meta_url(url)


def test_two_different_passwords_refused() -> None:
    with pytest.raises(ConfigError, match="FSM_META_PASSWORD"):
        parse_meta_url("redis://:a@h/1", "b")
    assert parse_meta_url("redis://:a@h/1", "a").password == "a"


def test_config_keeps_the_password_out_of_meta_url(tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path, local_mode=True,
                 meta_url="postgresql://u:hunter2@127.0.0.1/db?sslmode=disable")
    assert cfg.meta_url == "postgres://u@127.0.0.1/db?sslmode=disable"
    assert cfg.meta_password == "hunter2"
    assert "hunter2" not in repr(cfg)
    assert "hunter2" in cfg.secrets()
    env = Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1",
                           "FSM_META_URL": "redis://127.0.0.1:6379/2",
                           "FSM_META_PASSWORD": "s3"})
    assert (env.meta_url, env.meta_password) == ("redis://127.0.0.1:6379/2", "s3")


def test_time_travel_refused_with_a_shared_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"point-in-time recovery.*history_hours to 0"):
        Config(base_dir=tmp_path, local_mode=True, meta_url="redis://h/1", history_hours=1)


def test_writeback_refused_with_a_shared_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without writeback"):
        Config(base_dir=tmp_path, local_mode=True, meta_url="redis://h/1", upload_delay=5)
    cfg = Config(base_dir=tmp_path, local_mode=False, meta_url="redis://h/1", s3_bucket="b",
                 s3_endpoint_url="http://127.0.0.1:1", s3_access_key="a",
                 s3_secret_access_key="s")
    assert cfg.effective_upload_delay == 0  # S3 mode's default 60 s is for writeback


def test_cli_refuses_a_password_in_argv(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--base-dir", "/x", "--meta-url", "redis://:pw@h/1"])
    assert "FSM_META_PASSWORD" in capsys.readouterr().err
    args = parser.parse_args(["run", "--base-dir", "/x", "--meta-url", "redis://h/1"])
    assert args.meta_url == "redis://h/1"
    with pytest.raises(SystemExit):
        parser.parse_args(["migrate", "--base-dir", "/x", "--to", "postgres://u:pw@h/db"])


# ---- the engines -------------------------------------------------------------------------------

@pytest.fixture(params=["postgres", "redis"])
def engine_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty engine (URL with its password): a new PostgreSQL database or Redis db."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.create_database()
    redis: RedisServer = request.getfixturevalue("redis_server")
    return redis.new_url()


def _argv_seen(logs: list[dict[str, Any]]) -> list[str]:
    return [" ".join(map(str, e["argv"])) for e in logs if e.get("event") == "child_started"]


async def test_volume_exists_and_format_once(engine_url: str, tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume",
                 meta_url=engine_url)
    engine = parse_meta_url(cfg.meta_url, cfg.meta_password)
    with structlog.testing.capture_logs() as logs:
        assert not await volume_exists(str(cfg.juicefs_bin), engine, log=LOG)
        assert await format_once(cfg, log=LOG) == "formatted"
        assert await volume_exists(str(cfg.juicefs_bin), engine, log=LOG)
        assert await format_once(cfg, log=LOG) == "joined"
    argv = _argv_seen(logs)
    assert argv and all(engine.password not in a for a in argv)
    assert engine.password not in json.dumps(logs, default=str)
    other = Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="other-volume",
                   meta_url=engine_url)
    with pytest.raises(ConfigError, match="holds volume 'test-volume'"):
        await format_once(other, log=LOG)


async def test_wrong_password_is_a_clear_error(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    engine = parse_meta_url(url, "")
    wrong = parse_meta_url(split_password(url)[0], "not-the-password")
    with pytest.raises(EngineUnavailable, match="password") as caught:
        await engine_status(_juicefs(), wrong, log=LOG)
    assert "not-the-password" not in str(caught.value)
    assert engine.password not in str(caught.value)


def _juicefs() -> str:
    return str(Config(base_dir="/nonexistent", local_mode=True).juicefs_bin)


async def test_three_machines_format_at_once_s3(
        postgres_server: PostgresServer, s3_config: Callable[..., Config],
        tmp_path: Path) -> None:
    """Three machines (base dirs), one bucket, one empty database: exactly one formats
    (three trials: volumes of their own in the one bucket)."""
    for trial in range(3):
        url, name = postgres_server.create_database(), f"race-{trial}"
        cfgs = [s3_config(tmp_path / f"{name}-m{i}", meta_url=url, volume_name=name)
                for i in range(3)]
        outcomes = await asyncio.gather(*(format_once(c, log=LOG) for c in cfgs))
        assert sorted(outcomes) == ["formatted", "joined", "joined"]
        info = await engine_status(_juicefs(), parse_meta_url(url), log=LOG)
        assert info is not None and info["Setting"]["Name"] == name


async def test_three_processes_format_at_once_local(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Local mode: the flock beside the data serializes them (one base_dir, shared storage)."""
    url = redis_server.new_url()
    cfgs = [Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume",
                   meta_url=url) for _ in range(3)]
    outcomes = await asyncio.gather(*(format_once(c, log=LOG) for c in cfgs))
    assert sorted(outcomes) == ["formatted", "joined", "joined"]


async def test_format_refuses_an_sqlite_volumes_objects(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume",
                 meta_url=postgres_server.create_database())
    chunk = cfg.layout.local_storage_dir / "test-volume" / "chunks" / "0" / "0" / "1_0_4"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(b"data")
    with pytest.raises(ConfigError, match="already has objects"):
        await format_once(cfg, log=LOG)


# ---- the cross-machine lock --------------------------------------------------------------------

async def test_bucket_lock_excludes_and_hands_over(s3_config: Callable[..., Config],
                                                   tmp_path: Path) -> None:
    a = BucketLock(s3_config(tmp_path / "a"), "tree", log=LOG, ttl=1.5)
    b = BucketLock(s3_config(tmp_path / "b"), "tree", log=LOG, ttl=1.5)
    await a.acquire(wait=1)
    with pytest.raises(OperationLocked, match="held by"):
        await b.acquire(wait=0.5)
    await a.release()
    await b.acquire(wait=2)  # released: taken at once
    # b dies without releasing (its refresher stops): a takes over after one ttl
    assert b._refresher is not None
    b._refresher.cancel()
    started = asyncio.get_running_loop().time()
    await a.acquire(wait=10)
    assert asyncio.get_running_loop().time() - started >= 1.4
    await a.release()


async def test_bucket_lock_is_exclusive_under_a_race(s3_config: Callable[..., Config],
                                                     tmp_path: Path) -> None:
    holders: list[int] = []
    inside = 0

    async def worker(i: int) -> None:
        nonlocal inside
        async with volume_lock(s3_config(tmp_path / f"w{i}"), "tree", log=LOG, wait=30):
            inside += 1
            assert inside == 1
            holders.append(i)
            await asyncio.sleep(0.05)
            inside -= 1

    await asyncio.gather(*(worker(i) for i in range(5)))
    assert sorted(holders) == list(range(5))


async def test_file_lock_excludes(tmp_path: Path,
                                  local_config: Callable[..., Config]) -> None:
    cfg = local_config()
    a, b = FileLock(cfg, "tree", log=LOG), FileLock(cfg, "tree", log=LOG)
    await a.acquire(wait=1)
    with pytest.raises(OperationLocked):
        await b.acquire(wait=0.3)
    await a.release()
    await b.acquire(wait=1)
    await b.release()


# ---- moving an SQLite volume -------------------------------------------------------------------

@pytest.fixture
def plain_mount(tmp_path: Path) -> Iterator[Callable[[str, Path], Path]]:
    """`juicefs mount -d` of an engine URL (password in META_PASSWORD), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(url: str, where: Path) -> Path:
        engine = parse_meta_url(url)
        where.mkdir(parents=True)
        env = {**os.environ, **engine.env()}
        subprocess.run([_juicefs(), "mount", "-d", engine.url, str(where), "--cache-dir",
                        str(tmp_path / "plain-cache"), "--no-usage-report", "--no-syslog"],
                       env=env, check=True, capture_output=True, timeout=60)
        mounted.append(where)
        assert is_juicefs_mount(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run([_juicefs(), "umount", str(where)], check=False, capture_output=True,
                       timeout=60)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _sqlite_volume(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stopped local-mode volume with a rich tree and a checkpoint; their snapshots."""
    async with JuiceFS(cfg) as jfs:
        make_rich_tree(jfs.active_dir)
        await jfs.checkpoint("cp-1")
        (jfs.active_dir / "after-checkpoint.txt").write_text("only in the active tree\n")
        active = snapshot(jfs.active_dir)
        cp = snapshot(Path(cfg.base_dir) / "data" / "checkpoints" / "cp-1" / "fs")
    return active, cp


async def test_migrate_round_trip(engine_url: str, local_config: Callable[..., Config],
                                  plain_mount: Callable[[str, Path], Path],
                                  tmp_path: Path) -> None:
    require_fuse()
    cfg = local_config()
    active, cp = await _sqlite_volume(cfg)
    db_before = _digest(cfg.layout.metadata_db)

    with structlog.testing.capture_logs() as logs:
        result = await migrate_metadata(cfg, engine_url, log=LOG)
    password = parse_meta_url(engine_url).password
    assert _argv_seen(logs) and password not in json.dumps(logs, default=str)
    assert result.checkpoints == ["cp-1"] and result.entries > len(active) + len(cp)
    assert password not in result.moved_to
    assert _digest(cfg.layout.metadata_db) == db_before  # the SQLite side only read
    assert not [n for n in os.listdir(cfg.base_dir) if n.startswith("migrate-")]  # dumps gone

    mp = plain_mount(engine_url, tmp_path / "plain")
    assert snapshot(mp / "active" / "fs") == active
    assert snapshot(mp / "checkpoints" / "cp-1" / "fs") == cp

    with pytest.raises(VolumeMoved, match="moved to") as caught:
        await check_not_moved(cfg)
    assert result.moved_to in str(caught.value) and password not in str(caught.value)
    assert password not in moved_file(cfg).read_text()
    with pytest.raises(VolumeMoved):
        await migrate_metadata(cfg, engine_url)
    await _refused_in_sqlite_mode(cfg, result.moved_to, password)


async def _refused_in_sqlite_mode(cfg: Config, moved_to: str, password: str) -> None:
    """A start of the moved volume in the SQLite mode: StartError(VolumeMoved), nothing left."""
    jfs = JuiceFS(cfg)
    with pytest.raises(StartError, match=f"moved to {re.escape(moved_to)}") as caught:
        await jfs.start()
    await jfs.stop()
    assert isinstance(caught.value.cause, VolumeMoved)
    assert password not in str(caught.value)
    assert jfs.pids == {"juicefs": None, "litestream": None}
    assert mounts_under(Path(cfg.base_dir)) == []


async def test_migrate_s3_volume_and_run_it_on_the_engine(
        postgres_server: PostgresServer, s3_config: Callable[..., Config],
        tmp_path: Path) -> None:
    """S3 mode: the move is made from a new base_dir (the metadata restored from the replica
    first); afterwards the SQLite start is refused on every machine (the marker in the
    bucket), and the engine runs the volume with its tree and checkpoint."""
    require_fuse()
    url = postgres_server.create_database()
    password = parse_meta_url(url).password
    first = s3_config(tmp_path / "m0", lease_ttl=4)
    active, cp = await _sqlite_volume(first)
    other = s3_config(tmp_path / "m1", lease_ttl=4)
    with capture_events() as logs:
        result = await migrate_metadata(other, url, log=LOG)
    assert password not in json.dumps(logs, default=str)
    assert _events(logs, "migrate_metadata_restored") and "restore" in result.steps
    assert result.checkpoints == ["cp-1"]
    for cfg in (first, other, s3_config(tmp_path / "m2", lease_ttl=4)):
        await _refused_in_sqlite_mode(cfg, result.moved_to, password)
    async with running(s3_config(tmp_path / "m0", meta_url=url)) as jfs:
        assert snapshot(jfs.active_dir) == active
        assert [c.id for c in await jfs.list_checkpoints()] == ["cp-1"]
        (jfs.active_dir / "new.txt").write_text("written on the engine\n")
        await jfs.restore("cp-1")
        assert snapshot(jfs.active_dir) == cp


async def test_migrate_refuses_a_volume_running_elsewhere(
        postgres_server: PostgresServer, s3_config: Callable[..., Config],
        tmp_path: Path) -> None:
    """S3 mode: the lease says another machine runs the volume: LeaseHeld, nothing moved."""
    require_fuse()
    url = postgres_server.create_database()
    async with running(s3_config(tmp_path / "m0", lease_ttl=4)):
        with pytest.raises(LeaseHeld, match="in use by"):
            await migrate_metadata(s3_config(tmp_path / "m1", lease_ttl=4), url, log=LOG)
    assert await engine_status(_juicefs(), parse_meta_url(url), log=LOG) is None
    await check_not_moved(s3_config(tmp_path / "m1", lease_ttl=4))


async def test_failed_move_leaves_the_volume_as_it_was(
        postgres_server: PostgresServer, local_config: Callable[..., Config],
        tmp_path: Path) -> None:
    require_fuse()
    cfg = local_config()
    await _sqlite_volume(cfg)
    db_before = _digest(cfg.layout.metadata_db)
    used = postgres_server.create_database()
    other = Config(base_dir=tmp_path / "other", local_mode=True, volume_name="other-volume",
                   meta_url=used)
    await format_once(other, log=LOG)  # the target is not empty
    with pytest.raises(MigrationFailed, match="already holds a volume"):
        await migrate_metadata(cfg, used)
    wrong = split_password(postgres_server.create_database())[0]
    with pytest.raises(EngineUnavailable):
        await migrate_metadata(cfg, wrong, password="wrong")
    assert _digest(cfg.layout.metadata_db) == db_before
    assert not moved_file(cfg).exists()
    await check_not_moved(cfg)  # still an SQLite volume


def test_migrate_cli(postgres_server: PostgresServer, tmp_path: Path) -> None:
    """`juicefs-fsm migrate` with the password in FSM_META_PASSWORD only."""
    require_fuse()
    cfg = Config(base_dir=tmp_path / "vol", local_mode=True, volume_name="test-volume")
    asyncio.run(_sqlite_volume(cfg))
    url = postgres_server.create_database()
    clean, password = split_password(url)
    env = {**os.environ, "FSM_META_PASSWORD": password, "FSM_META_URL": ""}
    done = subprocess.run(
        [sys.executable, "-m", "fsm", "migrate", "--base-dir", str(tmp_path / "vol"), "--local",
         "--volume-name", "test-volume", "--to", clean, "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["moved_to"] == clean and result["checkpoints"] == ["cp-1"]
    assert password not in done.stdout + done.stderr


# ---- machines sharing one volume (the JuiceFS API) ---------------------------------------------

def _files_holding(root: Path, needle: str) -> list[str]:
    """Files under `root` (not through a mount) whose bytes contain `needle`."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == event]


async def test_machines_share_one_volume(engine_url: str, s3_config: Callable[..., Config],
                                         tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Three machines (base_dirs, S3 mode: one bucket) on one engine, through the JuiceFS API:
    started at the same moment (one formats, two join), write here read there, checkpoint
    here list there, restore here see there, restores from two machines serialized by the
    tree lock, time travel refused, one stops while another writes, the password nowhere."""
    require_fuse()
    password = parse_meta_url(engine_url).password
    assert password
    cfgs = [s3_config(tmp_path / f"m{i}", meta_url=engine_url) for i in range(3)]
    machines = [JuiceFS(c) for c in cfgs]
    a, b, c = machines
    try:
        with capture_events() as logs:
            await asyncio.gather(*(m.start() for m in machines))
            assert [m.state for m in machines] == ["ready"] * 3
            assert len(_events(logs, "volume_formatted")) == 1
            assert len(_events(logs, "volume_joined")) == 2
            states = [e["to"] for e in _events(logs, "transition")
                      if e.get("base_dir") == str(cfgs[0].base_dir)]
            assert "restoring_metadata" not in states and "replicating" not in states
            assert all(m.pids["litestream"] is None for m in machines)

            # the password: not in any child's argv, status(), or the events
            for m in machines:
                for pid in mount_pids(m.layout.mount_point):
                    argv = _cmdline(pid)
                    assert password.encode() not in argv
                    assert m.config.meta_url.encode() in argv
                    assert b"--writeback" not in argv  # blocks in the bucket before close()
                status = json.dumps(m.status())
                assert password not in status
                assert m.status()["engine"] == m.config.meta_url

            # write here, read there
            (a.active_dir / "hello.txt").write_text("from a\n")
            (a.active_dir / "big.bin").write_bytes(os.urandom(3 << 20))
            digest = _digest(a.active_dir / "big.bin")
            assert (b.active_dir / "hello.txt").read_text() == "from a\n"
            assert _digest(c.active_dir / "big.bin") == digest

            # checkpoint here, list there
            await a.checkpoint("cp-1")
            assert [cp.id for cp in await b.list_checkpoints()] == ["cp-1"]
            (b.active_dir / "after.txt").write_text("after the checkpoint\n")
            (b.active_dir / "hello.txt").write_text("changed on b\n")

            # restore here, see there
            kept = await c.restore("cp-1")
            assert kept.id.startswith("pre-restore-cp-1-")
            # a's kernel may hold the old `active` entry for JuiceFS's 1 s entry cache
            wait_until(lambda: not (a.active_dir / "after.txt").exists(),
                       "a sees the tree c restored", timeout=5)
            assert (a.active_dir / "hello.txt").read_text() == "from a\n"
            assert (b.layout.checkpoints_dir / kept.id / "fs" / "after.txt").exists()

            # restores from two machines at once: serialized by the tree lock
            await a.checkpoint("cp-2")
            await asyncio.gather(a.restore("cp-1"), b.restore("cp-2"))
            held = [(e["event"], e.get("base_dir")) for e in logs
                    if e.get("event") in ("lock_acquired", "lock_released")
                    and e.get("lock") == "tree"]
            assert len(held) >= 6  # c's restore, then a's and b's
            for i in range(0, len(held), 2):  # acquired, released, acquired, released, ...
                assert held[i][0] == "lock_acquired" and held[i + 1][0] == "lock_released"
                assert held[i][1] == held[i + 1][1]
            names = {cp.id for cp in await c.list_checkpoints()}
            assert {"cp-1", "cp-2"} <= names and len(names) == 5

            # a machine that holds the tree lock too long: a clear error after a bounded wait,
            # nothing changed
            before = snapshot(a.active_dir)
            monkeypatch.setattr(operations, "TREE_LOCK_WAIT", 0.5)
            async with volume_lock(cfgs[2], "tree", log=LOG):
                with pytest.raises(OperationLocked, match=r"held by .* pid \d+ \(tree\)"):
                    await a.restore("cp-1")
                with pytest.raises(OperationLocked):
                    await b.delete_checkpoint("cp-1")
            assert a.state == "ready" and snapshot(a.active_dir) == before

            # delete there, gone here
            await b.delete_checkpoint("cp-2")
            assert "cp-2" not in {cp.id for cp in await a.list_checkpoints()}

            # time travel: refused, saying why and what to use instead
            with pytest.raises(HistoryOff, match="point-in-time recovery"):
                await a.list_restore_points()
            with pytest.raises(HistoryOff, match="Litestream"):
                await a.rollback("2020-01-01T00:00:00Z")

            # one machine stops while another writes: the writer never notices
            writing = asyncio.create_task(asyncio.to_thread(_write_files, b.active_dir, 40))
            await c.stop()
            assert c.state == "stopped" and not is_juicefs_mount(c.layout.mount_point)
            written = await writing
            assert [m.state for m in (a, b)] == ["ready", "ready"]
            for name, data in written.items():
                assert (a.active_dir / name).read_bytes() == data
        assert password not in json.dumps(logs, default=str)
    finally:
        for m in machines:
            await m.stop()
    for cfg in cfgs:
        assert mounts_under(Path(cfg.base_dir)) == []
        assert _files_holding(Path(cfg.base_dir), password) == []


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _write_files(folder: Path, count: int) -> dict[str, bytes]:
    written = {}
    for i in range(count):
        data = os.urandom(64 << 10)
        path = folder / f"w-{i:03d}.bin"
        path.write_bytes(data)
        written[path.name] = data
    return written
