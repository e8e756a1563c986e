"""S3 mode end to end against a real S3 server (SeaweedFS, tests/s3_server.py), real juicefs,
litestream and FUSE mounts. The unit tests of the retry policy at the end need none of these."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from fsm import Config, JuiceFS, StartError
from fsm import shutdown as shutdown_module
from fsm.errors import S3AccessError, S3Unavailable, ToolError
from fsm.juicefs import read_format, staged_blocks
from fsm.litestream import LitestreamTool
from fsm.retry import classify_tool_error, with_s3_retries
from tests.helpers import assert_nothing_left, capture_events, pid_alive, running
from tests.s3_server import S3Server, free_port, require_weed
from tests.tree import make_rich_tree, snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.s3]

MB = 1_000_000


# ---- helpers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every event (debug included) of controllers created inside the block."""
    with capture_events() as events:
        yield events


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def handover_files(*pids: int) -> list[Path]:
    """What juicefs keeps in /tmp for a mount supervisor's seamless remount."""
    names = [n for pid in pids for n in (f"fuse_fd_comm.{pid}", f"state{pid}.json",
                                          f"state{pid}.json.bak")]
    return [Path("/tmp", n) for n in names if Path("/tmp", n).exists()]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in Path(entry.path, "cmdline").read_bytes() and pid_alive(
                    int(entry.name)):
                found.append(int(entry.name))
    return found


def assert_clean_failure(jfs: JuiceFS) -> None:
    """A failed start leaves nothing mounted and no child of ours running."""
    assert jfs.state == "failed"
    assert jfs.pids == {"juicefs": None, "litestream": None}
    assert_nothing_left(Path(jfs.config.base_dir), [])
    assert processes_mentioning(str(jfs.config.base_dir)) == []


def edges_in(db: Path) -> set[str]:
    """Names of all directory entries in a JuiceFS SQLite metadata db."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {bytes(r[0]).decode() for r in conn.execute("SELECT name FROM jfs_edge")}


async def restore_from_bucket(cfg: Config, scratch: Path) -> Path:
    """What a new machine would restore from the bucket right now (scratch base_dir)."""
    tool = _litestream_for(Config(**{**_fields(cfg), "base_dir": scratch}))
    assert await tool.restore(), "the bucket holds no metadata replica"
    return tool.layout.metadata_db


def _litestream_for(cfg: Config) -> LitestreamTool:
    Path(cfg.base_dir).mkdir(parents=True)
    tool = LitestreamTool(cfg, structlog.get_logger("test"))
    tool.write_config()
    return tool


def _fields(cfg: Config) -> dict[str, Any]:
    names = ("local_mode", "s3_access_key", "s3_secret_access_key", "s3_endpoint_url",
             "s3_bucket", "volume_name", "s3_retry_deadline")
    return {n: getattr(cfg, n) for n in names}


# ---- durability ------------------------------------------------------------------------------

async def test_machine_loss_round_trip_brings_back_tree_and_checkpoints(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path,
        record_property: Callable[[str, object], None]) -> None:
    cfg = s3_config(tmp_path / "machine-a")  # S3 default upload delay: 60 s
    assert cfg.effective_upload_delay == 60
    with captured_logs() as events:
        async with running(cfg) as jfs:
            make_rich_tree(jfs.active_dir)
            (jfs.active_dir / "big.bin").write_bytes(os.urandom(20 * MB))
            at_checkpoint = snapshot(jfs.active_dir)
            await jfs.checkpoint("before-change")
            (jfs.active_dir / "docs" / "readme.txt").write_text("changed\n")
            (jfs.active_dir / "private").unlink()
            (jfs.active_dir / "new-after-checkpoint").write_bytes(os.urandom(2 * MB))
            os.chmod(jfs.active_dir / "script.sh", 0o700)
            at_stop = snapshot(jfs.active_dir)
            _blocks, staged, _oldest = staged_blocks(cfg.layout.cache_dir)
            assert staged >= 20 * MB, "the upload delay keeps the writes on this disk"
            started = time.monotonic()
            await jfs.stop()
            stop_s = time.monotonic() - started
    record_property("stop_after_20MB_seconds", round(stop_s, 2))
    # umount --flush alone sits out the 60 s upload delay (about two minutes).
    assert stop_s < 20, f"stop took {stop_s:.1f}s"
    # The stop reported its upload (how much is left at its first look depends on how fast
    # the remounted juicefs starts) down to nothing, and left no block staged.
    progress = named(events, "flush_progress")
    assert progress and progress[-1]["bytes_left"] == 0
    assert staged_blocks(cfg.layout.cache_dir)[:2] == (0, 0)
    # juicefs's handover files (fixed /tmp paths, one set per stop) do not pile up.
    handover = named(events, "flush_remounted")[0]
    assert handover_files(handover["old_pid"], handover["pid"]) == []

    shutil.rmtree(cfg.base_dir)  # the machine is gone; only the bucket is left

    started = time.monotonic()
    async with running(s3_config(tmp_path / "machine-b")) as jfs:
        record_property("start_from_bucket_seconds", round(time.monotonic() - started, 2))
        assert snapshot(jfs.active_dir) == at_stop  # reads every byte back from S3
        assert [c.id for c in await jfs.list_checkpoints()] == ["before-change"]
        assert snapshot(jfs.layout.checkpoints_dir / "before-change" / "fs") == at_checkpoint
        await jfs.restore("before-change")
        assert snapshot(jfs.active_dir) == at_checkpoint


async def test_a_shell_left_in_the_volume_does_not_keep_stop_from_uploading_everything(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutdown_module, "BUSY_WAIT", 1.0)
    cfg = s3_config(tmp_path / "machine-a")  # upload delay 60 s: the blocks are only staged
    with captured_logs() as events:
        jfs = JuiceFS(cfg)
        progress: list[str] = []
        jfs.add_progress_observer(progress.append)
        await jfs.start()
        (jfs.active_dir / "big.bin").write_bytes(os.urandom(5 * MB))
        at_stop = snapshot(jfs.active_dir)
        # A shell cd'd into the volume that outlives the stop (not ours to kill).
        shell = await asyncio.create_subprocess_exec("sleep", "120", cwd=jfs.active_dir)
        try:
            await jfs.stop()
            assert shell.returncode is None
        finally:
            shell.kill()
            await shell.wait()
    assert jfs.state == "stopped"
    assert shell.pid in [h["pid"] for h in named(events, "unmount_busy")[0]["holders"]]
    assert named(events, "flush_progress")[-1]["bytes_left"] == 0
    assert named(events, "fuse_connection_aborted")
    # What `systemctl status` showed meanwhile (the daemon sends these as STATUS=).
    uploads = [p for p in progress if p.startswith("uploading writeback data: ")]
    assert uploads and uploads[-1] == "uploading writeback data: 0 blocks (0.0 MiB) left"
    assert f"in use by pid {shell.pid} (sleep 120)" in progress[-1]
    assert jfs.status()["progress"] is None, "cleared by the next transition"
    assert_nothing_left(cfg.base_dir, [])

    shutil.rmtree(cfg.base_dir)  # the machine is gone; only the bucket is left
    async with running(s3_config(tmp_path / "machine-b")) as jfs:
        assert snapshot(jfs.active_dir) == at_stop


async def test_checkpoint_returns_only_once_its_metadata_is_in_the_bucket(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # These machines set AWS_CA_BUNDLE, and it stops litestream 0.5's S3 replica from starting.
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    async with running(s3_config()) as jfs:
        assert b"AWS_CA_BUNDLE=" not in environ_of(jfs.pids["litestream"])
        (jfs.active_dir / "file").write_text("x")
        await jfs.checkpoint("cp-just-taken")
        # Straight away, before litestream's 1 s sync interval could have carried it over.
        db = await restore_from_bucket(jfs.config, tmp_path / "other-machine")
        assert "cp-just-taken" in edges_in(db)


# ---- which metadata a start uses ---------------------------------------------------------------

async def test_restart_on_the_same_bucket_keeps_the_local_metadata(
        fuse: None, s3_config: Callable[..., Config]) -> None:
    cfg = s3_config(upload_delay=0)
    async with running(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("still here")
    inode = cfg.layout.metadata_db.stat().st_ino
    with captured_logs() as events:
        async with running(cfg) as jfs:
            assert (jfs.active_dir / "kept.txt").read_text() == "still here"
    assert cfg.layout.metadata_db.stat().st_ino == inode  # the same file, not a restored one
    kept = named(events, "metadata_kept")
    assert kept and kept[0]["reason"] == "bucket matches"
    assert kept[0]["bucket"] == cfg.bucket_url
    assert not named(events, "metadata_set_aside") and not named(events, "metadata_restored")
    assert not cfg.layout.set_aside_dir.exists()


async def test_metadata_of_another_bucket_is_set_aside_and_the_bucket_restored(
        fuse: None, s3_server: S3Server, s3_config: Callable[..., Config],
        tmp_path: Path) -> None:
    other_bucket = s3_server.create_bucket(f"other-{free_port()}")
    async with running(s3_config(tmp_path / "elsewhere", bucket=other_bucket,
                                 upload_delay=0)) as jfs:
        (jfs.active_dir / "from-other-bucket.txt").write_text("other")
    first = s3_config(tmp_path / "vol", upload_delay=0)
    async with running(first) as jfs:
        (jfs.active_dir / "from-first-bucket.txt").write_text("first")
    old_uuid = read_format(first.layout.metadata_db)["UUID"]  # type: ignore[index]

    moved = s3_config(tmp_path / "vol", bucket=other_bucket, upload_delay=0)
    with captured_logs() as events:
        async with running(moved) as jfs:
            assert sorted(os.listdir(jfs.active_dir)) == ["from-other-bucket.txt"]
    aside = named(events, "metadata_set_aside")
    assert len(aside) == 1
    assert aside[0]["found_bucket"] == first.bucket_url
    assert aside[0]["configured_bucket"] == moved.bucket_url
    assert named(events, "metadata_restored")
    kept_db = Path(aside[0]["moved_to"]) / "metadata.db"
    assert kept_db.parent.parent == moved.layout.set_aside_dir
    assert read_format(kept_db)["Bucket"] == first.bucket_url  # type: ignore[index]
    assert read_format(moved.layout.metadata_db)["Bucket"] == moved.bucket_url  # type: ignore[index]
    assert (moved.layout.cache_dir / old_uuid).is_dir()  # its cache (rawstaging) untouched


# ---- S3 trouble at start ---------------------------------------------------------------------

async def test_start_waits_for_s3_that_comes_back_within_the_deadline(
        fuse: None, tmp_path: Path) -> None:
    require_weed()
    server = S3Server(tmp_path / "seaweedfs")
    await asyncio.to_thread(server.start)  # creates the bucket, so a restart serves it at once
    await asyncio.to_thread(server.stop)
    cfg = server.config(tmp_path / "vol", s3_retry_deadline=30.0, upload_delay=0)
    try:
        with captured_logs() as events:
            jfs = JuiceFS(cfg)
            start = asyncio.create_task(jfs.start())
            await asyncio.sleep(2.0)
            # The first S3 call of a start is the lease's (fsm.claim).
            assert not start.done() and jfs.state == "acquiring_lease"
            await asyncio.to_thread(server.start)
            try:
                await asyncio.wait_for(start, 60)
                assert jfs.state == "ready"
            finally:
                await jfs.stop()
        retries = named(events, "s3_retry")
        assert retries and all(r["error_type"] == "S3Unavailable" for r in retries)
        assert [r["attempt"] for r in retries] == list(range(1, len(retries) + 1))
        assert named(events, "s3_retry_succeeded")
    finally:
        await asyncio.to_thread(server.stop)


async def test_start_fails_clearly_when_s3_stays_down_past_the_deadline(
        fuse: None, tmp_path: Path) -> None:
    cfg = Config(base_dir=tmp_path / "vol", s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
                 s3_bucket="jfs", s3_access_key="AKDOWN", s3_secret_access_key="SKDOWN123",
                 s3_retry_deadline=2.0)
    jfs = JuiceFS(cfg)
    started = time.monotonic()
    with pytest.raises(StartError) as failure:
        await jfs.start()
    elapsed = time.monotonic() - started
    assert 1.9 < elapsed < 8.0  # retried up to the deadline, not beyond
    assert failure.value.stage == "acquiring_lease"
    assert isinstance(failure.value.cause, S3Unavailable)
    message = str(failure.value)
    assert "unreachable" in message and "s3_retry_deadline=2s" in message
    assert_clean_failure(jfs)
    await jfs.stop()


@pytest.mark.parametrize("wrong, expected", [
    ({"s3_secret_access_key": "not-the-secret"}, "rejected the credentials"),
    ({"s3_access_key": "AKUNKNOWN"}, "rejected the credentials"),
    ({"bucket": "no-such-bucket-here"}, "does not exist"),
])
async def test_wrong_credentials_or_bucket_fail_fast_with_a_clear_error(
        fuse: None, s3_config: Callable[..., Config], wrong: dict[str, str],
        expected: str) -> None:
    with captured_logs() as events:
        jfs = JuiceFS(s3_config(**wrong))
        started = time.monotonic()
        with pytest.raises(StartError) as failure:
            await jfs.start()
    assert time.monotonic() - started < 2.0
    assert isinstance(failure.value.cause, S3AccessError)
    assert expected in str(failure.value)
    assert not named(events, "s3_retry")
    assert_clean_failure(jfs)
    await jfs.stop()


# ---- secrets ---------------------------------------------------------------------------------

async def test_secrets_never_reach_argv_logs_or_files_others_can_read(
        fuse: None, s3_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = s3_config()
    secrets = [cfg.s3_access_key.encode(), cfg.s3_secret_access_key.encode()]
    argvs: list[list[str]] = []
    spawn = asyncio.create_subprocess_exec

    async def recording_spawn(*argv: Any, **kwargs: Any) -> Any:
        argvs.append([str(a) for a in argv])
        return await spawn(*argv, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", recording_spawn)
    with captured_logs() as events:
        for _ in range(2):  # a first start (restore, format) and a restart (db kept)
            async with running(cfg) as jfs:
                (jfs.active_dir / "f").write_text("data")
                await jfs.checkpoint(f"cp-{len(argvs)}")
                cmdlines = [cmdline(pid) for pid in jfs.pids.values() if pid]
                assert_private(cfg.base_dir, secrets)
            assert_private(cfg.base_dir, secrets)

    spawned = {a[1] for a in argvs}
    assert {"format", "restore", "replicate", "mount", "clone", "umount"} <= spawned
    for text in [*(" ".join(a).encode() for a in argvs), *cmdlines,
                 *(repr(e).encode() for e in events)]:
        assert not any(s in text for s in secrets), text[:200]
    assert len(events) > 50 and any(e["event"] == "child_output" for e in events)
    # juicefs keeps the access key in the volume's format row: the db must stay private.
    db = cfg.layout.metadata_db
    stored = b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    assert secrets[0] in stored
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def environ_of(pid: int | None) -> bytes:
    assert pid is not None
    return Path(f"/proc/{pid}/environ").read_bytes()


def assert_private(base_dir: Path | str, secrets: list[bytes]) -> None:
    """No file under base_dir (outside the mount) that others may read contains a secret."""
    base_dir = Path(base_dir)
    mount_point = base_dir / "data"
    for dirpath, dirnames, filenames in os.walk(base_dir):
        if Path(dirpath) == base_dir and "data" in dirnames:
            dirnames.remove("data")  # the user's files, served by the mount
        for name in filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:
                content = path.read_bytes()
                assert not any(s in content for s in secrets), f"{path} is world-readable"
    assert mount_point.exists()


# ---- the retry policy itself (no S3 needed) --------------------------------------------------

def tool_error(stderr: str, returncode: int | None = 1) -> ToolError:
    return ToolError("juicefs", "format", returncode, stderr)


@pytest.mark.parametrize("stderr, kind", [
    ("operation error S3: PutObject, StatusCode: 403, SignatureDoesNotMatch", S3AccessError),
    ("NoSuchBucket: The specified bucket does not exist", S3AccessError),
    ('dial tcp 127.0.0.1:9: connect: connection refused', S3Unavailable),
    ("https response error StatusCode: 0, request send failed", S3Unavailable),
    ("StatusCode: 503, SlowDown", S3Unavailable),
    ("volume name 'x' is invalid", ToolError),
])
def test_tool_failures_are_classified_by_what_s3_said(stderr: str, kind: type) -> None:
    assert type(classify_tool_error(tool_error(stderr))) is kind


def test_a_tool_that_timed_out_is_worth_retrying() -> None:
    assert isinstance(classify_tool_error(tool_error("", returncode=None)), S3Unavailable)


async def test_retries_stop_at_the_deadline_with_every_retry_logged() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise S3Unavailable("connection refused")

    with captured_logs() as events:
        log = structlog.get_logger("test")
        started = time.monotonic()
        with pytest.raises(S3Unavailable, match=r"after .* 1\.5s|s3_retry_deadline=1.5s"):
            await with_s3_retries("probe", down, deadline=1.5, log=log)
    assert time.monotonic() - started < 2.5
    retries = named(events, "s3_retry")
    assert calls >= 3 and len(retries) == calls - 1
    sleeps = [r["sleep_s"] for r in retries]
    assert sleeps[1] > sleeps[0]  # exponential
    assert all({"what", "attempt", "error", "sleep_s", "elapsed_s", "deadline_s"} <= set(r)
               for r in retries)
    assert named(events, "s3_retry_gave_up")


async def test_refusals_are_not_retried() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise S3AccessError("wrong secret")

    with pytest.raises(S3AccessError):
        await with_s3_retries("probe", refused, deadline=30, log=structlog.get_logger("t"))
    assert calls == 1


async def test_a_transient_failure_then_success_returns_the_result() -> None:
    answers: list[Any] = [S3Unavailable("down"), S3Unavailable("down"), "ok"]

    async def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert await with_s3_retries("probe", flaky, deadline=10,
                                 log=structlog.get_logger("t")) == "ok"
