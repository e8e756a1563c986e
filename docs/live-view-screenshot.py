"""Regenerate docs/live-view.png: a real local-mode daemon with `--http`, a few operations run
from the CLI, and its page photographed in Debian's chromium (driven by playwright).

    .venv/bin/python docs/live-view-screenshot.py [OUTPUT.png]

Needs what the end-to-end tests need: root, /dev/fuse, /usr/bin/chromium (apt-get install
chromium) and playwright (pip install -e '.[dev]'). Nothing listens beyond 127.0.0.1, and the
daemon is stopped (SIGTERM) before this exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _state(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url + "status", timeout=5) as answer:
            return str(json.load(answer)["state"])
    except OSError:
        return None


def _cli(base_dir: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "fsm", *args, "--base-dir", str(base_dir)],
                   check=True, capture_output=True, timeout=60)


def main() -> int:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "live-view.png"
    with tempfile.TemporaryDirectory(prefix="live-view-") as tmp:
        base_dir = Path(tmp) / "vol"
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FSM_HTTP")}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "fsm", "run", "--local", "--base-dir", str(base_dir),
             "--volume-name", "demo-volume", "--http", f"127.0.0.1:{port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while _state(url) != "ready":
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("the daemon did not become ready", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            active = base_dir / "data" / "active" / "fs"
            (active / "notes.txt").write_text("version 1\n")
            _cli(base_dir, "checkpoint", "before-upgrade")
            (active / "notes.txt").write_text("version 2\n")
            _cli(base_dir, "checkpoint", "nightly")
            _cli(base_dir, "restore", "before-upgrade")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                     args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                page.wait_for_function(
                    "document.querySelectorAll('#checkpoints li[data-id]').length === 3")
                page.screenshot(path=str(output), full_page=True)
                browser.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
