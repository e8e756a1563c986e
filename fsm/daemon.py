"""`juicefs-fsm run`: the foreground daemon an init system (systemd, s6, a container's PID 1)
supervises.

It binds the control socket (refusing to run twice on one base_dir), starts the volume, says
READY=1 over sd_notify, serves control requests, and on SIGTERM/SIGINT/SIGHUP stops gracefully
(flush, unmount, stop litestream). A second signal while stopping hurries the stop: the flush wait
is abandoned, the mount is force-unmounted, and children get 2 s between SIGTERM and SIGKILL. A
third signal abandons a stop that is stuck: children's process groups are SIGKILLed, the mount
point lazily unmounted, and the daemon exits 5.
If the mount dies or litestream cannot be kept running, the volume goes to `failed`, is cleaned
up (lazy unmount of a stale mount, children reaped), and the daemon exits non-zero so the
supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from datetime import datetime, timezone
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from . import early_signals
from .config import Config
from .control import ControlServer
from .controller import JuiceFS
from .errors import ConfigError, ControlError, FsmError, StartError, StopError
from .juicefs import lazy_unmount, mount_fstype, remove_handover_files
from .logs import ms_since
from .sdnotify import Notifier
from .transitions import Transition

if TYPE_CHECKING:
    from .web import WebServer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Exit(IntEnum):
    """The daemon's exit codes (documented in docs/systemd.md)."""

    OK = 0          # stopped on request; flushed, unmounted, nothing left running
    INTERNAL = 1    # a bug: an unexpected exception (traceback on stderr); volume stopped first
    CONFIG = 2      # bad flags/env/TOML, or a missing prerequisite: a restart will not help
    START = 3       # start failed (cleaned up), or another daemon serves this base_dir
    FAILED = 4      # failed while running (mount died, litestream lost); cleaned up
    UNCLEAN = 5     # stop/clean-up left something behind (still mounted, or a child alive)
    FORCED = 6      # stopped on request, but hurried by a second signal: the flush was skipped


class Daemon:
    """One run of the daemon around one JuiceFS controller."""

    def __init__(self, jfs: JuiceFS, notifier: Notifier) -> None:
        self.jfs = jfs
        self.notifier = notifier
        self.log = jfs.log.bind(component="daemon")
        self.control = ControlServer(jfs, extra_status=self._extra_status, log=jfs.log)
        # The live view (--http): the page, /status and /metrics, off unless asked for.
        self.web: WebServer | None = None
        if jfs.config.http:
            from .web import WebServer  # aiohttp is imported only when it is used

            self.web = WebServer(jfs, jfs.config.http, status=self.status, log=jfs.log)
        self.versions: dict[str, str | None] = {"juicefs": None, "litestream": None}
        self._started = time.monotonic()
        self._started_at = datetime.now(timezone.utc)
        self._stop_requested = asyncio.Event()
        self._failed = asyncio.Event()
        self._abandoned = asyncio.Event()
        self._signals = 0

    async def run(self) -> int:
        """Run until stopped or failed; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.jfs.add_observer(self._on_transition)
        self.jfs.add_progress_observer(self._on_progress)
        try:
            # Checked once the loop's handlers are in place, so no signal falls in between.
            early = early_signals.received()
            if early:
                return self._stopped_before_start(signal.Signals(early[0]).name)
            try:
                if self.web is not None:
                    self.web.bind()  # first: a port in use is exit 2, before anything starts
                await self.control.start()
            except ConfigError as exc:
                self.log.error("daemon_start_failed", error=str(exc))
                return Exit.CONFIG
            except ControlError as exc:
                self.log.error("daemon_start_failed", error=str(exc))
                return Exit.START
            if self.web is not None:
                await self.web.start()  # serves in the background: READY does not wait
            if self._stop_requested.is_set():  # signalled while the sockets were being bound
                await self.control.close()
                return self._stopped_before_start(None)
            probe = asyncio.create_task(self._probe_versions())
            try:
                return await self._lifecycle()
            finally:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
                await self.control.close()
        finally:
            if self.web is not None:
                await self.web.close()  # after the stop: the page shows it to the end
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            # Not back to the default action (death by signal, 143) while the process winds down.
            early_signals.install()
            self.notifier.close()

    def _stopped_before_start(self, early_signal: str | None) -> Exit:
        """A stop signal came before the volume's start began: nothing to stop, exit 0."""
        self.log.info("daemon_exit", exit_code=int(Exit.OK), reason="stopped_before_start",
                      **({"signal": early_signal} if early_signal else {}),
                      uptime_s=round(time.monotonic() - self._started, 1))
        return Exit.OK

    async def _lifecycle(self) -> int:
        start = asyncio.create_task(self.jfs.start())
        stop_requested = asyncio.create_task(self._stop_requested.wait())
        failed = asyncio.create_task(self._failed.wait())
        try:
            reason = await self._until_end(start, stop_requested, failed)
            clean = await self._finish(reason)
        except BaseException:
            await self._emergency_stop()  # a bug must still not leave a mount or a child behind
            raise
        finally:
            stop_requested.cancel()
            failed.cancel()
            await asyncio.gather(stop_requested, failed, return_exceptions=True)
        await asyncio.gather(start, return_exceptions=True)  # stop() has made start() return
        return self._exit_code(reason, start, clean)

    async def _until_end(self, start: asyncio.Task[None], stop_requested: asyncio.Task[bool],
                         failed: asyncio.Task[bool]) -> str:
        """Wait for what ends this run: "stop" (a signal), "start_failed" or "failed"."""
        await asyncio.wait({start, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if self._stop_requested.is_set():
            return "stop"
        if start.exception() is not None:
            return "start_failed"
        self._announce_ready()
        await asyncio.wait({stop_requested, failed}, return_when=asyncio.FIRST_COMPLETED)
        return "failed" if self._failed.is_set() else "stop"

    async def _finish(self, reason: str) -> bool:
        """Bring the controller to `stopped`. False when something was left behind."""
        if reason != "stop":
            # An operation interrupted by the failure may never answer: drop its request.
            self.control.cancel_requests()
            self.notifier.stopping()
        stop = asyncio.create_task(self.jfs.stop())
        abandon = asyncio.create_task(self._abandoned.wait())
        await asyncio.wait({stop, abandon}, return_when=asyncio.FIRST_COMPLETED)
        abandon.cancel()
        if not stop.done():
            stop.cancel()
            await asyncio.gather(stop, abandon, return_exceptions=True)
            await self._abandon()
            return False
        try:
            stop.result()
        except StopError as exc:
            self.log.error("daemon_stop_unclean", error=str(exc))
            return False
        return True

    async def _abandon(self) -> None:
        """Third signal: the stop itself is stuck. Kill the children's process groups (the
        juicefs supervisor and its FUSE server share one) and detach the mount point."""
        browses = self.jfs.browsing()  # read-only mounts of past times: owned children too
        mounts = [self.jfs.pids["juicefs"], *(b.child.pid for b in browses)]
        pids = [pid for pid in [self.jfs.pids["litestream"], *mounts] if pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for mount_point in [self.jfs.layout.mount_point, *(b.mount_point for b in browses)]:
            if mount_fstype(mount_point) is not None:
                try:
                    await lazy_unmount(mount_point, self.log)
                except FsmError as exc:
                    self.log.error("lazy_unmount_failed", error=str(exc))
        self.log.error("stop_abandoned", killed_process_groups=pids)
        # Let the stuck actions unwind (their one-shot commands are killed on cancel) and the
        # killed children be reaped while the loop still runs.
        stuck = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=5)
        for mount in mounts:
            remove_handover_files(mount)  # only once that process is gone

    async def _emergency_stop(self) -> None:
        try:
            await self.jfs.stop()
        except FsmError as exc:
            self.log.error("daemon_stop_unclean", error=str(exc))

    def _exit_code(self, reason: str, start: asyncio.Task[None], clean: bool) -> Exit:
        if not clean:
            code = Exit.UNCLEAN
        elif reason == "failed":
            self.log.error("daemon_exit_after_failure", error=str(self.jfs.error))
            code = Exit.FAILED
        elif reason == "start_failed":
            code = self._start_failure(start.exception())
        else:
            code = Exit.FORCED if self._signals > 1 else Exit.OK
        self.log.info("daemon_exit", exit_code=int(code), reason=reason,
                      uptime_s=round(time.monotonic() - self._started, 1))
        return code

    def _start_failure(self, exc: BaseException | None) -> Exit:
        if not isinstance(exc, StartError):
            raise RuntimeError("start() failed unexpectedly") from exc
        self.log.error("daemon_start_failed", stage=exc.stage, error=str(exc))
        return Exit.CONFIG if isinstance(exc.cause, ConfigError) else Exit.START

    # ---- notifications and signals ------------------------------------------------------

    def _announce_ready(self) -> None:
        self.notifier.ready(self.jfs.state)
        self.log.info("daemon_ready", active_dir=str(self.jfs.active_dir),
                      socket=str(self.control.path),
                      duration_ms=ms_since(self._started))

    def _on_transition(self, transition: Transition) -> None:
        self.notifier.status(transition.target)
        if transition.target == "failed":
            self._failed.set()

    def _on_progress(self, progress: str) -> None:
        # `systemctl status` shows why a stop takes long: the upload, a busy mount point.
        self.notifier.status(f"{self.jfs.state}: {progress}")

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.log.info("stop_requested", signal=name, state=self.jfs.state)
            self.notifier.stopping()
            self._stop_requested.set()
        elif self._signals == 2:
            self.log.warning("stop_escalated", signal=name, state=self.jfs.state,
                             effect="skip the flush wait, force-unmount, SIGKILL children "
                                    "after 2 s")
            self.control.cancel_requests()
            self.jfs.hurry()
        elif self._signals == 3:
            self.log.error("stop_abandon_requested", signal=name, state=self.jfs.state)
            self._abandoned.set()
        else:
            self.log.warning("signal_ignored", signal=name, reason="stop already abandoned")

    # ---- status -------------------------------------------------------------------------

    async def _probe_versions(self) -> None:
        """Once per run: status requests must not spawn processes."""
        tools = {"juicefs": self.jfs.juicefs.version(), "litestream": self.jfs.litestream.version()}
        results = await asyncio.gather(*tools.values(), return_exceptions=True)
        for name, result in zip(tools, results, strict=True):
            if isinstance(result, BaseException):
                self.log.warning("version_probe_failed", tool=name, error=str(result))
            else:
                self.versions[name] = _short_version(result)

    def status(self) -> dict[str, Any]:
        """What `juicefs-fsm status --json` prints (the control socket's status answer)."""
        return {**self.jfs.status(), **self._extra_status()}

    def _extra_status(self) -> dict[str, Any]:
        from . import __version__

        return {
            "active_dir": str(self.jfs.active_dir),
            "versions": {"juicefs-fsm": __version__, **self.versions},
            "daemon": {"pid": os.getpid(), "started_at": self._started_at.isoformat(),
                       "uptime_s": round(time.monotonic() - self._started, 1)},
        }


def _short_version(text: str) -> str:
    """`juicefs version 1.4.2+2026-...` -> `1.4.2+2026-...`; `v0.5.17` stays."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return last.removeprefix("juicefs version ").strip()


async def serve(cfg: Config) -> int:
    """Run the daemon for `cfg` in the current event loop."""
    notifier = Notifier.from_env()
    return await Daemon(JuiceFS(cfg), notifier).run()


def run(cfg: Config) -> int:
    return asyncio.run(serve(cfg))
