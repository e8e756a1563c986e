"""Across machines (issue 11), end to end: real SeaweedFS, juicefs, litestream and FUSE mounts,
real `python -m fsm run` daemons killed with SIGKILL, outages made with a FaultyLink (a TCP
proxy in front of S3 that a test can cut). A "machine" is a base_dir; losing it means killing
everything that runs there and deleting the folder: only the bucket is left."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import obstore
import pytest

from fsm import Config, JuiceFS, LeaseHeld, StartError, StopError
from fsm.errors import ConfigError
from fsm.juicefs import S3_READ_BOUND, mount_fstype
from fsm.s3 import _store, list_keys_sync
from tests.helpers import capture_events, read_bounded, running, until, wait_until
from tests.s3_server import FaultyLink

pytestmark = [pytest.mark.e2e, pytest.mark.s3]

MB = 1_000_000
TTL = 6.0


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(folder: Path, prefix: str, count: int, size: int) -> dict[str, str]:
    """`count` files of random bytes; their sha256 by name."""
    written = {}
    for i in range(count):
        data = os.urandom(size)
        (folder / f"{prefix}-{i}.bin").write_bytes(data)
        written[f"{prefix}-{i}.bin"] = digest(data)
    return written


def staged_blocks(base_dir: Path | str) -> list[Path]:
    return [p for p in (Path(base_dir) / "cache").glob("*/rawstaging/**/*") if p.is_file()]


def lease_body(cfg: Config) -> dict[str, Any]:
    store = _store(_target(cfg), 10.0)
    return dict(json.loads(bytes(obstore.get(store, f"{cfg.volume_name}/fsm/lease.json")
                                 .bytes())))


def _target(cfg: Config) -> Any:
    from fsm.s3 import target_of
    return target_of(cfg)


def keys(cfg: Config, prefix: str = "") -> list[str]:
    return list_keys_sync(_target(cfg), prefix)


def lose_machine(base_dir: Path | str) -> None:
    """The machine is gone: its (dead) mount detached, its disk deleted."""
    base_dir = Path(base_dir)
    if mount_fstype(base_dir / "data") is not None:
        subprocess.run(["umount", "-l", str(base_dir / "data")], check=False)
    shutil.rmtree(base_dir)


class Machine:
    """`python -m fsm run` in S3 mode on one base_dir: a machine that can be lost with SIGKILL.
    Its JSON log (stderr) is how the test follows it."""

    def __init__(self, cfg: Config, *extra: str) -> None:
        self.cfg = cfg
        self.log_path = Path(f"{cfg.base_dir}.log")
        env = {**os.environ, "FSM_S3_ACCESS_KEY": cfg.s3_access_key,
               "FSM_S3_SECRET_ACCESS_KEY": cfg.s3_secret_access_key, "FSM_LOG_FORMAT": "json"}
        env.pop("NOTIFY_SOCKET", None)
        argv = [sys.executable, "-m", "fsm", "run", "--no-local", "--base-dir",
                str(cfg.base_dir), "--volume-name", cfg.volume_name, "--s3-endpoint-url",
                cfg.s3_endpoint_url, "--s3-bucket", cfg.s3_bucket, "--lease-ttl",
                f"{cfg.lease_ttl:g}", "--upload-delay", f"{cfg.upload_delay or 0:g}",
                "--s3-retry-deadline", f"{cfg.s3_retry_deadline:g}", *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def reached(self, state: str) -> bool:
        return any(e.get("event") == "transition" and e.get("to") == state
                   for e in self.events())

    async def ready(self, timeout: float = 60.0) -> None:
        def ready_or_dead() -> bool:
            return self.reached("ready") or self.proc.poll() is not None
        await until(ready_or_dead, "the daemon ready", timeout)
        assert self.reached("ready"), f"daemon exited {self.proc.poll()}:\n{self.tail()}"

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def processes(self) -> list[int]:
        """The daemon and every process below it."""
        found, todo = [self.proc.pid], [self.proc.pid]
        while todo:
            for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
                with contextlib.suppress(FileNotFoundError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found += kids
                    todo += kids
        return found

    def kill_everything(self) -> None:
        """SIGKILL the daemon and every child's process group (each child leads its own)."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        self.proc.wait(10)

    def clean_up(self) -> None:
        if self.proc.poll() is None:
            self.kill_everything()
        data = Path(self.cfg.base_dir) / "data"
        if data.parent.exists() and mount_fstype(data):
            subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.fixture
async def machines() -> AsyncIterator[Callable[..., Machine]]:
    started: list[Machine] = []

    def start(cfg: Config, *extra: str) -> Machine:
        started.append(Machine(cfg, *extra))
        return started[-1]

    try:
        yield start
    finally:
        for machine in started:
            machine.clean_up()


async def read_all(folder: Path, names: list[str], timeout: float = 60.0
                   ) -> dict[str, tuple[str, str | None, float]]:
    """Each file read whole in a child process with a bound: (outcome, sha256, seconds)."""
    results = {}
    for name in names:
        outcome, data, took = await asyncio.to_thread(read_bounded, folder / name, timeout)
        results[name] = (outcome, digest(data) if data is not None else None, took)
    return results


# ---- one bucket, many volumes ----------------------------------------------------------------

async def test_two_volumes_in_one_bucket_each_survive_the_loss_of_both_machines(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path) -> None:
    trees: dict[str, dict[str, str]] = {}
    for volume in ("vol-one", "vol-two"):
        cfg = s3_config(tmp_path / f"{volume}-a", volume_name=volume, lease_ttl=TTL,
                        upload_delay=0)
        async with running(cfg) as jfs:
            trees[volume] = write_files(jfs.active_dir, volume, 3, 100_000)
            await jfs.checkpoint(f"cp-{volume}")
            (jfs.active_dir / "after-checkpoint.txt").write_text(volume)
        lose_machine(cfg.base_dir)
    for volume in ("vol-one", "vol-two"):
        cfg = s3_config(tmp_path / f"{volume}-b", volume_name=volume, lease_ttl=TTL)
        with capture_events() as events:
            async with running(cfg) as jfs:
                assert sorted(os.listdir(jfs.active_dir)) == sorted(
                    [*trees[volume], "after-checkpoint.txt"])
                assert (jfs.active_dir / "after-checkpoint.txt").read_text() == volume
                for name, sha in trees[volume].items():
                    assert digest((jfs.active_dir / name).read_bytes()) == sha
                assert [c.id for c in await jfs.list_checkpoints()] == [f"cp-{volume}"]
                assert jfs.status()["lease"]["how"] == "clean"
        assert named(events, "metadata_restored")
    listed = keys(cfg)
    assert listed and {k.split("/", 1)[0] for k in listed} == {"vol-one", "vol-two"}
    for volume in ("vol-one", "vol-two"):
        mine = {k.split("/")[1] for k in listed if k.startswith(f"{volume}/")}
        assert {"chunks", "metadata", "fsm"} <= mine, mine


async def test_a_bucket_of_the_old_layout_is_refused_with_what_to_do(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = s3_config(tmp_path / "a", volume_name="old-vol", lease_ttl=TTL, upload_delay=0)
    async with running(cfg) as jfs:
        (jfs.active_dir / "kept.txt").write_text("from the old layout")
    # What releases before the per-volume layout left: the replica at juicefs-metadata/.
    store = _store(_target(cfg), 10.0)
    replica = keys(cfg, "old-vol/metadata/")
    for key in replica:
        obstore.copy(store, key, "juicefs-metadata/" + key.removeprefix("old-vol/metadata/"))
        obstore.delete(store, key)
    legacy = keys(cfg, "juicefs-metadata/")
    lose_machine(cfg.base_dir)

    # Another volume in that bucket: the legacy replica is not its own; it starts (empty).
    other = s3_config(tmp_path / "other", volume_name="new-vol", lease_ttl=TTL, upload_delay=0)
    with capture_events() as events:
        async with running(other) as jfs:
            assert os.listdir(jfs.active_dir) == []
    assert named(events, "legacy_replica_not_ours")[0]["volume"] == "old-vol"

    b = s3_config(tmp_path / "b", volume_name="old-vol", lease_ttl=TTL, upload_delay=0)
    jfs = JuiceFS(b)
    with pytest.raises(StartError) as refused:
        await jfs.start()
    await jfs.stop()
    assert isinstance(refused.value.cause, ConfigError)
    message = str(refused.value)
    assert "juicefs-metadata/" in message and "'old-vol'" in message and "UUID" in message
    assert (f"aws s3 cp --recursive --endpoint-url {b.s3_endpoint_url} "
            f"s3://{b.s3_bucket}/juicefs-metadata/ s3://{b.s3_bucket}/old-vol/metadata/"
            in message)
    assert keys(cfg, "juicefs-metadata/") == legacy  # never deleted, never moved
    left = await asyncio.to_thread(
        lambda: (b.layout.metadata_db.exists(), list(Path(b.base_dir).glob("lr-*"))))
    assert left == (False, []), left  # nothing restored; the scratch restore is gone

    # Done as the message says: the volume comes back whole.
    for key in legacy:
        obstore.copy(store, key, "old-vol/metadata/" + key.removeprefix("juicefs-metadata/"))
    async with running(b) as jfs:
        assert (jfs.active_dir / "kept.txt").read_text() == "from the old layout"


# ---- one writer per volume -------------------------------------------------------------------

async def test_a_second_machine_is_refused_while_the_first_runs_and_starts_at_once_after(
        fuse: None, s3_config: Callable[..., Config], tmp_path: Path) -> None:
    a = s3_config(tmp_path / "a", lease_ttl=TTL, upload_delay=0)
    b = s3_config(tmp_path / "b", lease_ttl=TTL, upload_delay=0)
    async with running(a) as first:
        (first.active_dir / "from-a.txt").write_text("a")
        before = lease_body(a)
        ours = keys(a, "test-volume/fsm/")  # A writes chunks and its replica meanwhile
        second = JuiceFS(b)
        started = time.monotonic()
        with pytest.raises(StartError) as refused:
            await second.start()
        refused_in = time.monotonic() - started
        await second.stop()
        held = refused.value.cause
        assert isinstance(held, LeaseHeld), refused.value
        # Seen as alive at its next refresh (every ttl/3), not after a whole ttl.
        assert refused_in < TTL, refused_in
        text = str(held)
        assert socket.gethostname() in text and f"pid {os.getpid()}" in text
        assert str(a.base_dir) in text and f"since {before['since']}" in text
        assert held.expires_in_s is not None and 0 < held.expires_in_s <= TTL
        assert "a clean stop releases the lease at once" in text
        # Nothing changed in the bucket, nor of B's own (no metadata restored, nothing set aside).
        assert lease_body(a)["token"] == before["token"]
        assert keys(a, "test-volume/fsm/") == ours
        assert not b.layout.metadata_db.exists() and not b.layout.set_aside_dir.exists()
        assert first.state == "ready"

    assert lease_body(a)["released"] is True and lease_body(a)["clean"] is True
    # The same machine and base_dir take it back at once, with their own metadata.
    with capture_events() as events:
        async with running(a) as again:
            assert (again.active_dir / "from-a.txt").read_text() == "a"
            (again.active_dir / "again.txt").write_text("again")
    taken = named(events, "lease_acquired")[0]
    assert taken["same_disk"] and taken["waited_s"] < 1.0
    assert named(events, "metadata_kept")

    with capture_events() as events:
        started = time.monotonic()
        async with running(b) as jfs:
            took = time.monotonic() - started
            assert sorted(os.listdir(jfs.active_dir)) == ["again.txt", "from-a.txt"]
    taken = named(events, "lease_acquired")[0]
    assert taken["how"] == "clean" and taken["waited_s"] < 1.0 and not taken["same_disk"]
    assert took < TTL, took


# ---- an unclean loss -------------------------------------------------------------------------

async def test_a_machine_killed_mid_write_is_taken_over_and_every_file_reads_whole(
        fuse: None, s3_config: Callable[..., Config], machines: Callable[..., Machine],
        tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    a = s3_config(tmp_path / "a", lease_ttl=TTL, upload_delay=0)
    async with running(a) as jfs:
        stopped_clean = write_files(jfs.active_dir, "clean", 3, 300_000)
        await jfs.checkpoint("cp-clean")

    # The same machine as a daemon, writes held back (upload_delay 300 s): then lost mid-write.
    daemon = machines(s3_config(tmp_path / "a", lease_ttl=TTL, upload_delay=300))
    await daemon.ready()
    active = a.layout.active_dir
    first_write = time.time()
    later = write_files(active, "later", 4, 500_000)
    await until(lambda: len(staged_blocks(a.base_dir)) >= 4, "the later writes staged")
    # The holder's next refreshes carry a watermark before the staged writes, and litestream
    # (1 s interval) carries their metadata to the bucket: the loss is of data, not metadata.
    await until(lambda: lease_body(a)["extra"]["watermark"] < _iso(first_write),
                "a watermark before the staged writes", TTL)
    last = sorted(later)[-1]
    await until_async(lambda: in_bucket(a, last, tmp_path / "probe"), "the metadata replicated",
                      10)
    daemon.kill_everything()
    killed = time.monotonic()
    lose_machine(a.base_dir)

    b = s3_config(tmp_path / "b", lease_ttl=TTL, upload_delay=0)
    with capture_events() as events:
        async with running(b) as jfs:
            took_over_s = time.monotonic() - killed
            report = jfs.status()["takeover"]
            names = sorted(os.listdir(jfs.active_dir))
            results = await read_all(jfs.active_dir, names)
            checkpoints = [c.id for c in await jfs.list_checkpoints()]
            clean_cp = {n: digest((jfs.layout.checkpoints_dir / "cp-clean" / "fs" / n)
                                  .read_bytes()) for n in stopped_clean}
    acquired = named(events, "lease_acquired")[0]
    done = named(events, "takeover_done")[0]
    assert acquired["how"] == "takeover"
    assert TTL - 1 <= acquired["waited_s"] <= TTL + 3, acquired
    assert took_over_s < TTL + 15, took_over_s
    # Before the last clean stop: all there, whole. After it: whole or absent, never unreadable.
    for name, sha in stopped_clean.items():
        assert results[name][:2] == ("ok", sha), (name, results[name])
    for name in later:
        if name in results:
            assert results[name][:2] == ("ok", later[name]), (name, results[name])
    assert set(names) <= set(stopped_clean) | set(later)
    assert checkpoints == ["cp-clean"] and clean_cp == stopped_clean
    # What was lost is reported: the metadata newer than the watermark, set aside.
    assert report == {k: v for k, v in done.items() if k in report}
    assert report["lost_transactions"] > 0 and report["from"]["base_dir"] == str(a.base_dir)
    assert report["replica"].startswith("test-volume/metadata/takeover-")
    kept = list(b.layout.set_aside_dir.glob("*/latest-before-takeover.db"))
    assert len(kept) == 1
    restored_s = done["duration_ms"] / 1000
    print(f"\ntakeover after SIGKILL (ttl {TTL:g}s): {took_over_s:.1f}s from the kill to ready "
          f"(lease wait {acquired['waited_s']:.1f}s, takeover restore {restored_s:.2f}s); "
          f"writes lost: {report['lost_s']}s (watermark {report['watermark']}, state "
          f"{report['state_at']}, latest {report['latest_state_at']}); later files kept: "
          f"{sorted(set(names) & set(later))}")
    record_property("takeover_seconds", round(took_over_s, 2))
    record_property("takeover_lease_wait_seconds", acquired["waited_s"])
    record_property("takeover_restore_seconds", restored_s)
    record_property("takeover_lost_seconds", report["lost_s"])

    # A read of what the lost machine never uploaded, as its latest metadata has it: bounded
    # by S3_READ_BOUND (it blocked for more than 10 minutes with JuiceFS's defaults).
    outcome, took = await asyncio.to_thread(read_missing, b, kept[0], sorted(later)[0],
                                            tmp_path)
    print(f"read of a missing object with {' '.join(S3_READ_BOUND)}: {outcome} after "
          f"{took:.1f}s")
    record_property("missing_object_read_seconds", round(took, 1))
    assert outcome == "error", outcome


def _iso(unix: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(unix, timezone.utc).isoformat()


async def in_bucket(cfg: Config, name: str, scratch: Path) -> bool:
    """The bucket's latest metadata (what a new machine would restore now) names `name`."""
    import sqlite3

    import structlog

    from fsm.litestream import LitestreamTool
    await asyncio.to_thread(_fresh, scratch)
    tool = LitestreamTool(Config(**{**_fields(cfg), "base_dir": scratch}),
                          structlog.get_logger("test"))
    tool.write_config()
    if not await tool.restore():
        return False
    with contextlib.closing(sqlite3.connect(tool.layout.metadata_db)) as db:
        found = db.execute("SELECT 1 FROM jfs_edge WHERE name = ?", (name.encode(),)).fetchone()
    return found is not None


def _fields(cfg: Config) -> dict[str, Any]:
    names = ("local_mode", "s3_access_key", "s3_secret_access_key", "s3_endpoint_url",
             "s3_bucket", "volume_name")
    return {n: getattr(cfg, n) for n in names}


async def until_async(condition: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.2)


def _fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def read_missing(cfg: Config, db: Path, name: str, tmp_path: Path) -> tuple[str, float]:
    """Mount a copy of `db` read-only as the controller would mount the volume (the same read
    bounds), and read `name` whose blocks are not in the bucket. Blocking: run it in a thread."""
    from fsm.metaengine import engine_env

    work = tmp_path / "missing-read"
    (work / "mp").mkdir(parents=True)
    copy = work / "meta.db"
    shutil.copy(db, copy)
    mount = subprocess.Popen(
        [str(cfg.juicefs_bin), "mount", f"sqlite3://{copy}", str(work / "mp"), "--read-only",
         "--no-bgjob", "--backup-meta", "0", "--cache-dir", str(work / "cache"),
         "--no-usage-report", *S3_READ_BOUND], env={**os.environ, **engine_env(cfg)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: mount_fstype(work / "mp") is not None, "the read-only mount", 30)
        outcome, _data, took = read_bounded(work / "mp" / "active" / "fs" / name, 300.0)
        return outcome, took
    finally:
        subprocess.run(["umount", "-l", str(work / "mp")], check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(mount.pid, signal.SIGKILL)
        mount.wait(10)


# ---- S3 unreachable --------------------------------------------------------------------------

def local_state(cfg: Config) -> dict[str, Any]:
    """What a refused start must not touch: the metadata, the staged blocks, set-aside/."""
    db = cfg.layout.metadata_db
    return {"db": (db.stat().st_ino, db.stat().st_mtime_ns) if db.exists() else None,
            "staged": sorted(p.name for p in staged_blocks(cfg.base_dir)),
            "set_aside": sorted(str(p) for p in cfg.layout.set_aside_dir.rglob("*"))}


# Through a FaultyLink, the mount's reads from S3 are served on this test's event loop: every
# file operation on the mount runs in a thread, or it would wait on itself.

async def text_of(path: Path) -> str:
    return await asyncio.to_thread(path.read_text)


async def sha_of(path: Path) -> str:
    return digest(await asyncio.to_thread(path.read_bytes))


async def listing(folder: Path) -> list[str]:
    return sorted(await asyncio.to_thread(os.listdir, folder))


async def test_a_holder_cut_off_from_s3_fences_itself_and_its_stranded_blocks_are_set_aside(
        fuse: None, s3_config: Callable[..., Config], machines: Callable[..., Machine],
        link: FaultyLink, tmp_path: Path) -> None:
    ttl = 4.0
    a = s3_config(tmp_path / "a", lease_ttl=ttl, upload_delay=0,
                  s3_endpoint_url=link.endpoint)
    async with running(a) as jfs:
        (jfs.active_dir / "uploaded.txt").write_text("before")
    a = s3_config(tmp_path / "a", lease_ttl=ttl, upload_delay=300,
                  s3_endpoint_url=link.endpoint)
    daemon = machines(a)
    await daemon.ready()
    stranded = await asyncio.to_thread(write_files, a.layout.active_dir, "stranded", 2, 300_000)
    await until(lambda: len(staged_blocks(a.base_dir)) >= 2, "blocks staged")
    await link.partition()
    cut = time.monotonic()
    await until(lambda: daemon.proc.poll() is not None, "the fenced daemon exits", ttl + 30)
    fenced_s = time.monotonic() - cut
    assert daemon.proc.returncode == 4, daemon.tail()
    assert mount_fstype(a.layout.mount_point) is None
    events = daemon.events()
    assert named(events, "lease_lost") and named(events, "fenced")
    assert [e["to"] for e in named(events, "transition")][-3:] == [
        "failed", "stopping", "stopped"]
    assert fenced_s < ttl + 10, fenced_s
    blocks = {p.name for p in staged_blocks(a.base_dir)}
    assert blocks, "the stranded blocks stay on the machine"

    await link.heal()
    b = s3_config(tmp_path / "b", lease_ttl=ttl, upload_delay=0,
                  s3_endpoint_url=link.endpoint)
    with capture_events() as events:
        async with running(b) as jfs:
            assert named(events, "lease_acquired")[0]["how"] == "takeover"
            assert await text_of(jfs.active_dir / "uploaded.txt") == "before"
            await asyncio.to_thread((jfs.active_dir / "from-b.txt").write_text, "b")
            tree_b = await listing(jfs.active_dir)
            # The fenced machine comes back while B runs: refused, nothing of its own moved.
            before = local_state(a)
            again = JuiceFS(s3_config(tmp_path / "a", lease_ttl=ttl, upload_delay=0,
                                      s3_endpoint_url=link.endpoint))
            with pytest.raises(StartError) as refused:
                await again.start()
            await again.stop()
            assert isinstance(refused.value.cause, LeaseHeld)
            assert str(b.base_dir) in str(refused.value)
            assert local_state(a) == before, "the refused start changed nothing of A's"
    # After B's clean stop it starts at once, with B's tree; its stranded blocks set aside.
    a_again = s3_config(tmp_path / "a", lease_ttl=ttl, upload_delay=0,
                        s3_endpoint_url=link.endpoint)
    with capture_events() as events:
        async with running(a_again) as jfs:
            assert await listing(jfs.active_dir) == tree_b
            for name in stranded:
                assert name not in tree_b or await sha_of(jfs.active_dir / name) == stranded[name]
    assert named(events, "superseded_set_aside")
    aside = [p for p in a.layout.set_aside_dir.glob("*/rawstaging-*/**/*") if p.is_file()]
    assert {p.name for p in aside} == blocks
    assert staged_blocks(a.base_dir) == []
    # Never uploaded: no object of the volume is a stranded block (names are <slice>_<index>_
    # <size>; B may reuse a slice id whose counter bump A never replicated: not its blocks).
    uploaded = {k.rsplit("/", 1)[-1]
                for k in await asyncio.to_thread(keys, a, "test-volume/chunks/")}
    assert uploaded and not blocks & uploaded


async def test_a_stop_without_s3_returns_in_seconds_and_the_next_start_uploads_everything(
        fuse: None, s3_config: Callable[..., Config], link: FaultyLink,
        tmp_path: Path) -> None:
    # A lease long enough that the stop, not the fence (tested above), answers the outage.
    cfg = s3_config(tmp_path / "a", lease_ttl=60, upload_delay=300,
                    s3_endpoint_url=link.endpoint)
    jfs = JuiceFS(cfg)
    await jfs.start()
    try:
        written = await asyncio.to_thread(write_files, jfs.active_dir, "kept", 3, 400_000)
        await until(lambda: len(staged_blocks(cfg.base_dir)) >= 3, "blocks staged")
        await link.partition()
        # No S3 to replicate it to (the write itself is local).
        await asyncio.to_thread((jfs.active_dir / "last.txt").write_text, "unreplicated")
        written["last.txt"] = digest(b"unreplicated")
        started = time.monotonic()
        with pytest.raises(StopError) as stopped:
            await jfs.stop()
        stop_s = time.monotonic() - started
    finally:
        await link.heal()
    message = str(stopped.value)
    assert stop_s < 10, stop_s
    assert re.search(r"\b4 written blocks \(1\.1 MiB\)", message), message  # 3 + last.txt
    assert "S3 was unreachable" in message and "rawstaging" in message
    assert "the last metadata transactions stayed in" in message
    assert len(staged_blocks(cfg.base_dir)) >= 3 and cfg.layout.metadata_db.exists()
    assert jfs.state == "stopped" and mount_fstype(cfg.layout.mount_point) is None
    assert (await asyncio.to_thread(lease_body, cfg))["released"] is False  # not clean

    # The same process starts again once S3 is back, and uploads what stayed.
    async with running(cfg) as again:
        assert again.status()["lease"]["how"] == "own"
        for name, sha in written.items():
            assert await sha_of(again.active_dir / name) == sha
    assert staged_blocks(cfg.base_dir) == []
    lose_machine(cfg.base_dir)
    async with running(s3_config(tmp_path / "b", lease_ttl=TTL, upload_delay=0,
                                 s3_endpoint_url=link.endpoint)) as other:
        assert await listing(other.active_dir) == sorted(written)
        for name, sha in written.items():
            assert await sha_of(other.active_dir / name) == sha
