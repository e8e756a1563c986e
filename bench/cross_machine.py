"""Benchmark: what the cross-machine safety costs (S3 mode, a real SeaweedFS on loopback).

In one run, alternating the order each round:
- start and stop with the single-writer lease against the same controller without it (the
  lease turned off in-process: the design before the lease);
- a clean hand-over (stop on machine A, start on machine B from an empty base_dir) against a
  plain restart of A (its own lease, its own metadata);
- an unclean takeover: machine A (a `juicefs-fsm run` daemon) is killed with SIGKILL mid-write
  and its disk removed; machine B starts from the bucket. Split into the lease wait (B watches
  the lease for lease_ttl) and the restore to A's last watermark (the `taking_over` step),
  with the writes lost (seconds of history between the watermark and A's last replicated
  state).

    .venv/bin/python bench/cross_machine.py             # ~4 minutes
    .venv/bin/python bench/cross_machine.py --rounds 3  # quicker

Needs root and /dev/fuse, like the end-to-end tests. Results: stdout and
bench/results/<stamp>-cross-machine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsm import Config, JuiceFS  # noqa: E402
from fsm.claim import Claim  # noqa: E402
from fsm.control import call  # noqa: E402
from fsm.juicefs import mount_fstype  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

HERE = Path(__file__).resolve().parent
LEASE_TTL = 6.0


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


@contextlib.contextmanager
def lease_off() -> Any:
    """The controller as it was before the lease: Claim never takes one."""
    original = Claim.uses_lease
    Claim.uses_lease = property(lambda self: False)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        Claim.uses_lease = original  # type: ignore[method-assign]


class Bench:
    def __init__(self, server: S3Server, root: Path) -> None:
        self.server = server
        self.root = root
        self.n = 0

    def config(self, name: str, volume: str, **over: Any) -> Config:
        return Config(base_dir=self.root / name, volume_name=volume,
                      s3_endpoint_url=self.server.endpoint, s3_bucket=self.server.bucket,
                      s3_access_key=self.server.access_key,
                      s3_secret_access_key=self.server.secret_key,
                      lease_ttl=LEASE_TTL, upload_delay=over.pop("upload_delay", 0), **over)

    def volume(self) -> str:
        self.n += 1
        return f"bench-{os.getpid()}-{self.n}"

    async def start_stop(self, with_lease: bool) -> tuple[float, float]:
        cfg = self.config(f"s-{self.volume()}", f"ss-{self.n}")
        jfs = JuiceFS(cfg)
        await jfs.start()  # formats: the measured starts below are warm restarts
        await jfs.stop()
        ctx = contextlib.nullcontext() if with_lease else lease_off()
        with ctx:
            jfs = JuiceFS(cfg)
            started = time.perf_counter()
            await jfs.start()
            start = time.perf_counter() - started
            (jfs.active_dir / "f.txt").write_text("x")
            started = time.perf_counter()
            await jfs.stop()
            stop = time.perf_counter() - started
        return start, stop

    async def hand_over(self) -> tuple[float, float]:
        """(clean hand-over to B, plain restart of A), seconds to ready."""
        volume = self.volume()
        a = self.config(f"a-{volume}", f"ho-{self.n}")
        b = self.config(f"b-{volume}", f"ho-{self.n}")
        jfs = JuiceFS(a)
        await jfs.start()
        (jfs.active_dir / "f.txt").write_text("x")
        await jfs.stop()
        jfs = JuiceFS(a)
        started = time.perf_counter()
        await jfs.start()
        plain = time.perf_counter() - started
        await jfs.stop()
        jfs = JuiceFS(b)
        started = time.perf_counter()
        await jfs.start()
        handed = time.perf_counter() - started
        assert (jfs.active_dir / "f.txt").read_text() == "x"
        await jfs.stop()
        return handed, plain

    async def takeover(self) -> dict[str, float]:
        volume = self.volume()
        a = self.config(f"ta-{volume}", f"to-{self.n}", upload_delay=30)
        b = self.config(f"tb-{volume}", f"to-{self.n}", upload_delay=30)
        async with daemon(a, self.server) as pids:
            active = a.layout.active_dir
            for i in range(20):
                (active / f"early-{i}.bin").write_bytes(os.urandom(64 << 10))
            await asyncio.sleep(LEASE_TTL / 3 + 1)  # a refresh records the watermark
            for i in range(20):
                (active / f"late-{i}.bin").write_bytes(os.urandom(64 << 10))
            await asyncio.sleep(1.5)  # replicated, not uploaded (upload_delay 30 s)
            for pid in pids():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        await asyncio.to_thread(lazy_unmount, a.layout.mount_point)
        shutil.rmtree(a.base_dir, ignore_errors=True)
        jfs = JuiceFS(b)
        started = time.perf_counter()
        await jfs.start()
        total = time.perf_counter() - started
        status = jfs.status()
        taking = next(t.duration_ms for t in jfs.history if t.source == "taking_over")
        report = status["takeover"] or {}
        await jfs.stop()
        return {"total_s": total, "lease_wait_s": status["lease"]["waited_s"],
                "restore_s": taking / 1000, "lost_s": report.get("lost_s", 0.0)}


@contextlib.asynccontextmanager
async def daemon(cfg: Config, server: S3Server) -> AsyncIterator[Any]:
    env = {**os.environ, "FSM_S3_ACCESS_KEY": server.access_key,
           "FSM_S3_SECRET_ACCESS_KEY": server.secret_key, "FSM_LEASE_TTL": str(LEASE_TTL),
           "FSM_UPLOAD_DELAY": str(cfg.effective_upload_delay)}
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "fsm", "run", "--base-dir", str(cfg.base_dir),
         "--volume-name", cfg.volume_name, "--s3-endpoint-url", server.endpoint,
         "--s3-bucket", server.bucket], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while status.get("state") != "ready":
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the daemon did not become ready")
        with contextlib.suppress(Exception):
            status = await asyncio.to_thread(call, cfg.base_dir, "status", timeout=2)
        await asyncio.sleep(0.1)

    def pids() -> list[int]:
        found = [proc.pid, *(p for p in (status.get("pids") or {}).values() if p)]
        return [int(p) for p in found]

    try:
        yield pids
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        if mount_fstype(cfg.layout.mount_point) is not None:
            await asyncio.to_thread(lazy_unmount, cfg.layout.mount_point)


def lazy_unmount(mount_point: Path) -> None:
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def med(values: list[float]) -> float:
    return statistics.median(values)


def paired(with_it: list[float], without: list[float]) -> float:
    """Both sides run back to back in each round: the median of the per-round ratios is what
    the load on a shared machine blurs least (bench/run.py's verdict uses it too)."""
    return med([a / b for a, b in zip(with_it, without, strict=True)])


async def main(rounds: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fsm-xbench-"))
    server = S3Server(root / "s3")
    await asyncio.to_thread(server.start)
    try:
        bench = Bench(server, root)
        samples: dict[str, list[float]] = {k: [] for k in (
            "start_lease", "stop_lease", "start_plain", "stop_plain", "handover", "restart")}
        takeovers: list[dict[str, float]] = []
        for i in range(rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for with_lease in order:
                start, stop = await bench.start_stop(with_lease)
                key = "lease" if with_lease else "plain"
                samples[f"start_{key}"].append(start)
                samples[f"stop_{key}"].append(stop)
            handed, plain = await bench.hand_over()
            samples["handover"].append(handed)
            samples["restart"].append(plain)
            say(f"round {i + 1}/{rounds} done")
        for _ in range(max(1, rounds // 2)):
            takeovers.append(await bench.takeover())
            say(f"takeover: {takeovers[-1]}")
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "rounds": rounds, "lease_ttl": LEASE_TTL,
        "start_ms": {"lease": med(samples["start_lease"]) * 1000,
                     "no_lease": med(samples["start_plain"]) * 1000},
        "stop_ms": {"lease": med(samples["stop_lease"]) * 1000,
                    "no_lease": med(samples["stop_plain"]) * 1000},
        "handover_ms": med(samples["handover"]) * 1000,
        "restart_ms": med(samples["restart"]) * 1000,
        "takeover": {k: med([t[k] for t in takeovers]) for k in takeovers[0]},
        # Both sides run back to back in each round: the median of the per-round ratios is
        # what the load on a shared machine blurs least (as bench/run.py's verdict).
        "paired_ratio": {"start": paired(samples["start_lease"], samples["start_plain"]),
                         "stop": paired(samples["stop_lease"], samples["stop_plain"]),
                         "handover": paired(samples["handover"], samples["restart"])},
        "samples": samples, "takeovers": takeovers,
    }
    return result


def report(result: dict[str, Any]) -> str:
    s, t = result["start_ms"], result["stop_ms"]
    tk, pr = result["takeover"], result["paired_ratio"]
    return "\n".join([
        f"cross-machine bench, {result['rounds']} rounds, lease_ttl={result['lease_ttl']:g} s "
        f"(medians; paired: the median of the per-round ratios)",
        "| operation | with lease | without | ratio | paired ratio |",
        "|---|---:|---:|---:|---:|",
        f"| start to ready | {s['lease']:.0f} ms | {s['no_lease']:.0f} ms | "
        f"{s['lease'] / s['no_lease']:.2f} | {pr['start']:.2f} |",
        f"| stop | {t['lease']:.0f} ms | {t['no_lease']:.0f} ms | "
        f"{t['lease'] / t['no_lease']:.2f} | {pr['stop']:.2f} |",
        f"| clean hand-over (B's start) vs restart of A | {result['handover_ms']:.0f} ms | "
        f"{result['restart_ms']:.0f} ms | "
        f"{result['handover_ms'] / result['restart_ms']:.2f} | {pr['handover']:.2f} |",
        "", f"unclean takeover: {tk['total_s']:.1f} s to ready = lease wait "
            f"{tk['lease_wait_s']:.1f} s + restore to the watermark {tk['restore_s']:.2f} s; "
            f"writes lost: {tk['lost_s']:.1f} s"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    outcome = asyncio.run(main(args.rounds))
    text = report(outcome)
    print(text)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{stamp}-cross-machine.json").write_text(json.dumps(outcome, indent=1))
    (HERE / "results" / f"{stamp}-cross-machine.md").write_text(text + "\n")
