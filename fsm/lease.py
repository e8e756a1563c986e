"""The single-writer lease on a volume in S3 mode: one object, `{volume_name}/fsm/lease.json`.

The protocol (docs/s3.md, "Bucket layout and lease protocol"), in short:
- created with `If-None-Match: *`, refreshed every ttl/3 with `If-Match: <etag>`;
- a successor compares no clocks across machines: it takes an unreleased lease of another
  holder only after it has seen the *same* ETag for a full ttl on its own clock, with
  `If-Match` on that ETag (a refresh in between makes the take fail);
- the holder fences itself at `fence_at` = (when its last successful refresh was *sent*) +
  ttl - margin: no successor's observation can have started before that refresh was applied;
- a write whose answer was lost is recognised on read-back by the holder's random token and
  the write's serial number (`refreshed_count`);
- a clean stop writes `released: true, clean: true`, so the next machine starts at once and
  knows the hand-over was clean; an unclean stop leaves the lease to run out.
Time is measured with CLOCK_BOOTTIME, which keeps counting while the machine is suspended.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from .errors import (
    FsmError,
    LeaseHeld,
    LeaseLost,
    S3ObjectMissing,
    S3PreconditionFailed,
    S3Unavailable,
)
from .holder import Clock, SystemClock, disk_id, pid_alive, read_text
from .layout import control_key
from .s3 import REQUEST_TIMEOUT, Bucket, Stored, target_of

LEASE_NAME = "lease.json"
FORMAT_VERSION = 1

How = Literal["fresh", "clean", "own", "takeover"]
Pending = Callable[[str, "dict[str, Any] | None", bool], dict[str, Any]]


class LeaseStore(Protocol):
    """What the lease needs of a bucket (fsm.s3.Bucket; a fake in unit tests)."""

    async def get(self, key: str) -> Stored | None: ...

    async def put(self, key: str, data: bytes, *, create: bool = False,
                  if_match: str | None = None) -> str: ...


@dataclass(frozen=True)
class Acquired:
    """How the lease was obtained. `how`: "fresh" (there was none), "clean" (the previous
    holder released it after a clean stop), "own" (this machine and base_dir held it: the local
    metadata is the newest), "takeover" (another holder stopped refreshing: an unclean loss).
    `previous` is the lease body found (with its `extra`: the watermark); `same_disk`: its
    holder was this machine and base_dir (else the local metadata is stale)."""

    how: How
    previous: dict[str, Any] | None
    waited_s: float
    same_disk: bool = False

    @property
    def takeover(self) -> bool:
        return self.how == "takeover"

    @property
    def previous_clean(self) -> bool:
        """Whether the previous holder (if any) stopped cleanly."""
        return self.previous is None or bool(self.previous.get("clean"))


def default_margin(ttl: float) -> float:
    """How long before the ttl runs out a holder that cannot refresh fences itself: room for
    clock-rate drift (2 x 1e-3 x ttl at worst), scheduling delays, and stopping the writers.
    Never more than ttl/3, so at least one refresh can be retried before fencing."""
    return min(ttl / 3, max(1.0, ttl / 6))


def _parse(stored: Stored) -> dict[str, Any]:
    try:
        body = json.loads(stored.body)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"host": "unknown (unreadable lease)"}


def _holder_text(body: dict[str, Any]) -> str:
    return (f"{body.get('host', '?')} (pid {body.get('pid', '?')}, base_dir "
            f"{body.get('base_dir', '?')}) since {body.get('since', '?')}")


class Lease:
    """The lease of one volume, held by this process. Use: `acquire()` before restoring
    metadata; run `hold(on_lost)` as a task while the volume is in use; `release(clean)` at
    stop. Every method raises FsmErrors only (S3Unavailable is worth retrying)."""

    def __init__(self, store: LeaseStore, volume_name: str, base_dir: Path | str, ttl: float,
                 *, log: Any = None, clock: Clock | None = None, margin: float | None = None,
                 disk: str | None = None) -> None:
        self.store = store
        self.key = control_key(volume_name, LEASE_NAME)
        self.volume_name = volume_name
        self.base_dir = Path(base_dir)
        self.ttl = ttl
        self.margin = default_margin(ttl) if margin is None else margin
        self.refresh_every = ttl / 3
        self.retry_every = min(1.0, ttl / 10)
        self.poll_every = min(2.0, ttl / 10)
        self.log = log
        self.clock = clock or SystemClock()
        self._disk = disk
        self.token = secrets.token_hex(16)
        self._lock = asyncio.Lock()
        self._etag: str | None = None
        self._count = 0
        self._since: str | None = None
        self._extra: dict[str, Any] = {}
        self._pending_for: Pending | None = None
        self._last_ok_send: float | None = None
        self._last_ok_wall: datetime | None = None
        self._first_sent: dict[int, float] = {}  # write serial -> earliest send of an attempt
        self._lost: str | None = None
        self._stopped = False

    @classmethod
    def for_config(cls, cfg: Any, log: Any = None) -> Lease:
        # A refresh that hangs must not outlive the time left before the fence.
        timeout = min(REQUEST_TIMEOUT, max(1.0, cfg.lease_ttl / 3))
        return cls(Bucket(target_of(cfg), timeout=timeout), cfg.volume_name,
                   Path(cfg.base_dir), cfg.lease_ttl, log=log)

    # ---- state ------------------------------------------------------------------------------

    @property
    def fence_at(self) -> float | None:
        """The clock reading by which this holder must have stopped writing unless a refresh
        succeeds first (None when not held)."""
        if self._last_ok_send is None:
            return None
        return self._last_ok_send + self.ttl - self.margin

    @property
    def held(self) -> bool:
        fence = self.fence_at
        return (fence is not None and self._lost is None and not self._stopped
                and self.clock.now() < fence)

    @property
    def lost(self) -> str | None:
        return self._lost

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        fence = self.fence_at
        return {
            "key": self.key, "held": self.held, "ttl": self.ttl, "margin": self.margin,
            "holder": {"host": socket.gethostname(), "pid": os.getpid(),
                       "base_dir": str(self.base_dir)},
            "since": self._since,
            "last_refresh": self._last_ok_wall.isoformat() if self._last_ok_wall else None,
            "age_s": (round(now - self._last_ok_send, 3) if self._last_ok_send is not None
                      else None),
            "expires_in_s": round(fence - now, 3) if fence is not None else None,
            "refreshed_count": self._count, "lost": self._lost, "extra": self._extra,
        }

    def _event(self, level: str, event: str, **fields: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, key=self.key, **fields)

    def _identity(self) -> dict[str, Any]:
        if self._disk is None:
            self._disk = disk_id(self.base_dir)
        return {"host": socket.gethostname(), "base_dir": str(self.base_dir),
                "disk_id": self._disk}

    def _body(self, count: int, *, released: bool = False, clean: bool = False) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "volume": self.volume_name, **self._identity(),
            "machine_id": read_text(Path("/etc/machine-id")) or None,
            "boot_id": read_text(Path("/proc/sys/kernel/random/boot_id")) or None,
            "pid": os.getpid(), "since": self._since,
            "refreshed_at": self.clock.wall().isoformat(), "token": self.token,
            "refreshed_count": count, "ttl": self.ttl, "released": released, "clean": clean,
            "extra": self._extra,
        }

    def _is_own_disk(self, body: dict[str, Any]) -> bool:
        """This machine and base_dir held it (no other process: the base_dir lock says so),
        so its local metadata is the newest there is and it may carry on at once."""
        me = self._identity()
        if any(body.get(k) != v for k, v in me.items()):
            return False
        # Belt and braces beside the base_dir lock: a live process of this boot holding it.
        same_boot = body.get("boot_id") == (read_text(Path("/proc/sys/kernel/random/boot_id"))
                                            or None)
        pid = body.get("pid")
        return not (same_boot and isinstance(pid, int) and pid != os.getpid()
                    and pid_alive(pid))

    # ---- writes -----------------------------------------------------------------------------

    async def _write(self, body: dict[str, Any], *, create: bool = False,
                     if_match: str | None = None) -> str:
        """One conditional PUT. When its answer is lost, read back: our own body (token and
        serial) there means it was applied."""
        count = int(body["refreshed_count"])
        self._first_sent.setdefault(count, self.clock.now())
        try:
            return await self.store.put(self.key, json.dumps(body).encode(), create=create,
                                        if_match=if_match)
        except S3Unavailable as unknown:
            self._event("warning", "lease_write_unconfirmed", error=str(unknown))
            try:
                found = await self.store.get(self.key)
            except S3Unavailable:
                raise unknown from None
            if found is None:
                raise  # still unknown: the write may yet land (it is conditional)
            if self._mine(_parse(found), count):
                return found.etag
            if (create or found.etag != if_match) and not self._mine(_parse(found)):
                raise S3PreconditionFailed(
                    f"the lease {self.key} was written by another holder meanwhile") from None
            raise

    def _mine(self, body: dict[str, Any], count: int | None = None) -> bool:
        return body.get("token") == self.token and (
            count is None or body.get("refreshed_count") == count)

    def _confirm(self, body: dict[str, Any], etag: str) -> None:
        count = int(body["refreshed_count"])
        sent = self._first_sent.get(count)
        self._first_sent = {c: t for c, t in self._first_sent.items() if c > count}
        self._etag, self._count = etag, count
        if sent is not None:
            self._last_ok_send = sent
            self._last_ok_wall = self.clock.wall()

    async def _update(self, body: dict[str, Any]) -> None:
        """Write `body` over our lease; settle a refusal by reading the lease back."""
        try:
            etag = await self._write(body, if_match=self._etag)
        except (S3PreconditionFailed, S3ObjectMissing):
            found = await self.store.get(self.key)
            if found is None:  # deleted under us (SeaweedFS says 412, AWS 404): re-create
                self._event("warning", "lease_vanished")
                try:
                    etag = await self._write(body, create=True)
                except S3PreconditionFailed:
                    found = await self.store.get(self.key)
                    raise self._taken(found) from None
            elif self._mine(_parse(found), int(body["refreshed_count"])):
                etag = found.etag  # an earlier attempt of this very write was applied
            elif self._mine(_parse(found)):
                self._etag = found.etag  # an older write of ours: nobody else came between
                etag = await self._write(body, if_match=found.etag)
            else:
                raise self._taken(found) from None
        self._confirm(body, etag)

    def _taken(self, found: Stored | None) -> LeaseLost:
        holder = _holder_text(_parse(found)) if found is not None else "someone"
        return self._lose(f"the lease {self.key} was taken over by {holder}")

    def _lose(self, reason: str) -> LeaseLost:
        if self._lost is None:
            self._lost = reason
            self._event("error", "lease_lost", reason=reason)
        return LeaseLost(f"this machine no longer holds volume {self.volume_name!r}: "
                         f"{self._lost}; it must stop writing to it")

    # ---- acquire ----------------------------------------------------------------------------

    async def acquire(self, *, wait: bool = True, extra: dict[str, Any] | None = None,
                      pending: Pending | None = None) -> Acquired:
        """Take the lease. A foreign unreleased lease is watched (wait=True) for a full ttl:
        changed -> LeaseHeld (its holder is alive); unchanged -> taken over. wait=False raises
        LeaseHeld at once. Nothing is written unless the lease is taken. `extra` is written
        with it, and `pending(how, previous, same_disk)` under "pending": work the new holder
        owes because of how it took the lease, recorded with the take itself."""
        if extra is not None:
            self._extra = extra
        self._pending_for = pending
        started = self.clock.now()
        # The ETag of a foreign lease, when we first saw it (its answer's arrival: the write
        # that made it was applied before that), and its body.
        watched: tuple[str, float, dict[str, Any]] | None = None
        for _ in range(1000):  # bounded: each turn waits, or follows a change made by another
            try:
                found = await self.store.get(self.key)
            except S3Unavailable:
                if watched is None:
                    raise
                if self.clock.now() < watched[1] + self.ttl:
                    await self.clock.sleep(self.poll_every)
                    continue
                # Time to take it; the take is conditional on the watched ETag, so no read
                # is needed to make it safe.
                found = Stored(b"", watched[0])
            arrived = self.clock.now()
            try:
                if found is None:
                    return await self._take(None, None, "fresh", started)
                body = _parse(found) if found.body else watched[2] if watched else {}
                if body.get("released") and body.get("clean"):
                    return await self._take(found, body, "clean", started)
                if self._is_own_disk(body):
                    return await self._take(found, body, "own", started)
                if body.get("released"):
                    return await self._take(found, body, "takeover", started)
                if not wait:
                    raise self._held(body, self.ttl)
                if watched is not None and watched[0] != found.etag:
                    raise self._held(body, arrived + self.ttl - self.clock.now())
                if watched is None:
                    watched = (found.etag, arrived, body)
                    self._event("info", "lease_watching", holder=_holder_text(body),
                                takeover_in_s=self.ttl)
                if arrived >= watched[1] + self.ttl:
                    return await self._take(found, body, "takeover", started)
            except (S3PreconditionFailed, S3ObjectMissing):
                continue  # another machine wrote it meanwhile: the next read says who
            await self.clock.sleep(max(0.0, min(self.poll_every, watched[1] + self.ttl - arrived)))
        raise FsmError(f"the lease {self.key} kept changing while this start tried to take it; "
                       f"start again")

    def _held(self, body: dict[str, Any], expires_in: float) -> LeaseHeld:
        return LeaseHeld(
            f"volume {self.volume_name!r} is in use by {_holder_text(body)}: its lease "
            f"{self.key} is held and not released. Stop it there (a clean stop releases the "
            f"lease at once); if that machine is gone, a start here takes the volume over "
            f"once the lease has gone {self.ttl:g}s without a refresh "
            f"(in {max(0.0, expires_in):.0f}s at the soonest)",
            holder=body, expires_in_s=max(0.0, expires_in))

    async def _take(self, found: Stored | None, previous: dict[str, Any] | None, how: How,
                    started: float) -> Acquired:
        async with self._lock:
            self._since = self.clock.wall().isoformat()
            self._lost, self._stopped, self._first_sent = None, False, {}
            same_disk = previous is not None and self._is_own_disk(previous)
            owed = self._pending_for(how, previous, same_disk) if self._pending_for else {}
            self._extra = {**{k: v for k, v in self._extra.items() if k != "pending"},
                           **({"pending": owed} if owed else {})}
            body = self._body(0)
            if found is None:
                etag = await self._write(body, create=True)
            else:
                etag = await self._write(body, if_match=found.etag)
            self._confirm(body, etag)
        waited = round(self.clock.now() - started, 3)
        self._event("warning" if how == "takeover" else "info", "lease_acquired", how=how,
                    waited_s=waited, same_disk=same_disk,
                    previous=_holder_text(previous) if previous else None,
                    fence_in_s=round(self.ttl - self.margin, 3))
        return Acquired(how, previous, waited, same_disk)

    # ---- hold -------------------------------------------------------------------------------

    async def refresh(self, extra: dict[str, Any] | None = None) -> None:
        """One refresh (`extra` replaces the free-form part of the body). LeaseLost when the
        lease was taken or the fence deadline has passed; S3Unavailable when S3 did not
        answer (try again before fence_at)."""
        async with self._lock:
            fence = self.fence_at
            if fence is None:
                raise LeaseLost(f"the lease {self.key} was never acquired; call acquire() first")
            if self._lost is not None:
                raise self._lose(self._lost)
            if self.clock.now() >= fence:
                raise self._lose(f"no refresh succeeded for {self.ttl - self.margin:g}s "
                                 f"(fence deadline)")
            if extra is not None:
                self._extra = extra
            await self._update(self._body(self._count + 1))

    async def hold(self, on_lost: Callable[[str], Awaitable[None] | None],
                   extra: Callable[[], dict[str, Any]] | None = None) -> None:
        """Refresh every ttl/3 until release() (or cancellation). When the lease is lost, i.e.
        taken over, or no refresh succeeded by fence_at, call on_lost(reason) once and return.
        `extra()` is asked for the body's free-form part before each refresh."""
        next_at = (self._last_ok_send or self.clock.now()) + self.refresh_every
        while not self._stopped:
            fence = self.fence_at
            now = self.clock.now()
            if fence is None or self._lost is not None or now >= fence:
                reason = self._lost or (f"no refresh succeeded for {self.ttl - self.margin:g}s;"
                                        f" fenced before the lease can be taken over")
                self._lose(reason)
                await self._call(on_lost, self._lost or reason)
                return
            if now < next_at:
                # Short naps: after a suspend or a pause the deadline is noticed at once.
                await self.clock.sleep(min(next_at - now, fence - now, self.retry_every))
                continue
            try:
                await asyncio.wait_for(self.refresh(extra() if extra else None),
                                       timeout=max(0.001, fence - now))
            except LeaseLost:
                continue  # the top of the loop reports it
            except (FsmError, asyncio.TimeoutError) as exc:
                fence_in = round((self.fence_at or now) - self.clock.now(), 3)
                self._event("warning", "lease_refresh_failed", error=str(exc) or "timed out",
                            error_type=type(exc).__name__, fence_in_s=fence_in)
                next_at = self.clock.now() + self.retry_every
                continue
            next_at = (self._last_ok_send or self.clock.now()) + self.refresh_every

    @staticmethod
    async def _call(on_lost: Callable[[str], Awaitable[None] | None], reason: str) -> None:
        result = on_lost(reason)
        if inspect.isawaitable(result):
            await result

    # ---- release ----------------------------------------------------------------------------

    async def release(self, clean: bool, extra: dict[str, Any] | None = None,
                      timeout: float | None = None) -> bool:
        """Stop holding. clean=True (everything is flushed to the bucket): write released and
        clean, so the next machine starts at once; retried for `timeout` (default ttl).
        clean=False: write nothing; the lease runs out and the next machine takes it over as
        after a loss. True when a clean release was written."""
        self._stopped = True
        if not clean or self._last_ok_send is None or self._lost is not None:
            self._event("info", "lease_left", clean=False, lost=self._lost)
            return False
        if extra is not None:
            self._extra = extra
        deadline = self.clock.now() + (self.ttl if timeout is None else timeout)
        async with self._lock:
            body = self._body(self._count + 1, released=True, clean=True)
            while True:
                try:
                    await self._update(body)
                except LeaseLost as exc:
                    self._event("warning", "lease_release_failed", error=str(exc))
                    return False
                except FsmError as exc:
                    if self.clock.now() >= deadline:
                        self._event("warning", "lease_release_failed", error=str(exc))
                        return False
                    await self.clock.sleep(self.retry_every)
                    continue
                self._event("info", "lease_released", clean=True)
                return True
