"""sd_notify(3) without libsystemd: datagrams to the supervisor's NOTIFY_SOCKET.

systemd (Type=notify) and compatible supervisors set NOTIFY_SOCKET to a path or to an
abstract-namespace name written with a leading `@`. Sending never raises: a missing
or broken notify socket must not take the volume down, so failures are logged instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import Any

from .logs import get_logger

ENV = "NOTIFY_SOCKET"


def socket_address(value: str) -> str | None:
    """The address to send to: `@name` is the abstract namespace (a leading NUL byte)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock:... and relative paths are not supported


class Notifier:
    """Sends `KEY=VALUE` lines to the supervisor; a no-op when NOTIFY_SOCKET is not set."""

    def __init__(self, address: str | None, log: Any = None) -> None:
        self.address = address
        self._log = log or get_logger()
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *,
                 unset: bool = True, log: Any = None) -> Notifier:
        """Read NOTIFY_SOCKET and (by default) remove it, so juicefs and litestream, which
        inherit our environment, cannot talk to the supervisor in our name."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV, "")
        if unset:
            env.pop(ENV, None)
        notifier = cls(socket_address(raw) if raw else None, log)
        if raw and notifier.address is None:
            notifier._log.warning("sd_notify_unsupported", notify_socket=raw,
                                  reason="only absolute paths and @abstract names are supported")
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram, e.g. notify(READY=1, STATUS="ready"). True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            self._log.warning("sd_notify_failed", message=message, error=str(exc))
            return False
        self._log.debug("sd_notify", message=message)
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse(datagram: bytes) -> Mapping[str, str]:
    """`KEY=VALUE` lines of one notification (for tests and debugging)."""
    pairs = (line.partition("=") for line in datagram.decode().splitlines() if line)
    return {key: value for key, _, value in pairs}
