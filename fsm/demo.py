"""`make demo`: a local-mode walk through start, write, checkpoint, change, restore, stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path

from .config import Config
from .controller import JuiceFS
from .logs import configure
from .transitions import Transition


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _show_transition(t: Transition) -> None:
    print(f"    [chart] {t.source} -> {t.target}  ({t.event}, {t.duration_ms:.0f} ms)", flush=True)


async def walk(base_dir: Path) -> None:
    cfg = Config(base_dir=base_dir, local_mode=True, volume_name="demo-volume")
    jfs = JuiceFS(cfg)
    jfs.add_observer(_show_transition)

    _say("start(): restore metadata, format, replicate (litestream), mount at "
         f"{cfg.layout.mount_point}")
    started = time.monotonic()
    await jfs.start()
    print(f"    ready in {(time.monotonic() - started) * 1000:.0f} ms; state={jfs.state}")
    try:
        _say(f"write two files into {jfs.active_dir}")
        (jfs.active_dir / "hello.txt").write_text("hello, version 1\n")
        (jfs.active_dir / "notes").mkdir()
        (jfs.active_dir / "notes" / "todo.md").write_text("- try juicefs-fsm\n")

        _say("checkpoint('first'): juicefs clone --preserve, then the sync -wait barrier")
        cp = await jfs.checkpoint("first")
        print(f"    checkpoint {cp.id} at {cp.path} ({cp.created_at:%H:%M:%S})")

        _say("change the tree: overwrite hello.txt, delete notes/")
        (jfs.active_dir / "hello.txt").write_text("hello, version 2 (a mistake)\n")
        shutil.rmtree(jfs.active_dir / "notes")
        print(f"    hello.txt now says: {(jfs.active_dir / 'hello.txt').read_text().strip()!r}")

        _say("restore('first'): the current tree is kept as a pre-restore checkpoint")
        kept = await jfs.restore("first")
        print(f"    hello.txt says again: {(jfs.active_dir / 'hello.txt').read_text().strip()!r}")
        print(f"    notes/todo.md is back: {(jfs.active_dir / 'notes' / 'todo.md').exists()}")
        print(f"    the replaced tree is kept as checkpoint {kept.id!r}")
        ids = [c.id for c in await jfs.list_checkpoints()]
        print(f"    checkpoints: {ids}")
    finally:
        _say("stop(): juicefs umount --flush, then litestream's final sync")
        await jfs.stop()
    print(f"    state={jfs.state}; nothing is mounted at {cfg.layout.mount_point}")


def command(args: argparse.Namespace) -> int:
    # The narrative goes to stdout; only warnings and errors from the controller are logged.
    configure("console", level=logging.WARNING)
    if args.base_dir:
        asyncio.run(walk(Path(args.base_dir)))
        return 0
    with tempfile.TemporaryDirectory(prefix="juicefs-fsm-demo-") as tmp:
        asyncio.run(walk(Path(tmp) / "volume"))
    return 0
