"""Benchmark: juicefs-fsm (the Python API, local mode) against the bare command sequence it
replaces (bench/bare.sh: the same juicefs/litestream commands with the same flags).

In one run, per round and alternating which side goes first, it measures:
cold start to ready, warm start to ready, stop, and checkpoint and restore of a tree of 1k, 10k
and 100k files (each checkpoint/restore includes the `litestream sync -wait` durability barrier,
on both sides). Then the daemon (`juicefs-fsm run --local`) idle for 60 s: CPU and RSS; and the
latency of `juicefs-fsm status`. Raw samples go to bench/results/<stamp>-<mode>.json, the
tables to bench/results/<stamp>-<mode>.md (and stdout), the plot to
bench/checkpoint_vs_files.png. BENCHMARKS.md explains the method and the results.

    .venv/bin/python bench/run.py               # the full run (~12 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick       # ~2.5 minutes: 3 rounds (1 at 100k), 10 s idle
    .venv/bin/python bench/run.py --rounds 25 --big-rounds 9
    .venv/bin/python bench/run.py --replot bench/results/<stamp>-full.json

Needs root and /dev/fuse (real FUSE mounts), like the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit_config import emit  # the helper beside this script

from fsm import Config, JuiceFS
from fsm.juicefs import is_juicefs_mount
from fsm.logs import configure

HERE = Path(__file__).resolve().parent
VOLUME = "bench-volume"
SEED_DIRS, SEED_FILES = 10, 100  # the 1k seed tree: 10 directories of 100 files
SIZES = (1_000, 10_000, 100_000)
# Targets from issue 6: controller/bare.
TARGET = {"checkpoint": 1.05, "restore": 1.05}
DEFAULT_TARGET = 1.2

Side = str  # "controller" | "bare"


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def juicefs_bin() -> str:
    return str(Config(base_dir="/nonexistent", local_mode=True).juicefs_bin)


# ---- the bare side: bench/bare.sh as a long-lived server --------------------------------------


class Bare:
    """bench/bare.sh serve: its background children stay children of that bash, and it times
    each operation itself (EPOCHREALTIME), so the bare numbers carry no Python overhead."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def open(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "bash", str(HERE / "bare.sh"), "serve", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, start_new_session=True)

    async def call(self, op: str, base: Path, arg: str = "") -> float:
        """Seconds the operation took, measured inside bash."""
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{op} {base} {arg}\n".encode())
        await self.proc.stdin.drain()
        answer = (await self.proc.stdout.readline()).decode().strip()
        if not answer.startswith("ok "):
            raise RuntimeError(f"bare.sh {op} {base} {arg}: {answer or 'no answer'}")
        return int(answer.split()[1]) / 1e6

    async def close(self) -> None:
        if self.proc and self.proc.stdin and self.proc.returncode is None:
            self.proc.stdin.write(b"quit\n")
            await self.proc.stdin.drain()
            self.proc.stdin.close()
            await self.proc.wait()


# ---- helpers ----------------------------------------------------------------------------------


async def timed(step: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await step()
    return time.perf_counter() - started


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def config(base: Path) -> Config:
    return Config(base_dir=base, local_mode=True, volume_name=VOLUME)


def unmount_leftover(base: Path) -> None:
    mp = base / "data"
    if is_juicefs_mount(mp) or os.path.ismount(mp):
        subprocess.run(["umount", "-l", str(mp)], check=False)


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median_ms": ms(statistics.median(samples)), "min_ms": ms(min(samples)),
            "max_ms": ms(max(samples)), "n": len(samples),
            "samples_ms": [ms(s) for s in samples]}


class Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, dict[Side, list[float]]] = {}
        self.stages: dict[str, dict[str, list[float]]] = {}
        self.own: dict[str, list[float]] = {}  # the controller's own seconds per operation

    def add(self, metric: str, side: Side, seconds: float) -> None:
        self.samples.setdefault(metric, {"controller": [], "bare": []})[side].append(seconds)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric, sides in self.samples.items():
            ctl, bare = sides["controller"], sides["bare"]
            if not ctl or not bare:
                continue
            paired = [c / b for c, b in zip(ctl, bare, strict=False) if b > 0]
            out[metric] = {"controller": summary(ctl), "bare": summary(bare),
                           "ratio": round(statistics.median(ctl) / statistics.median(bare), 3),
                           "paired_ratio_median": round(statistics.median(paired), 3),
                           "target": target_of(metric)}
        return out


def target_of(metric: str) -> float:
    return TARGET.get(metric.split()[0], DEFAULT_TARGET)


def ordered(round_no: int) -> tuple[Side, Side]:
    """A/B, then B/A: whoever goes first alternates, so drift and warm-up hit both sides."""
    return ("controller", "bare") if round_no % 2 == 0 else ("bare", "controller")


# ---- 1. start and stop ------------------------------------------------------------------------


async def bench_start_stop(rec: Recorder, bare: Bare, work: Path, rounds: int) -> None:
    for r in range(rounds):
        for side in ordered(r):
            base = work / f"{side}-start-{r}"
            try:
                if side == "controller":
                    await controller_cycle(rec, base)
                else:
                    await bare_cycle(rec, bare, base)
            finally:
                unmount_leftover(base)
            shutil.rmtree(base, ignore_errors=True)
        say(f"  start/stop round {r + 1}/{rounds}: " + ", ".join(
            f"{m} {ms(s['controller'][-1]):.0f}/{ms(s['bare'][-1]):.0f} ms"
            for m, s in rec.samples.items() if m in ("cold start", "warm start", "stop")))


async def controller_cycle(rec: Recorder, base: Path) -> None:
    cfg = config(base)
    for kind in ("cold start", "warm start"):
        jfs = JuiceFS(cfg)
        try:
            rec.add(kind, "controller", await timed(jfs.start))
        finally:
            rec.add("stop", "controller", await timed(jfs.stop))
        for t in jfs.history:  # where the controller's time goes, state by state
            rec.stages.setdefault(kind, {}).setdefault(t.source, []).append(t.duration_ms)


async def bare_cycle(rec: Recorder, bare: Bare, base: Path) -> None:
    emit(base, VOLUME)  # untimed: a shell script's config file already exists
    for kind in ("cold start", "warm start"):
        rec.add(kind, "bare", await bare.call("start", base))
        rec.add("stop", "bare", await bare.call("stop", base))


# ---- 2. checkpoint and restore against trees of 1k, 10k, 100k files ---------------------------


def write_seed(root: Path) -> None:
    """1k small files (100 bytes each) written through FUSE."""
    for d in range(SEED_DIRS):
        sub = root / f"d{d:02d}"
        sub.mkdir(parents=True)
        for f in range(SEED_FILES):
            (sub / f"f{f:03d}").write_bytes(b"x" * 100)


def grow(active_fs: Path, size: int, have: int) -> int:
    """Make active/fs hold `size` files: g0/s0 is the 1k seed; g0/s1..s9 are clones of it
    (10k); g1..g9 are clones of g0 (100k). Cloning is metadata-only, so 100k takes seconds."""
    jfs = juicefs_bin()
    if have < 1_000 <= size:
        write_seed(active_fs / "g0" / "s0")
        sh(jfs, "clone", str(active_fs / "g0" / "s0"), str(active_fs / ".seed"))  # flushed
        sh(jfs, "rmr", "--skip-trash", str(active_fs / ".seed"))
        have = 1_000
    if have < 10_000 <= size:
        for i in range(1, 10):
            sh(jfs, "clone", str(active_fs / "g0" / "s0"), str(active_fs / "g0" / f"s{i}"))
        have = 10_000
    if have < 100_000 <= size:
        for i in range(1, 10):
            sh(jfs, "clone", str(active_fs / "g0"), str(active_fs / f"g{i}"))
        have = 100_000
    return have


def clean_checkpoints(base: Path) -> None:
    """Untimed clean-up between rounds, the same on both sides: remove the checkpoint and the
    pre-restore tree (skipping the trash, so the db does not keep growing), then sync."""
    cfg = config(base)
    lay = cfg.layout
    victims = [str(p) for p in lay.checkpoints_dir.iterdir()]
    if victims:
        sh(str(cfg.juicefs_bin), "rmr", "--skip-trash", *victims)
    sync_replica(base)


def sync_replica(base: Path) -> None:
    cfg = config(base)
    lay = cfg.layout
    sh(str(cfg.litestream_bin), "sync", "-wait", "-timeout", "120", "-socket",
       str(lay.litestream_socket), str(lay.metadata_db))


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


async def bench_trees(rec: Recorder, bare: Bare, work: Path, sizes: list[int],
                      rounds: dict[int, int]) -> dict[str, Any]:
    ctl_base, bare_base = work / "controller-tree", work / "bare-tree"
    jfs = JuiceFS(config(ctl_base))
    time_tools(jfs)
    emit(bare_base, VOLUME)
    extra: dict[str, Any] = {}
    bare_up = False
    try:
        await jfs.start()
        await bare.call("start", bare_base)
        bare_up = True
        tools = tree_of([p for p in jfs.pids.values() if p] + [
            int((bare_base / f"{n}.pid").read_text()) for n in ("mount", "litestream")])
        have = {"controller": 0, "bare": 0}
        for size in sizes:
            started = time.monotonic()
            for side, base in (("controller", ctl_base), ("bare", bare_base)):
                have[side] = await asyncio.to_thread(
                    grow, base / "data" / "active" / "fs", size, have[side])
                await asyncio.to_thread(sync_replica, base)
            await settle(tools)  # the first round's first side must not pay for the growth
            say(f"  tree of {size} files built on both volumes in "
                f"{time.monotonic() - started:.1f} s")
            for r in range(rounds[size]):
                for side in ordered(r):
                    await tree_round(rec, side, jfs, bare, bare_base, size, f"b{size}-{r}")
                    await settle(tools)
                label = f"{size // 1000}k"
                say(f"  {size} files round {r + 1}/{rounds[size]}: " + ", ".join(
                    f"{op} {ms(rec.samples[f'{op} {label}']['controller'][-1]):.0f}/"
                    f"{ms(rec.samples[f'{op} {label}']['bare'][-1]):.0f} ms"
                    for op in ("checkpoint", "restore")))
        extra["files_checked"] = {
            "controller": await asyncio.to_thread(count_files, jfs.active_dir),
            "bare": await asyncio.to_thread(count_files, bare_base / "data" / "active" / "fs")}
        extra["stop_with_tree_ms"] = {"files": max(sizes),
                                      "controller": ms(await timed(jfs.stop)),
                                      "bare": ms(await bare.call("stop", bare_base))}
        bare_up = False
    finally:
        await jfs.stop()
        if bare_up:
            with contextlib.suppress(RuntimeError):
                await bare.call("stop", bare_base)
        unmount_leftover(ctl_base)
        unmount_leftover(bare_base)
    return extra


async def settle(pids: list[int], limit: float = 15.0) -> float:
    """Wait until both volumes' juicefs and litestream are quiet (under 10% of a CPU over
    250 ms), so the background work a clean-up leaves (deleting 200k entries, litestream
    shipping the WAL) does not land in the other side's next measurement."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(0.25)
        if sum(cpu_seconds(p) for p in pids) - before < 0.025:
            break
    return time.monotonic() - started


# Seconds the controller spent waiting for `juicefs clone` and `litestream sync`, per controller:
# an operation's time minus these is the controller's own cost, which the load on a shared
# machine cannot blur the way it blurs the controller/bare ratio.
TOOL_TIME: dict[JuiceFS, float] = {}


def time_tools(jfs: JuiceFS) -> None:
    def timing(step: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed_step(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await step(*args, **kwargs)
            finally:
                TOOL_TIME[jfs] = TOOL_TIME.get(jfs, 0.0) + time.perf_counter() - started
        return timed_step

    jfs.juicefs.clone = timing(jfs.juicefs.clone)  # type: ignore[method-assign]
    jfs.litestream.sync = timing(jfs.litestream.sync)  # type: ignore[method-assign]


async def tree_round(rec: Recorder, side: Side, jfs: JuiceFS, bare: Bare, bare_base: Path,
                     size: int, cp: str) -> None:
    if side == "controller":
        for op, call in (("checkpoint", jfs.checkpoint), ("restore", jfs.restore)):
            in_tools = TOOL_TIME.pop(jfs, 0.0)
            took = await timed(lambda call=call: call(cp))
            rec.add(f"{op} {size // 1000}k", side, took)
            rec.own.setdefault(f"{op} {size // 1000}k", []).append(
                took - (TOOL_TIME.pop(jfs, 0.0) - in_tools))
        await asyncio.to_thread(clean_checkpoints, Path(jfs.config.base_dir))
        return
    else:
        cp_s = await bare.call("checkpoint", bare_base, cp)
        rs_s = await bare.call("restore", bare_base, cp)
        base = bare_base
    await asyncio.to_thread(clean_checkpoints, base)
    rec.add(f"checkpoint {size // 1000}k", side, cp_s)
    rec.add(f"restore {size // 1000}k", side, rs_s)


# ---- 3. the daemon idle, and `juicefs-fsm status` ---------------------------------------------

def children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_of(pids: list[int]) -> list[int]:
    kids, out, todo = children_of(), [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads, in ns resolution (schedstat), where /proc/PID/stat
    counts 10 ms ticks, too coarse for an idle minute."""
    total = 0
    with contextlib.suppress(OSError):  # an exited process or thread counts no more
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fsm_cli() -> list[str]:
    script = Path(sys.executable).parent / "juicefs-fsm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fsm"]


# Used when `juicefs-fsm run` is not usable: the same controller, idle in a Python process.
_IDLE_PY = """
import asyncio, sys
from fsm import Config, JuiceFS
async def main():
    async with JuiceFS(Config(base_dir=sys.argv[1], local_mode=True,
                              volume_name=sys.argv[2])) as jfs:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)
asyncio.run(main())
"""


async def wait_daemon_ready(base: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    from fsm.control import call

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # not up yet: any failure means "ask again"
            status = await asyncio.to_thread(call, base, "status", timeout=2)
            if status.get("state") == "ready":
                return True
        await asyncio.sleep(0.05)
    return False


async def bench_idle(bare: Bare, work: Path, seconds: float, status_calls: int) -> dict[str, Any]:
    base, bare_base = work / "daemon", work / "bare-idle"
    out: dict[str, Any] = {"seconds": seconds}
    log = (work / "daemon.log").open("wb")
    argv = [*fsm_cli(), "run", "--local", "--base-dir", str(base), "--volume-name", VOLUME]
    proc = spawn(argv, log, stdout=log)
    kind = "daemon"
    emit(bare_base, VOLUME)
    bare_up = False
    try:
        if not await wait_daemon_ready(base, proc, 30):
            say("  `juicefs-fsm run` did not become ready; measuring an idle JuiceFS in a "
                "Python process instead (see work dir daemon.log)")
            out["daemon_error"] = (work / "daemon.log").read_text()[-2000:]
            stop_process(proc)
            kind = "python-process"
            proc = spawn([sys.executable, "-c", _IDLE_PY, str(base), VOLUME], log,
                         stdout=subprocess.PIPE)
            assert proc.stdout
            if (await asyncio.to_thread(proc.stdout.readline)).strip() != b"ready":
                raise RuntimeError("the idle controller process did not start")
        out["measured"] = kind
        await bare.call("start", bare_base)
        bare_up = True
        await asyncio.sleep(2)  # let start-up work (version probes, first syncs) finish
        out.update(await sample_idle(proc.pid, bare_base, seconds))
        if kind == "daemon":
            out["status"] = await bench_status(base, status_calls)
    finally:
        stop_process(proc)
        if bare_up:
            await bare.call("stop", bare_base)
        unmount_leftover(base)
        unmount_leftover(bare_base)
        log.close()
    out["daemon_exit_code"] = proc.returncode
    return out


def spawn(argv: list[str], log: Any, stdout: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=stdout, stderr=log, stdin=subprocess.PIPE,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def sample_idle(daemon_pid: int, bare_base: Path, seconds: float) -> dict[str, Any]:
    daemon_tools = [p for p in tree_of([daemon_pid]) if p != daemon_pid]
    bare_tools = tree_of([int((bare_base / f"{n}.pid").read_text())
                          for n in ("mount", "litestream")])
    groups = {"daemon_process": [daemon_pid], "daemon_tools": daemon_tools,
              "bare_tools": bare_tools}
    before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    rss_max = dict.fromkeys(groups, 0)
    rss_last = dict.fromkeys(groups, 0)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for g, pids in groups.items():
            rss_last[g] = sum(rss_kib(p) for p in pids)
            rss_max[g] = max(rss_max[g], rss_last[g])
        await asyncio.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - started))))
    elapsed = time.monotonic() - started
    after = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    return {"elapsed_s": round(elapsed, 2), "pids": groups, "groups": {
        g: {"cpu_percent": round((after[g] - before[g]) / elapsed * 100, 4),
            "cpu_seconds": round(after[g] - before[g], 4),
            "rss_mib": round(rss_last[g] / 1024, 1), "rss_max_mib": round(rss_max[g] / 1024, 1)}
        for g in groups}}


async def bench_status(base: Path, calls: int) -> dict[str, Any]:
    from fsm.control import call

    def wall(argv: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    def socket_call() -> float:
        started = time.perf_counter()
        call(base, "status", timeout=5)
        return time.perf_counter() - started

    cli = [*fsm_cli(), "status", "--base-dir", str(base), "--json"]
    out = {"cli_json": [], "cli_text": [], "socket": [], "python_startup": []}
    for _ in range(calls):  # interleaved, like everything else
        out["cli_json"].append(await asyncio.to_thread(wall, cli))
        out["cli_text"].append(await asyncio.to_thread(wall, cli[:-1]))
        out["socket"].append(await asyncio.to_thread(socket_call))
        out["python_startup"].append(await asyncio.to_thread(wall, [sys.executable, "-c", "0"]))
    return {k: summary(v) for k, v in out.items()}


# ---- report -----------------------------------------------------------------------------------

ORDER = ["cold start", "warm start", "stop", *(f"{op} {n // 1000}k" for op in
                                                ("checkpoint", "restore") for n in SIZES)]


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [f"Run {res['started_at']} ({res['mode']}), {env['cpus']} CPUs, load average "
             f"before {env['load_before']} / after {env['load_after']}, juicefs "
             f"{env['juicefs']}, litestream {env['litestream']}, commit {env['commit']}.", "",
             "| operation | controller median (ms) | bare median (ms) | ratio of medians | "
             "paired ratio | target | met (paired) | rounds |",
             "|---|---:|---:|---:|---:|---:|:-:|---:|"]
    metrics = res["metrics"]
    for name in [m for m in ORDER if m in metrics]:
        m = metrics[name]
        met = "yes" if m["paired_ratio_median"] <= m["target"] else "**no**"
        lines.append(f"| {name} | {m['controller']['median_ms']:.1f} | "
                     f"{m['bare']['median_ms']:.1f} | {m['ratio']:.2f} | "
                     f"{m['paired_ratio_median']:.2f} | <= {m['target']} | "
                     f"{met} | {m['controller']['n']} |")
    lines += ["", "Ratios are controller/bare. The verdict uses the paired ratio: the median over "
              "rounds of controller/bare within a round (both sides run back to back in each "
              "round, alternating which goes first)."]
    own = res.get("controller_own_ms") or {}
    if own:
        lines += ["", "The controller's own time per operation: its time minus the time it spent "
                  "waiting for `juicefs clone` and `litestream sync -wait` (the same commands "
                  "the bare side runs):", "", "| operation | median ms | max ms | % of the "
                  "operation |", "|---|---:|---:|---:|"]
        for name in [m for m in ORDER if m in own]:
            o = own[name]
            lines.append(f"| {name} | {o['median_ms']:.2f} | {o['max_ms']:.2f} | "
                         f"{o['percent_of_median_op']:.2f}% |")
    costs = res.get("per_file_us") or {}
    if costs:
        lines += ["", "Cost per file in microseconds, controller / bare: the average (median time"
                  " / files) and the marginal cost of the files added since the previous size:",
                  "", "| files | checkpoint average | checkpoint marginal | restore average | "
                  "restore marginal |", "|---:|---:|---:|---:|---:|"]

        def cell(op: dict[str, Any], kind: str) -> str:
            c, b = op["controller"][kind], op["bare"][kind]
            return "-" if c is None else f"{c:.1f} / {b:.1f}"

        for n, row in costs.items():
            lines.append(f"| {int(n):,} | {cell(row['checkpoint'], 'average')} | "
                         f"{cell(row['checkpoint'], 'marginal')} | "
                         f"{cell(row['restore'], 'average')} | "
                         f"{cell(row['restore'], 'marginal')} |")
    trees = res.get("trees") or {}
    if "stop_with_tree_ms" in trees:
        st = trees["stop_with_tree_ms"]
        lines += ["", f"Stop with the {st['files']:,}-file tree mounted (one sample each): "
                  f"controller {st['controller']:.0f} ms, bare {st['bare']:.0f} ms."]
    idle = res.get("idle")
    if idle:
        g = idle["groups"]
        lines += ["", f"Idle for {idle['elapsed_s']} s ({idle['measured']}): CPU and RSS", "",
                  "| process(es) | CPU % | CPU s | RSS MiB (end / max) |", "|---|---:|---:|---:|"]
        what = "daemon" if idle["measured"] == "daemon" else "idle Python process"
        names = {"daemon_process": f"juicefs-fsm {what} (Python)",
                 "daemon_tools": "its juicefs + litestream", "bare_tools":
                 "bare juicefs + litestream (no controller)"}
        for key, label in names.items():
            lines.append(f"| {label} | {g[key]['cpu_percent']:.3f} | {g[key]['cpu_seconds']:.3f}"
                         f" | {g[key]['rss_mib']:.1f} / {g[key]['rss_max_mib']:.1f} |")
        st = idle.get("status")
        if st:
            lines += ["", "`juicefs-fsm status` latency (median of "
                      f"{st['cli_json']['n']} calls):", "",
                      "| call | median ms | min ms | max ms |", "|---|---:|---:|---:|"]
            for key, label in (("cli_text", "`juicefs-fsm status` (new process)"),
                               ("cli_json", "`juicefs-fsm status --json` (new process)"),
                               ("socket", "the status request on fsm.sock (fsm.control.call)"),
                               ("python_startup", "reference: `python -c 0`")):
                lines.append(f"| {label} | {st[key]['median_ms']:.1f} | {st[key]['min_ms']:.1f}"
                             f" | {st[key]['max_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def per_file(metrics: dict[str, Any]) -> dict[str, Any]:
    """Microseconds per file: the average (median time / files) and the marginal cost of the
    files added since the previous size (what one more file costs as the tree grows)."""
    out: dict[str, Any] = {}
    prev: int | None = None
    for n in SIZES:
        if f"checkpoint {n // 1000}k" not in metrics:
            continue

        def median(op: str, size: int, side: str) -> float:
            return float(metrics[f"{op} {size // 1000}k"][side]["median_ms"])

        out[str(n)] = {op: {side: {
            "average": round(median(op, n, side) * 1000 / n, 1),
            "marginal": None if prev is None else round(
                (median(op, n, side) - median(op, prev, side)) * 1000 / (n - prev), 1)}
            for side in ("controller", "bare")} for op in ("checkpoint", "restore")}
        prev = n
    return out


def plot(res: dict[str, Any], path: Path) -> bool:
    metrics = res["metrics"]
    sizes = [n for n in SIZES if f"checkpoint {n // 1000}k" in metrics]
    if len(sizes) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for op, style in (("checkpoint", "-"), ("restore", "--")):
        for side, color in (("controller", "tab:blue"), ("bare", "tab:orange")):
            ys = [metrics[f"{op} {n // 1000}k"][side]["median_ms"] for n in sizes]
            ax.plot(sizes, ys, style, marker="o", color=color, label=f"{op}: {side} (median)")
            if op == "checkpoint":  # every round, slightly apart so both sides show
                shift = 0.97 if side == "controller" else 1.03
                for n in sizes:
                    samples = metrics[f"{op} {n // 1000}k"][side]["samples_ms"]
                    ax.plot([n * shift] * len(samples), samples, ".", color=color, alpha=0.35)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("files in the active tree")
    ax.set_ylabel("median time (ms), incl. litestream sync -wait")
    ax.set_title(f"Checkpoint and restore time vs files ({res['started_at'][:10]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---- main -------------------------------------------------------------------------------------


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[-1] if done.returncode == 0 else "?"


def environment(load_before: tuple[float, ...]) -> dict[str, Any]:
    cfg = Config(base_dir="/nonexistent", local_mode=True)
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "fsm"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True,
                                     check=False).stdout.strip(),
            "juicefs": tool_version([str(cfg.juicefs_bin), "--version"]).replace(
                "juicefs version ", ""),
            "litestream": tool_version([str(cfg.litestream_bin), "version"]),
            "commit": commit + ("+uncommitted fsm changes" if dirty else "")}


def tree_rounds(args: argparse.Namespace, size: int) -> int:
    """1k rounds are cheap and their times bimodal (inside `juicefs clone`): 3x the rounds."""
    return {1_000: 3 * args.rounds, 10_000: args.rounds}.get(size, args.big_rounds)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fsm-bench-", dir=args.workdir))
    log_file = (work / "controller.log").open("w")
    configure("json", logging.INFO, stream=log_file)  # the daemon's production logging
    say(f"work dir {work}")
    rec = Recorder()
    bare = Bare()
    await bare.open()
    load_before = os.getloadavg()
    res: dict[str, Any] = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "mode": "quick" if args.quick else (
                               "full" if args.parts == {"start", "trees", "idle"}
                               and args.sizes == list(SIZES) else "partial"),
                           "rounds": {"start_stop": args.rounds, "trees": {
                               str(n): tree_rounds(args, n) for n in args.sizes}}}
    try:
        if "start" in args.parts:
            say(f"1/3 cold start, warm start, stop: {args.rounds} rounds")
            await bench_start_stop(rec, bare, work, args.rounds)
        if "trees" in args.parts:
            say(f"2/3 checkpoint and restore at {args.sizes} files")
            res["trees"] = await bench_trees(rec, bare, work, args.sizes, {
                n: tree_rounds(args, n) for n in args.sizes})
        if "idle" in args.parts and args.idle_seconds > 0:
            say(f"3/3 idle daemon for {args.idle_seconds:g} s, then `juicefs-fsm status` "
                f"x{args.status_calls}")
            res["idle"] = await bench_idle(bare, work, args.idle_seconds, args.status_calls)
    finally:
        await bare.close()
        log_file.close()
    res["environment"] = environment(load_before)
    res["metrics"] = rec.result()
    res["per_file_us"] = per_file(res["metrics"])
    res["controller_own_ms"] = {
        metric: {"median_ms": ms(statistics.median(v)), "max_ms": ms(max(v)),
                 "percent_of_median_op": round(100 * statistics.median(v) / statistics.median(
                     rec.samples[metric]["controller"]), 2)}
        for metric, v in rec.own.items()}
    res["controller_stages_ms"] = {
        kind: {state: round(statistics.median(v), 1) for state, v in states.items()}
        for kind, states in rec.stages.items()}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="3 rounds (1 at 100k files), 10 s idle, 10 status calls (~2.5 min)")
    p.add_argument("--rounds", type=int, help="rounds of start/stop and of 10k checkpoints; "
                                              "1k gets 3x (default 15; 3 with --quick)")
    p.add_argument("--big-rounds", type=int, help="rounds at 100k files (default 7; 1 quick)")
    p.add_argument("--sizes", help="comma-separated file counts among 1000,10000,100000")
    p.add_argument("--idle-seconds", type=float, help="daemon idle window (default 60; 10 quick)")
    p.add_argument("--status-calls", type=int, help="juicefs-fsm status calls (default 30)")
    p.add_argument("--parts", default="start,trees,idle",
                   help="what to run, comma-separated (default: start,trees,idle)")
    p.add_argument("--workdir", help="where to make the volumes (default: the system temp dir)")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, volumes)")
    p.add_argument("--replot", metavar="RESULTS_JSON",
                   help="only redraw bench/checkpoint_vs_files.png and the table from a result")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 15)
    args.big_rounds = args.big_rounds or (1 if quick else 7)
    sizes = args.sizes or "1000,10000,100000"
    args.sizes = sorted(int(s) for s in sizes.split(","))
    if any(n not in SIZES for n in args.sizes):
        p.error(f"--sizes: choose among {','.join(map(str, SIZES))}")
    args.idle_seconds = args.idle_seconds if args.idle_seconds is not None else (
        10 if quick else 60)
    args.status_calls = args.status_calls or (10 if quick else 30)
    args.parts = set(args.parts.split(","))
    if not args.parts <= {"start", "trees", "idle"}:
        p.error("--parts: choose among start, trees, idle")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        res = json.loads(Path(args.replot).read_text())
        res["per_file_us"] = per_file(res["metrics"])
    else:
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            say("the benchmark needs root and /dev/fuse (it makes real FUSE mounts)")
            return 2
        started = time.monotonic()
        res = asyncio.run(run(args))
        res["duration_s"] = round(time.monotonic() - started, 1)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = res["started_at"].replace(":", "").replace("+0000", "Z")
        stem = out / f"{stamp}-{res['mode']}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(res))
        say(f"raw results: {stem.with_suffix('.json')}\ntable: {stem.with_suffix('.md')}")
    if plot(res, HERE / "checkpoint_vs_files.png"):
        say(f"plot: {HERE / 'checkpoint_vs_files.png'}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
