"""Prometheus metrics of one controller, served by the live view (fsm.web) at `/metrics`.

Everything comes from the controller's public API: transitions (an observer) count
`juicefs_fsm_transitions_total{from,to}` and time the operations; `status()` gives the current
state, litestream restarts and, in S3 mode, the lease; the mount's `.stats` file gives the
writeback bytes still waiting for upload. Each daemon has its own CollectorRegistry (never the
global one), so two controllers in one process (the tests) do not mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .chart import LEAF_STATES

if TYPE_CHECKING:
    from .controller import JuiceFS
    from .transitions import Transition

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPERATIONS = ("checkpoint", "restore", "delete", "browse", "rollback", "start", "stop")
# Operations that leave `ready` (by the event of that name) and come back to it, through one
# state or several (a rollback's steps): timed from leaving ready to being back.
_ROUND_TRIPS = ("checkpoint", "restore", "rollback")
# Targetless transitions (the state stays `ready`) leave no Transition record: these controller
# methods are timed around the call instead.
_TARGETLESS = {"delete": "delete_checkpoint", "browse": "browse"}
# From a delete of an empty checkpoint (ms) to a stop that uploads a big writeback (minutes).
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            600.0, 1800.0)
# A scrape waits this long for `.stats`; a hung mount must not hang /metrics.
STAGING_WAIT = 1.0


class Metrics:
    """The registry of one controller, fed by attach()."""

    def __init__(self, jfs: JuiceFS) -> None:
        self.jfs = jfs
        self.registry = CollectorRegistry()
        self.transitions = Counter(
            "juicefs_fsm_transitions", "Transitions of the lifecycle chart, by leaf state.",
            ["from", "to"], registry=self.registry)
        self.durations = Histogram(
            "juicefs_fsm_operation_duration_seconds",
            "How long successful operations took: checkpoint/restore/rollback (from leaving "
            "ready to coming back), delete/browse (the call), start (uninitialized to ready), "
            "stop (stopping to stopped).",
            ["operation"], buckets=_BUCKETS, registry=self.registry)
        for operation in OPERATIONS:  # every series exists from the first scrape
            self.durations.labels(operation)
        ProcessCollector(registry=self.registry)  # the daemon's own CPU and RSS
        self.registry.register(_Live(self))
        self.after_operation: list[Callable[[str], None]] = []
        self.staging: dict[str, int] | None = None
        self._staging_read: asyncio.Task[dict[str, int]] | None = None
        self._start_began: float | None = None
        self._trip: tuple[str, float] | None = None  # (operation, left ready at)
        self._stop_began: float | None = None

    def attach(self) -> None:
        """Observe the controller from now on (before start(), to time the start)."""
        self.jfs.add_observer(self.on_transition)
        for operation, name in _TARGETLESS.items():
            setattr(self.jfs, name, self._timed(operation, getattr(self.jfs, name)))

    def on_transition(self, t: Transition) -> None:
        self.transitions.labels(t.source, t.target).inc()
        now = time.monotonic()
        if t.source == "ready" and t.event in _ROUND_TRIPS:
            self._trip = (t.event, now)
        elif t.target == "ready" and self._trip is not None:
            operation, began = self._trip
            self._trip = None
            if t.error is None:  # a failed operation comes back too, with its error
                self.durations.labels(operation).observe(now - began)
        if t.source == "uninitialized" and t.target != "stopped":
            self._start_began = now
        elif t.target == "ready" and self._start_began is not None:
            self.durations.labels("start").observe(now - self._start_began)
            self._start_began = None
        if t.target in ("failed", "stopping"):
            self._trip = self._start_began = None  # cut short: not timed
            self._stop_began = now if t.target == "stopping" else None
        elif t.target == "stopped" and self._stop_began is not None:
            self.durations.labels("stop").observe(now - self._stop_began)
            self._stop_began = None

    def _timed(self, operation: str,
               method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            result = await method(*args, **kwargs)
            self.durations.labels(operation).observe(time.monotonic() - began)
            for observer in self.after_operation:
                observer(operation)
            return result
        return timed

    async def refresh(self) -> None:
        """Read the writeback backlog for the next scrape: only while mounted, at most one read
        at a time, and never waiting more than STAGING_WAIT (reading a hung FUSE mount blocks
        its thread until the mount answers)."""
        if self.jfs.pids.get("juicefs") is None:
            self.staging = None
            return
        if self._staging_read is None:
            self._staging_read = asyncio.create_task(self.jfs.juicefs.staging())
        read = self._staging_read
        await asyncio.wait({read}, timeout=STAGING_WAIT)
        if not read.done():
            return  # keep the last value; the read finishes (or hangs) on its own
        self._staging_read = None
        try:
            self.staging = read.result()
        except (OSError, ValueError):
            self.staging = None  # unmounted meanwhile: nothing to report

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """Values read at scrape time from status() (state, restarts, lease) and refresh()."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        status = self.metrics.jfs.status()
        state = GaugeMetricFamily("juicefs_fsm_state",
                                  "1 for the current leaf state of the chart, 0 for the others.",
                                  labels=["state"])
        for leaf in LEAF_STATES:
            state.add_metric([leaf], 1.0 if leaf == status.get("state") else 0.0)
        yield state
        restarts = (status.get("restarts") or {}).get("litestream", 0)
        yield CounterMetricFamily("juicefs_fsm_litestream_restarts",
                                  "Times litestream exited while in use and was restarted.",
                                  value=float(restarts))
        staging = self.metrics.staging
        if staging is not None:
            yield GaugeMetricFamily("juicefs_fsm_writeback_bytes",
                                    "Written data staged locally, not yet uploaded.",
                                    value=float(staging.get("bytes", 0)))
            yield GaugeMetricFamily("juicefs_fsm_writeback_blocks",
                                    "Written blocks staged locally, not yet uploaded.",
                                    value=float(staging.get("blocks", 0)))
        age = lease_age(status.get("lease"))
        if age is not None:
            yield GaugeMetricFamily("juicefs_fsm_lease_age_seconds",
                                    "Seconds since this machine last refreshed its lease (S3 "
                                    "mode).", value=age)


def lease_age(lease: Any, now: datetime | None = None) -> float | None:
    """Seconds since the lease was refreshed, from status()["lease"]: its `age_s`, or its
    `last_refresh` time (ISO 8601 or Unix seconds). None when there is no lease."""
    if not isinstance(lease, dict):
        return None
    for key in ("age_s", "age"):
        if isinstance(lease.get(key), (int, float)) and not isinstance(lease[key], bool):
            return float(lease[key])
    now = now or datetime.now(timezone.utc)
    for key in ("last_refresh", "refreshed_at", "renewed_at"):
        value = lease.get(key)
        when: datetime | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            when = datetime.fromtimestamp(value, timezone.utc)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(value)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
        if when is not None:
            return max(0.0, (now - when).total_seconds())
    return None
