"""Owned child processes: spawned, their output forwarded as events, awaited and reaped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import install_hint
from .errors import MissingPrerequisite, ToolError
from .logs import ms_since

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LEVEL = re.compile(r"<(DEBUG|INFO|WARNING|ERROR|FATAL)>|level=(DEBUG|INFO|WARN|ERROR)")
_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warning", "WARN": "warning",
           "ERROR": "error", "FATAL": "error"}

# Warnings juicefs prints on every run that ask nothing of anyone: storage tiers are an S3
# storage-class feature other stores lack, PR_SET_IO_FLUSHER needs a capability containers
# seldom grant, and metadata backup is off on purpose (`--backup-meta 0`: Litestream keeps the
# metadata). Kept at debug so that the warnings left mean something.
BENIGN = ("Set storage tier: not supported",
          "CAP_SYS_RESOURCE is needed for PR_SET_IO_FLUSHER",
          "Metadata backup is disabled")
# juicefs times its first query of the metadata engine and warns above 10 ms: worth knowing for
# a database across a network, noise for a local SQLite file on a busy machine.
BENIGN_WITH_SQLITE = ("The latency to database is too high",)

LineHook = Callable[[str], None]


def line_level(line: str, benign: Iterable[str] = BENIGN) -> str:
    """The log level of a child's output line: its own warning or error level, else debug
    (the children's progress chatter is for --log-level debug)."""
    match = _LEVEL.search(line)
    level = _LEVELS[next(g for g in match.groups() if g)] if match else "debug"
    if level in ("warning", "error") and not any(known in line for known in benign):
        return level
    return "debug"


def clean_line(raw: bytes) -> str:
    return ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class Child:
    """One long-running child. Output lines become `child_output` events; the stderr tail is kept
    for error messages. Started in its own session so a terminal's Ctrl-C reaches only us, and
    we decide the order in which children stop."""

    def __init__(self, tool: str, argv: list[str], *, env: Mapping[str, str], log: Any,
                 secrets: Iterable[str] = (), on_line: LineHook | None = None,
                 capture_stdout: bool = False) -> None:
        self.tool = tool
        self.argv = argv
        self._env = dict(env)
        self._log = log
        self._secrets = tuple(secrets)
        self._on_line = on_line
        self._tail: deque[str] = deque(maxlen=40)
        self._capture_stdout = capture_stdout
        self.stdout_lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []
        sqlite = any(arg.startswith("sqlite3://") for arg in argv)
        self._benign = BENIGN + (BENIGN_WITH_SQLITE if sqlite else ())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def stderr_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._tail)[-lines:])

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self._env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except (FileNotFoundError, PermissionError) as exc:
            raise MissingPrerequisite(
                f"cannot run {self.tool}: {self.argv[0]} {_why(exc)}; "
                f"{install_hint(self.tool)}") from exc
        assert self._proc.stdout and self._proc.stderr
        self._pumps = [asyncio.create_task(self._pump(self._proc.stdout, "stdout")),
                       asyncio.create_task(self._pump(self._proc.stderr, "stderr"))]
        self._log.debug("child_started", tool=self.tool, pid=self._proc.pid, argv=self.argv)

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while raw := await stream.readline():
            line = redact(clean_line(raw), self._secrets)
            if not line:
                continue
            if name == "stdout" and self._capture_stdout:
                self.stdout_lines.append(line)
            elif name == "stderr":
                self._tail.append(line)
            getattr(self._log, line_level(line, self._benign))(
                "child_output", tool=self.tool, pid=self.pid, stream=name, line=line)
            if self._on_line is not None:
                self._on_line(line)

    async def wait(self) -> int:
        assert self._proc is not None
        rc = await self._proc.wait()
        # Drain the pipes so the stderr tail is complete before anyone reads it.
        await asyncio.gather(*self._pumps, return_exceptions=True)
        return rc

    def signal(self, sig: int) -> None:
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def exits_within(self, timeout: float) -> bool:
        """Wait up to `timeout` for the child to exit (reaped if it did); it is not signalled."""
        try:
            await asyncio.wait_for(asyncio.shield(self.wait()), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def terminate(self, timeout: float) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Always reaps."""
        if self._proc is None:
            return None
        if self.running:
            self.signal(signal.SIGTERM)
            if not await self.exits_within(timeout):
                self._log.warning("child_kill", tool=self.tool, pid=self.pid,
                                  reason=f"no exit {timeout:.0f}s after SIGTERM")
                self.kill_group()
        return await self.wait()

    async def kill(self) -> None:
        self.kill_group()
        if self._proc is not None:
            await self.wait()

    def kill_group(self) -> None:
        """SIGKILL the child and what it forked (the child leads its own process group): the
        FUSE server of `juicefs mount` is the supervisor's child, and would otherwise outlive
        it, holding the output pipes that wait() drains."""
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Completed:
    stdout: str
    stderr: str
    duration_ms: float


async def run(tool: str, action: str, argv: list[str], *, env: Mapping[str, str], log: Any,
              secrets: Iterable[str] = (), timeout: float | None = None) -> Completed:
    """Run a command to completion. Killed and reaped if cancelled or timed out;
    a non-zero exit is a ToolError carrying the stderr tail."""
    started = time.monotonic()
    child = Child(tool, argv, env=env, log=log, secrets=secrets, capture_stdout=True)
    await child.start()
    try:
        rc: int | None = await asyncio.wait_for(child.wait(), timeout)
    except asyncio.TimeoutError:
        await child.kill()
        rc = None
    except asyncio.CancelledError:
        await child.kill()
        raise
    duration_ms = ms_since(started)
    log.debug("command_done", tool=tool, action=action, pid=child.pid, rc=rc,
              duration_ms=duration_ms)
    if rc != 0:
        raise ToolError(tool, action, rc, child.stderr_tail())
    return Completed("\n".join(child.stdout_lines), child.stderr_tail(), duration_ms)


def child_env(extra: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env.update(extra or {})
    return env


def _why(exc: OSError) -> str:
    return "is not executable" if isinstance(exc, PermissionError) else "does not exist"


# ---- processes that are not (or no longer) our children ------------------------------------
# Orphans of a controller that was killed, and children that cannot finish dying.

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name before it may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot): with the pid, an identity that
    survives pid reuse. None when there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """The process exists and is not a zombie (and started at `ticks`, if given)."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in {"Z", "X"}:
        return False
    return ticks is None or start_ticks(pid) == ticks


def stuck_exiting(pid: int) -> bool:
    """Killed, but unable to finish exiting: the main thread is a zombie while another thread
    is still there (e.g. waiting, uninterruptibly, for a FUSE answer that will never come)."""
    fields = _stat_fields(pid)
    if not fields or fields[0] != "Z":
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def executable(pid: int) -> str:
    """The file name of /proc/<pid>/exe ("" if unreadable); ' (deleted)' is dropped."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


async def end_process(pid: int, ticks: int, timeout: float, log: Any, tool: str) -> bool:
    """SIGTERM a process that is not our child (an orphan), SIGKILL after `timeout`. Signals go
    only to the process that started at `ticks` (never to a reused pid). True once it is gone.
    `timeout` 0: SIGKILL at once (a SIGTERM would let litestream make a final upload)."""
    steps = ((signal.SIGTERM, timeout),) if timeout > 0 else ()
    for sig, wait in (*steps, (signal.SIGKILL, 5.0)):
        if not alive(pid, ticks):
            return True
        log.warning("orphan_signalled", tool=tool, pid=pid, signal=signal.Signals(sig).name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid, ticks) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # not our child: /proc is all there is to watch
    return not alive(pid, ticks)


def holders(path: Path, ours: Iterable[int] = (), limit: int = 10) -> list[dict[str, Any]]:
    """Processes keeping `path` busy: a working directory, root or open file below it (what
    `fuser -m` would name). Read from /proc links only, which never ask the filesystem (a
    stat there could hang on a dying FUSE mount). Processes in the groups `ours` (our
    children lead their own: the juicefs mount serving `path` briefly opens files in it) are
    not holders."""
    below = str(path).rstrip("/") + "/"
    skip = set(ours)
    found: list[dict[str, Any]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or _group(int(entry.name)) in skip:
            continue
        if any(t == str(path) or t.startswith(below) for t in _targets(entry.path)):
            found.append({"pid": int(entry.name), "cmd": " ".join(cmdline(int(entry.name)))[:80]})
            if len(found) >= limit:
                break
    return found


def named(found: list[dict[str, Any]], none: str = "another process") -> str:
    """holders() in a message: "pid 4242 (-bash), pid 4250 (cp -a ...)"."""
    return ", ".join(f"pid {h['pid']} ({h['cmd']})" for h in found) or none


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _targets(proc_dir: str) -> Iterable[str]:
    for link in ("cwd", "root"):
        with contextlib.suppress(OSError):
            yield os.readlink(f"{proc_dir}/{link}")
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"{proc_dir}/fd"):
            with contextlib.suppress(OSError):
                yield os.readlink(fd.path)
