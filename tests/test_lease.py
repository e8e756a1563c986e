"""The single-writer lease (fsm.lease) and the S3 calls it relies on (fsm.s3).

Most tests run against the real SeaweedFS server (tests/s3_server.py), some through a
FaultyLink that partitions one client or loses its answers. The protocol's edge cases are
also checked fast with a fake bucket and a fake clock at the end."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fsm import Config, FsmError, LeaseHeld
from fsm.errors import (
    ConfigError,
    LeaseLost,
    S3AccessError,
    S3ObjectMissing,
    S3PreconditionFailed,
    S3Unavailable,
)
from fsm.lease import Lease, SystemClock, default_margin
from fsm.s3 import Bucket, S3Target, Stored, check_bucket, get_text, list_keys_sync, put_text
from tests.s3_server import FaultyLink, S3Server, free_port

pytestmark = [pytest.mark.s3]

TTL = 3.0
KEY = "test-volume/fsm/lease.json"
now = SystemClock().now


class Log:
    """A structlog-like logger that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _keep(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.events.append(
            {"event": event, "level": level, **fields})

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._keep(level)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def lease_on(target: S3Target, base_dir: Path, *, ttl: float = TTL, log: Any = None,
             timeout: float = 1.0) -> Lease:
    return Lease(Bucket(target, timeout=timeout), "test-volume", base_dir, ttl, log=log)


async def body_of(target: S3Target) -> dict[str, Any]:
    text = await get_text(target, KEY)
    assert text is not None
    return dict(json.loads(text))


@pytest.fixture
def target(s3_server: S3Server, s3_bucket: str) -> S3Target:
    return s3_server.target(s3_bucket)


def through(link: FaultyLink, target: S3Target) -> S3Target:
    return S3Target(link.endpoint, target.bucket, target.access_key, target.secret_key)


async def until(condition: Callable[[], bool], timeout: float = 5.0,
                every: float = 0.02) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = now() + timeout
    for _ in range(int(timeout / max(every, 0.001)) + 1000):
        if condition():
            return
        assert now() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(every)
    raise AssertionError("timed out waiting for a condition")


async def stop_holding(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# ---- acquire -----------------------------------------------------------------------------------

async def test_concurrent_creates_exactly_one_wins(target: S3Target, tmp_path: Path) -> None:
    # SeaweedFS makes concurrent conditional writes of one key wait in 1 s steps: give the
    # losers time to hear their 412 (the timeout is not what this test is about).
    leases = [lease_on(target, tmp_path / f"m{i}", timeout=15.0) for i in range(10)]
    results = await asyncio.gather(*(lease.acquire(wait=False) for lease in leases),
                                   return_exceptions=True)
    won = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(won) == 1, results
    winner = leases[won[0]]
    assert results[won[0]].how == "fresh"  # type: ignore[union-attr]
    held = [r for r in results if isinstance(r, LeaseHeld)]
    assert len(held) == 9
    assert all(str(winner.base_dir) in str(e) and socket.gethostname() in str(e) for e in held)
    assert (await body_of(target))["token"] == winner.token


async def test_a_second_start_while_the_holder_refreshes_gets_lease_held_and_changes_nothing(
        target: S3Target, tmp_path: Path) -> None:
    holder = lease_on(target, tmp_path / "a")
    await holder.acquire()
    lost: list[str] = []
    task = asyncio.create_task(holder.hold(lost.append))
    try:
        other = lease_on(target, tmp_path / "b")
        started = now()
        with pytest.raises(LeaseHeld) as held:
            await other.acquire()
        elapsed = now() - started
        # The holder refreshes every ttl/3: seen within about that, well before the ttl.
        assert elapsed < TTL, elapsed
        message = str(held.value)
        assert socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert str(holder.base_dir) in message and "since" in message
        assert 0 < held.value.expires_in_s <= TTL  # type: ignore[operator]
        assert held.value.holder["token"] == holder.token
        assert (await body_of(target))["token"] == holder.token
        assert holder.held and not lost
    finally:
        await stop_holding(task)


async def test_wait_false_fails_at_once_on_an_unreleased_lease(target: S3Target,
                                                               tmp_path: Path) -> None:
    await lease_on(target, tmp_path / "a").acquire()
    started = now()
    with pytest.raises(LeaseHeld, match="takes the volume over once the lease has gone 3s"):
        await lease_on(target, tmp_path / "b").acquire(wait=False)
    assert now() - started < 1.0


async def test_after_a_clean_release_the_next_machine_starts_at_once(target: S3Target,
                                                                    tmp_path: Path) -> None:
    first = lease_on(target, tmp_path / "a")
    await first.acquire()
    await first.refresh(extra={"watermark": {"txid": 7}})
    assert await first.release(clean=True, extra={"watermark": {"txid": 9}})
    stored = await body_of(target)
    assert stored["released"] is True and stored["clean"] is True
    assert not first.held

    started = now()
    second = lease_on(target, tmp_path / "b")
    got = await second.acquire()
    assert now() - started < 1.0
    assert got.how == "clean" and got.previous_clean and not got.takeover
    assert got.previous is not None and got.previous["extra"] == {"watermark": {"txid": 9}}
    assert not got.same_disk
    # Back on the first machine after the second ran the volume: its local copy is stale.
    assert await second.release(clean=True)
    back = await lease_on(target, tmp_path / "a").acquire()
    assert back.how == "clean" and not back.same_disk
    assert back.previous is not None and back.previous["token"] == second.token


async def test_an_abandoned_lease_is_taken_over_after_a_full_ttl_unchanged_and_not_before(
        target: S3Target, tmp_path: Path) -> None:
    gone = lease_on(target, tmp_path / "a")
    await gone.acquire()
    await gone.refresh(extra={"watermark": {"txid": 3}})
    assert not await gone.release(clean=False)  # a stop that could not flush: nothing written
    assert (await body_of(target))["released"] is False

    successor = lease_on(target, tmp_path / "b")
    changed_at: list[float] = []

    async def watch() -> None:  # another reader: when does the object change hands?
        for _ in range(1000):
            if (await body_of(target))["token"] == successor.token:
                changed_at.append(now())
                return
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    started = now()
    got = await asyncio.wait_for(successor.acquire(), TTL + 5)
    await asyncio.wait_for(watcher, 5)
    assert got.how == "takeover" and got.takeover and not got.previous_clean
    assert got.previous is not None and got.previous["token"] == gone.token
    assert got.previous["extra"] == {"watermark": {"txid": 3}}
    assert TTL <= got.waited_s < TTL + 2
    assert changed_at[0] - started >= TTL


async def test_the_same_machine_and_base_dir_take_their_own_lease_back_at_once(
        target: S3Target, tmp_path: Path) -> None:
    crashed = lease_on(target, tmp_path / "vol")
    await crashed.acquire()  # then the process dies: no release
    started = now()
    again = await lease_on(target, tmp_path / "vol").acquire()
    assert now() - started < 1.0
    assert again.how == "own" and again.same_disk and again.previous is not None
    assert again.previous["token"] == crashed.token
    # The same path on a fresh disk (no lease-id file) is someone else: it must wait.
    (tmp_path / "vol" / "fsm.lease-id").unlink()
    with pytest.raises(LeaseHeld):
        await lease_on(target, tmp_path / "vol").acquire(wait=False)


async def test_a_lease_for_a_config_uses_its_bucket_volume_and_ttl(
        s3_config: Callable[..., Config], target: S3Target, tmp_path: Path) -> None:
    lease = Lease.for_config(s3_config(tmp_path / "vol", lease_ttl=4.0), Log())
    assert (lease.key, lease.ttl, lease.base_dir) == (KEY, 4.0, tmp_path / "vol")
    assert (await lease.acquire()).how == "fresh"
    assert (await body_of(target))["ttl"] == 4.0
    assert (tmp_path / "vol" / "fsm.lease-id").stat().st_mode & 0o777 == 0o600
    assert await lease.release(clean=True)


# ---- hold: refresh, fence, loss ----------------------------------------------------------------

async def test_a_partitioned_holder_fences_itself_before_anyone_can_take_over(
        target: S3Target, link: FaultyLink, tmp_path: Path) -> None:
    log = Log()
    holder = lease_on(through(link, target), tmp_path / "a", log=log)
    await holder.acquire()
    lost_at: list[float] = []
    reasons: list[str] = []

    async def on_lost(reason: str) -> None:
        lost_at.append(now())
        reasons.append(reason)

    task = asyncio.create_task(holder.hold(on_lost, extra=lambda: {"watermark": 1}))
    try:
        await until(lambda: holder.status()["refreshed_count"] >= 2)
        await link.partition()
        cut_at = now()
        fence_at = holder.fence_at
        assert fence_at is not None and fence_at <= cut_at + TTL - holder.margin

        successor = lease_on(target, tmp_path / "b")
        successor_started = now()
        got = await asyncio.wait_for(successor.acquire(), TTL * 3)
        taken_at = now()
        await asyncio.wait_for(task, 2)
    finally:
        await stop_holding(task)
    assert got.how == "takeover" and got.previous is not None
    assert got.previous["extra"] == {"watermark": 1}
    assert len(lost_at) == 1 and "no refresh succeeded" in reasons[0]
    # Fenced at its deadline (plus a nap at most), before the earliest possible takeover,
    # which is a full ttl after the successor first read the lease.
    assert fence_at <= lost_at[0] < fence_at + holder.retry_every + 1.0
    assert fence_at < successor_started + TTL
    assert lost_at[0] < taken_at
    assert log.named("lease_refresh_failed") and log.named("lease_lost")
    assert not holder.held and holder.lost


async def test_a_holder_whose_lease_was_taken_reports_it_at_its_next_refresh(
        target: S3Target, tmp_path: Path) -> None:
    holder = lease_on(target, tmp_path / "a")
    await holder.acquire()
    lost: list[str] = []
    task = asyncio.create_task(holder.hold(lost.append))
    try:
        # Someone overwrites the lease (an operator, a buggy peer): the refresh gets 412.
        intruder = {"host": "elsewhere", "pid": 1, "base_dir": "/x", "token": "t"}
        await put_text(target, KEY, json.dumps(intruder))
        started = now()
        await asyncio.wait_for(task, TTL)
    finally:
        await stop_holding(task)
    assert now() - started <= holder.refresh_every + 0.5
    assert len(lost) == 1 and "taken over by elsewhere" in lost[0]
    with pytest.raises(LeaseLost):
        await holder.refresh()


async def test_a_lost_answer_is_recognised_by_the_holder_token(
        target: S3Target, link: FaultyLink, tmp_path: Path) -> None:
    log = Log()
    holder = lease_on(through(link, target), tmp_path / "a", log=log)
    link.lose_answers(1)
    got = await holder.acquire()  # the create was applied; its answer never came
    assert got.how == "fresh" and link.lost_answers == 1
    assert (await body_of(target))["token"] == holder.token

    link.lose_answers(1)
    await holder.refresh(extra={"n": 1})  # applied, answer lost, read back: ours
    assert link.lost_answers == 2
    assert log.named("lease_write_unconfirmed")
    stored = await body_of(target)
    assert stored["refreshed_count"] == 1 and stored["extra"] == {"n": 1}

    # Lost answer and the read-back fails too: the holder does not know...
    link.lose_answers(1)
    link.lose_answers(1, "GET")
    with pytest.raises(S3Unavailable):
        await holder.refresh(extra={"n": 2})
    assert (await body_of(target))["refreshed_count"] == 2  # ...but it was applied.
    # The next try gets 412 (stale ETag) and recognises its own write of that serial.
    await holder.refresh(extra={"n": 2})
    stored = await body_of(target)
    assert stored["refreshed_count"] == 2 and stored["token"] == holder.token
    assert holder.status()["refreshed_count"] == 2
    await holder.refresh(extra={"n": 3})
    assert (await body_of(target))["refreshed_count"] == 3


async def test_a_vanished_lease_is_created_again_by_its_holder(target: S3Target,
                                                               tmp_path: Path) -> None:
    holder = lease_on(target, tmp_path / "a")
    await holder.acquire()
    await Bucket(target).delete(KEY)
    await holder.refresh()  # If-Match on a missing key: re-created with If-None-Match
    assert (await body_of(target))["token"] == holder.token


async def test_status_reports_the_holder_and_its_deadline(target: S3Target,
                                                          tmp_path: Path) -> None:
    lease = lease_on(target, tmp_path / "a")
    assert lease.status()["held"] is False and lease.fence_at is None
    await lease.acquire()
    status = lease.status()
    assert status["held"] and status["ttl"] == TTL
    assert status["holder"] == {"host": socket.gethostname(), "pid": os.getpid(),
                                "base_dir": str(tmp_path / "a")}
    assert 0 <= status["age_s"] < 1 and TTL - lease.margin - 1 < status["expires_in_s"]
    assert status["since"] and status["last_refresh"]
    assert status["expires_in_s"] <= TTL - lease.margin


# ---- secrets and errors ------------------------------------------------------------------------

async def test_secrets_never_reach_messages_logs_or_the_lease(
        s3_server: S3Server, target: S3Target, link: FaultyLink, tmp_path: Path) -> None:
    log = Log()
    secrets = [target.access_key, target.secret_key]
    texts: list[str] = []
    holder = lease_on(through(link, target), tmp_path / "a", log=log)
    await holder.acquire()
    texts.append(json.dumps(await body_of(target)))
    link.lose_answers(1)
    link.lose_answers(1, "GET")
    with pytest.raises(S3Unavailable) as down:
        await holder.refresh()
    texts.append(str(down.value))
    bad = S3Target(target.endpoint, target.bucket, target.access_key, "wrong-" + secrets[1])
    with pytest.raises(S3AccessError) as refused:
        await lease_on(bad, tmp_path / "b").acquire()
    texts.append(str(refused.value))
    with pytest.raises(LeaseHeld) as held:
        await lease_on(target, tmp_path / "c").acquire(wait=False)
    texts.append(str(held.value))
    texts += [repr(e) for e in log.events]
    assert "rejected the credentials" in texts[2]
    for text in texts:
        assert not any(s in text for s in [*secrets, "wrong-"]), text


async def test_bucket_errors_are_classified_fast(s3_server: S3Server, target: S3Target) -> None:
    for wrong, expected in [({"secret_key": "nope"}, "rejected the credentials"),
                            ({"access_key": "AKUNKNOWN"}, "rejected the credentials"),
                            ({"bucket": "no-such-bucket-here"}, "does not exist")]:
        values = {"endpoint": target.endpoint, "bucket": target.bucket,
                  "access_key": target.access_key, "secret_key": target.secret_key, **wrong}
        with pytest.raises(S3AccessError, match=expected):
            await check_bucket(S3Target(**values))
    started = now()
    with pytest.raises(S3Unavailable, match="unreachable: Connection refused"):
        await check_bucket(S3Target(f"http://127.0.0.1:{free_port()}", "b", "AK", "SK"))
    assert now() - started < 1.0
    assert await check_bucket(target) == "us-east-1"


async def test_5xx_is_worth_retrying() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        busy = S3Target(f"http://127.0.0.1:{port}", "b", "AK", "SK")
        with pytest.raises(S3Unavailable, match=r"not serving yet .HTTP 503 SlowDown"):
            await check_bucket(busy)
        with pytest.raises(S3Unavailable):
            await Bucket(busy).put("k", b"x", create=True)
    finally:
        server.close()
        await server.wait_closed()


async def test_objects_round_trip_with_conditional_writes(target: S3Target) -> None:
    bucket = Bucket(target)
    assert await get_text(target, "v/fsm/CURRENT") is None
    await put_text(target, "v/fsm/CURRENT", "gen-1")
    assert await get_text(target, "v/fsm/CURRENT") == "gen-1"
    etag = await bucket.put("v/fsm/x", b"1", create=True)
    with pytest.raises(S3PreconditionFailed):
        await bucket.put("v/fsm/x", b"2", create=True)
    with pytest.raises(S3PreconditionFailed):
        await bucket.put("v/fsm/x", b"2", if_match='"not-it"')
    await bucket.put("v/fsm/x", b"3", if_match=etag)
    assert (await bucket.get("v/fsm/x")) == Stored(b"3", (await bucket.get("v/fsm/x")).etag)  # type: ignore[union-attr]
    assert sorted(list_keys_sync(target, "v/")) == ["v/fsm/CURRENT", "v/fsm/x"]
    assert sorted(await bucket.list_keys("v/fsm/")) == ["v/fsm/CURRENT", "v/fsm/x"]


# ---- the protocol's edge cases, fast: a fake bucket and a fake clock --------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def wall(self) -> Any:
        from datetime import datetime, timezone
        return datetime.fromtimestamp(self.t, timezone.utc)

    async def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.0)
        await asyncio.sleep(0)


class FakeBucket:
    """S3 semantics of conditional PUTs, with faults: `down` (nothing answers), `lose` (the
    next n writes are applied but their answers lost), `missing_if_match` (what If-Match on a
    missing key answers: 412 like SeaweedFS, or 404 like AWS), `conflicts` (409s)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.objects: dict[str, Stored] = {}
        self.serial = 0
        self.down = False
        self.lose = 0
        self.conflicts = 0
        self.missing_if_match: type[FsmError] = S3PreconditionFailed
        self.puts: list[tuple[float, str, dict[str, Any]]] = []
        self.on_get: Callable[[], None] | None = None

    def set(self, key: str, body: dict[str, Any]) -> str:
        self.serial += 1
        self.objects[key] = Stored(json.dumps(body).encode(), f'"e{self.serial}"')
        return self.objects[key].etag

    async def get(self, key: str) -> Stored | None:
        if self.down:
            raise S3Unavailable("S3 endpoint fake is unreachable: Connection refused")
        if self.on_get:
            self.on_get()
        return self.objects.get(key)

    async def put(self, key: str, data: bytes, *, create: bool = False,
                  if_match: str | None = None) -> str:
        if self.down:
            raise S3Unavailable("S3 endpoint fake is unreachable: Connection refused")
        if self.conflicts:
            self.conflicts -= 1
            raise S3Unavailable("S3 at fake is not serving yet (HTTP 409 "
                                "ConditionalRequestConflict)")
        current = self.objects.get(key)
        if create and current is not None:
            raise S3PreconditionFailed("exists")
        if if_match is not None:
            if current is None:
                raise self.missing_if_match("missing")
            if current.etag != if_match:
                raise S3PreconditionFailed("changed")
        body = json.loads(data)
        self.puts.append((self.clock.now(), "create" if create else "match", body))
        etag = self.set(key, body)
        if self.lose:
            self.lose -= 1
            raise S3Unavailable("S3 endpoint fake is unreachable: timed out")
        return etag


def fake_lease(bucket: FakeBucket, clock: FakeClock, name: str = "a", ttl: float = 30.0,
               log: Any = None) -> Lease:
    return Lease(bucket, "test-volume", Path("/nonexistent") / name, ttl, log=log,
                 clock=clock, disk=f"disk-{name}")


FOREIGN = {"host": "other-host", "pid": 42, "base_dir": "/srv/vol", "disk_id": "d",
           "token": "their-token", "since": "2026-01-01T00:00:00+00:00", "released": False,
           "clean": False, "extra": {"watermark": {"txid": 5}}}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeBucket:
    return FakeBucket(clock)


def test_the_margin_leaves_room_for_a_retry_and_for_drift() -> None:
    assert default_margin(3) == 1.0 and default_margin(6) == 1.0
    assert default_margin(30) == 5.0 and default_margin(3600) == 600.0
    for ttl in (3, 4.5, 10, 30, 300, 3600):
        margin = default_margin(ttl)
        assert margin <= ttl / 3 and margin >= min(1.0, ttl / 3) and margin > 2e-3 * ttl


async def test_fake_takeover_happens_a_full_ttl_after_the_first_read(
        fake: FakeBucket, clock: FakeClock) -> None:
    fake.set(KEY, FOREIGN)
    started = clock.now()
    got = await fake_lease(fake, clock).acquire()
    assert got.how == "takeover" and got.previous == FOREIGN
    (at, kind, _), = fake.puts
    assert kind == "match" and at >= started + 30.0
    assert got.waited_s < 30.0 + 3.1  # polled every min(2 s, ttl/10)


async def test_fake_a_change_while_watching_means_a_live_holder(fake: FakeBucket,
                                                                clock: FakeClock) -> None:
    fake.set(KEY, FOREIGN)
    reads = 0

    def holder_refreshes() -> None:
        nonlocal reads
        reads += 1
        if reads == 4:
            fake.set(KEY, {**FOREIGN, "refreshed_count": 1})

    fake.on_get = holder_refreshes
    with pytest.raises(LeaseHeld, match=r"other-host \(pid 42, base_dir /srv/vol\)") as held:
        await fake_lease(fake, clock).acquire()
    assert fake.puts == [] and 29 < held.value.expires_in_s <= 30  # type: ignore[operator]


async def test_fake_a_released_lease_is_taken_at_once(fake: FakeBucket,
                                                      clock: FakeClock) -> None:
    fake.set(KEY, {**FOREIGN, "released": True, "clean": True})
    got = await fake_lease(fake, clock).acquire()
    assert got.how == "clean" and got.waited_s == 0


async def test_fake_s3_down_while_watching_still_takes_over_conditionally(
        fake: FakeBucket, clock: FakeClock) -> None:
    fake.set(KEY, FOREIGN)
    reads = 0

    def outage() -> None:
        nonlocal reads
        reads += 1
        if reads == 2:
            fake.down = True
            clock_at_down.append(clock.now())

    clock_at_down: list[float] = []
    fake.on_get = outage
    lease = fake_lease(fake, clock)
    task = asyncio.create_task(lease.acquire())
    await until(lambda: bool(clock_at_down), every=0)
    fake.down = False  # (the GET raising happened after `down` was set; back for the PUT)
    got = await task
    assert got.how == "takeover"


async def test_fake_lost_create_answer_is_ours(fake: FakeBucket, clock: FakeClock) -> None:
    fake.lose = 1
    got = await fake_lease(fake, clock).acquire()
    assert got.how == "fresh"


async def test_fake_fence_time_counts_from_the_earliest_send_of_an_unconfirmed_write(
        fake: FakeBucket, clock: FakeClock) -> None:
    lease = fake_lease(fake, clock)
    await lease.acquire()
    clock.t += 10
    first_send = clock.now()
    fake.lose = 1
    fake.down = False

    async def lose_and_fail_readback(key: str) -> Stored | None:
        raise S3Unavailable("down")

    real_get = fake.get
    fake.get = lose_and_fail_readback  # type: ignore[method-assign]
    with pytest.raises(S3Unavailable):
        await lease.refresh()
    fake.get = real_get  # type: ignore[method-assign]
    clock.t += 5
    await lease.refresh()  # 412, then recognised: serial 1 was applied
    assert lease.status()["refreshed_count"] == 1
    assert lease.fence_at == first_send + lease.ttl - lease.margin


@pytest.mark.parametrize("answer", [S3PreconditionFailed, S3ObjectMissing])
async def test_fake_a_vanished_lease_is_recreated(fake: FakeBucket, clock: FakeClock,
                                                  answer: type[FsmError]) -> None:
    fake.missing_if_match = answer
    lease = fake_lease(fake, clock)
    await lease.acquire()
    del fake.objects[KEY]
    await lease.refresh()
    assert fake.puts[-1][1] == "create" and lease.held


async def test_fake_a_409_conflict_is_retried_by_hold(fake: FakeBucket,
                                                      clock: FakeClock) -> None:
    lease = fake_lease(fake, clock)
    await lease.acquire()
    fake.conflicts = 1
    with pytest.raises(S3Unavailable, match="409"):
        await lease.refresh()
    await lease.refresh()
    assert lease.status()["refreshed_count"] == 1


async def test_fake_hold_fences_exactly_at_the_deadline(fake: FakeBucket,
                                                        clock: FakeClock) -> None:
    log = Log()
    lease = fake_lease(fake, clock, log=log)
    await lease.acquire()
    sent = clock.now()
    fake.down = True
    lost: list[tuple[float, str]] = []
    await asyncio.wait_for(lease.hold(lambda r: lost.append((clock.now(), r))), 5)
    (at, _reason), = lost
    fence = sent + 30 - default_margin(30)
    assert fence <= at < fence + lease.retry_every + 1e-9
    assert len(log.named("lease_refresh_failed")) >= 10
    # Any successor reads the lease after that write was applied, i.e. after `sent`, and
    # takes it a full ttl after its read: after the fence, by at least the margin.
    assert at <= sent + 30 - lease.margin


async def test_fake_hold_refreshes_every_third_of_the_ttl(fake: FakeBucket,
                                                          clock: FakeClock) -> None:
    lease = fake_lease(fake, clock)
    await lease.acquire()
    task = asyncio.create_task(lease.hold(lambda r: None, extra=lambda: {"w": clock.now()}))
    await until(lambda: len(fake.puts) >= 5, every=0)
    assert await lease.release(clean=True)
    await asyncio.wait_for(task, 1)
    times = [t for t, _, _ in fake.puts[:5]]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [10.0] * 4
    assert fake.puts[-1][2]["released"] and fake.puts[-1][2]["clean"]


async def test_fake_release_when_lost_or_unclean_writes_nothing(fake: FakeBucket,
                                                               clock: FakeClock) -> None:
    lease = fake_lease(fake, clock)
    await lease.acquire()
    assert not await lease.release(clean=False)
    assert len(fake.puts) == 1
    other = fake_lease(fake, clock, "b")
    fake.set(KEY, FOREIGN)
    await other.acquire()  # takes over after the ttl
    lease2 = fake_lease(fake, clock, "c")
    fake.objects.pop(KEY)
    await lease2.acquire()
    fake.set(KEY, FOREIGN)
    assert not await lease2.release(clean=True)  # 412 and not ours: lost, nothing claimed
    assert lease2.lost and "other-host" in lease2.lost


async def test_fake_the_same_disk_with_another_live_process_is_not_own(
        fake: FakeBucket, clock: FakeClock) -> None:
    first = fake_lease(fake, clock)
    await first.acquire()
    body = json.loads(fake.objects[KEY].body)
    fake.set(KEY, {**body, "pid": os.getppid()})  # a live process of this boot holds it
    with pytest.raises(LeaseHeld):
        await fake_lease(fake, clock).acquire(wait=False)
    fake.set(KEY, body)  # our own pid (a previous Lease of this process): own
    assert (await fake_lease(fake, clock).acquire()).how == "own"


# ---- configuration -----------------------------------------------------------------------------

def test_lease_ttl_is_configurable_and_validated(tmp_path: Path) -> None:
    assert Config(base_dir=tmp_path, local_mode=True).lease_ttl == 30.0
    cfg = Config.from_env({"FSM_BASE_DIR": str(tmp_path), "FSM_LOCAL_MODE": "1",
                           "FSM_LEASE_TTL": "12.5"})
    assert cfg.lease_ttl == 12.5
    for bad in (2.9, 3601, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lease_ttl"):
            Config(base_dir=tmp_path, local_mode=True, lease_ttl=bad)


def test_run_takes_lease_ttl(tmp_path: Path) -> None:
    from fsm.cli import build_parser, run_config
    args = build_parser().parse_args(["run", "--base-dir", str(tmp_path), "--local",
                                      "--lease-ttl", "9"])
    assert run_config(args, environ={}).lease_ttl == 9.0


def test_time_is_boottime() -> None:
    assert abs(SystemClock().now() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
