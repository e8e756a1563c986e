"""structlog set-up: JSON lines when stderr is not a TTY, readable console lines on a TTY."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: int = logging.INFO, *,
              stdlib: bool = False) -> None:
    """Configure structlog for the process (the CLI does this; embedders may bring their own).
    `stdlib=True` also renders records of the standard logging module (asyncio's warnings, for
    one) the same way, so a daemon's stderr stays one JSON object per line."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if stdlib:
        _route_stdlib_logging(renderer, level)


def _route_stdlib_logging(renderer: Any, level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer]))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "_fsm", False)]
    handler._fsm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def ensure_configured() -> None:
    """Give an embedding program sensible defaults unless it configured structlog itself."""
    if not structlog.is_configured():
        configure()


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("fsm").bind(**bind)


def ms_since(started: float) -> float:
    """`duration_ms` of an event: milliseconds since `started` (time.monotonic()), 0.1 ms."""
    return round((time.monotonic() - started) * 1000, 1)
