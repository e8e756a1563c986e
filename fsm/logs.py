"""Logging. The library's events go to the standard `logging` module, logger `fsm` (children
`fsm.*` are the host's to add), through structlog's stdlib integration: a program that embeds the
controller sees nothing until it configures logging, and then sees what it asked for.

Library code only calls `get_logger`; it never configures structlog or logging. `configure` is
for the programs of this package (the CLI, the daemon, the demo): one handler that renders every
event as a JSON line when stderr is not a TTY, and as a readable console line on a TTY.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LogFormat = Literal["auto", "json", "console"]
LOGGER_NAME = "fsm"

_library = logging.getLogger(LOGGER_NAME)
# The library convention: without it, logging's last resort would print warnings to stderr
# of a program that never asked for them.
_library.addHandler(logging.NullHandler())


class Event(dict[str, Any]):
    """An event as the `msg` of a LogRecord. structlog's ProcessorFormatter reads the fields;
    any other formatter (`logging.basicConfig`, say) gets `transition from=ready to=stopping
    ...` from str()."""

    def __str__(self) -> str:
        fields = " ".join(f"{key}={_value(value)}" for key, value in self.items()
                          if key not in ("event", "exc_info"))
        return f"{self.get('event', '')} {fields}".rstrip()


def _value(value: Any) -> str:
    text = str(value)
    return text if isinstance(value, str) and text and not any(
        c.isspace() or c in "='\"" for c in text) else repr(value)


def _to_logging(logger: WrappedLogger, method: str,
                event_dict: EventDict) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The last processor: the event dict becomes the record's msg (as with structlog's
    ProcessorFormatter.wrap_for_formatter), and an exception becomes the record's exc_info as
    well, so formatters of either kind show the traceback."""
    exc_info = event_dict.get("exc_info")
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if exc_info:
        event_dict["exc_info"] = exc_info
    else:
        event_dict.pop("exc_info", None)
    return ((Event(event_dict),),
            {"extra": {"_logger": logger, "_name": method}, "exc_info": exc_info or None})


# filter_by_level first: an event below the logger's level costs one check and no processing.
_PROCESSORS: list[Processor] = [structlog.stdlib.filter_by_level,
                                structlog.contextvars.merge_contextvars,
                                _to_logging]


def get_logger(**bind: Any) -> Any:
    """A structlog logger of the library (`.info`, `.warning`, `.bind`, ...) writing to the
    stdlib logger `fsm`, whatever structlog's own configuration is."""
    return structlog.stdlib.BoundLogger(_library, _PROCESSORS, dict(bind))


def ms_since(started: float) -> float:
    """`duration_ms` of an event: milliseconds since `started` (time.monotonic()), 0.1 ms."""
    return round((time.monotonic() - started) * 1000, 1)


# ---- for the programs of this package ------------------------------------------------------

def configure(fmt: LogFormat = "auto", level: int = logging.INFO, *, stdlib: bool = False,
              stream: TextIO | None = None) -> None:
    """Render the library's events at `level` and up to `stream` (stderr at the time of each
    event when None). `stdlib=True` installs the handler on the root logger, so records of
    other libraries (asyncio's warnings, for one) are rendered the same way and a daemon's
    stderr stays one JSON object per line. Calling it again replaces the handler."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    handler = _Handler(stream)
    handler.setLevel(level)  # its own level too: another handler may lower the logger's
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.stdlib.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    renderer]))
    for logger in (logging.getLogger(), _library):
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _Handler)]
    target = logging.getLogger() if stdlib else _library
    target.addHandler(handler)
    target.setLevel(level)
    _library.setLevel(level)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes to sys.stderr as it is when the event comes (as logging's
    last resort does), unless given a stream: a replaced sys.stderr (a test's capture, a
    redirect) is followed instead of writing to a closed one."""

    def __init__(self, stream: TextIO | None) -> None:
        self._fixed: TextIO | None = None
        super().__init__(stream)
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._fixed = value
