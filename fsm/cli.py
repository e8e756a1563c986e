"""`juicefs-fsm` command line: `run` (the daemon), control-socket clients, `diagram`, `demo`.

Client exit codes: 0 done; 1 the daemon refused or the operation failed; 2 usage or
configuration error; 3 no daemon answers for that base_dir. `run` exits with fsm.daemon.Exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .clitext import checkpoint_table, format_history, format_status, rollback_text
from .errors import ConfigError, FsmError, one_line

PROG = "juicefs-fsm"
_NUMBER = re.compile(r"[0-9]{1,12}(?:\.[0-9]{0,9})?|\.[0-9]{1,9}")
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")

# Config fields settable by `run` flags. Secrets are not among them: argv is world-readable
# (/proc/<pid>/cmdline), so keys come from the environment or the --config file only.
_RUN_FIELDS = ("base_dir", "local_mode", "volume_name", "s3_endpoint_url", "s3_bucket",
               "upload_delay", "ready_timeout", "flush_timeout", "litestream_stop_timeout",
               "s3_retry_deadline", "cache_size_mib", "buffer_size_mib", "juicefs_bin",
               "litestream_bin", "history_hours", "lease_ttl", "http", "meta_url")


_RUN_EPILOG = """\
signals: SIGTERM, SIGINT or SIGHUP stops gracefully (flush, unmount, stop litestream);
  a second one hurries the stop (skip the flush wait, force-unmount, SIGKILL after 2 s);
  a third abandons a stuck stop (SIGKILL children, lazy unmount).
exit codes: 0 stopped; 1 internal error; 2 configuration error; 3 start failed or another
  daemon serves BASE_DIR; 4 failed while running (mount or replication lost); 5 something
  was left behind or the stop was abandoned; 6 stopped, but hurried (flush skipped).
See docs/systemd.md."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (the full usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Controller for a JuiceFS volume with Litestream-replicated SQLite metadata.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_clients(sub)

    diagram = sub.add_parser("diagram", help="draw the state chart (Mermaid to stdout by default)")
    diagram.add_argument("--format", choices=["mermaid", "dot", "svg", "png"], default="mermaid")
    diagram.add_argument("--output", "-o", default="-", help="file to write, '-' for stdout")
    diagram.add_argument("--base-dir", help="highlight the current state of the daemon there")
    diagram.set_defaults(handler=_diagram)

    demo = sub.add_parser("demo", help="a local-mode walk through start, write, checkpoint, "
                                       "change, restore, stop")
    demo.add_argument("--base-dir", help="where to put the demo volume (default: a temp dir)")
    demo.set_defaults(handler=_demo)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=os.environ.get("FSM_CONFIG") or None,
                   help="TOML file whose keys are config field names (default: $FSM_CONFIG); "
                        "flags win over the environment, which wins over the file")


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run the volume in the foreground (for systemd, s6, a container)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_RUN_EPILOG,
        description="Restore, format if needed, replicate, mount; say READY=1 (sd_notify)\n"
                    "and serve {base_dir}/fsm.sock. S3 keys come from the environment\n"
                    "(FSM_S3_ACCESS_KEY, FSM_S3_SECRET_ACCESS_KEY or SPRITE_S3_*) or the\n"
                    "--config file, never from flags.")
    _add_config_file(run)
    run.add_argument("--base-dir", metavar="DIR", help="the volume's directory (FSM_BASE_DIR)")
    run.add_argument("--local", dest="local_mode", action=argparse.BooleanOptionalAction,
                     default=None, help="keep data and the metadata replica on local disk "
                                        "instead of S3 (FSM_LOCAL_MODE)")
    run.add_argument("--volume-name", metavar="NAME",
                     help="JuiceFS volume name, 3-63 of a-z 0-9 - (FSM_VOLUME_NAME, "
                          "default juicefs)")
    run.add_argument("--s3-endpoint-url", metavar="URL",
                     help="http(s)://host[:port] (FSM_S3_ENDPOINT_URL)")
    run.add_argument("--s3-bucket", metavar="NAME", help="bucket name (FSM_S3_BUCKET)")
    for name, what in (("upload-delay", "a written block waits before upload "
                                        "(default 60 in S3 mode, 0 in local mode)"),
                       ("ready-timeout", "the mount may take to become ready (default 30)"),
                       ("flush-timeout", "stop waits for writeback data to upload before "
                                         "force-unmounting (default 300)"),
                       ("litestream-stop-timeout", "litestream gets for its final sync "
                                                   "(default 30)"),
                       ("s3-retry-deadline", "flaky S3 calls are retried (default 60)"),
                       ("lease-ttl", "without a lease refresh before another machine may take "
                                     "the volume over (FSM_LEASE_TTL, default 30)")):
        run.add_argument(f"--{name}", type=float, metavar="SECONDS", help=f"seconds {what}")
    run.add_argument("--cache-size-mib", type=int, metavar="MIB",
                     help="JuiceFS cache size (default 80%% of the cache filesystem)")
    run.add_argument("--buffer-size-mib", type=int, metavar="MIB",
                     help="JuiceFS buffer size (default min(20%% of RAM, 1 GiB))")
    run.add_argument("--history-hours", type=float, metavar="HOURS",
                     help="keep HOURS of whole-volume history for history/browse/rollback; "
                          "0 = off (FSM_HISTORY_HOURS, default 0; docs/time-travel.md)")
    run.add_argument("--http", metavar="HOST:PORT",
                     help="serve the live view (the chart, /metrics, /status) there; off by "
                          "default; keep it on loopback: the page shows paths, pids and errors "
                          "(FSM_HTTP; docs/live-view.md)")
    run.add_argument("--meta-url", metavar="URL", type=_url_without_password,
                     help="a shared JuiceFS metadata engine (postgres://USER@HOST/DB, "
                          "redis://HOST/N) instead of SQLite + Litestream; the password in "
                          "FSM_META_PASSWORD (FSM_META_URL; docs/shared-engine.md)")
    run.add_argument("--juicefs-bin", metavar="PATH", help="juicefs binary (default: PATH)")
    run.add_argument("--litestream-bin", metavar="PATH", help="litestream binary (default: PATH)")
    run.add_argument("--log-format", choices=_LOG_FORMATS,
                     default=os.environ.get("FSM_LOG_FORMAT") or "auto",
                     help="auto: JSON lines unless stderr is a terminal (FSM_LOG_FORMAT)")
    run.add_argument("--log-level", choices=_LOG_LEVELS,
                     default=os.environ.get("FSM_LOG_LEVEL") or "info",
                     help="default info (FSM_LOG_LEVEL)")
    run.set_defaults(handler=_run)

    migrate = sub.add_parser(
        "migrate", help="move a stopped SQLite volume (tree and checkpoints) to a shared "
                        "metadata engine", description="juicefs dump, load into the empty "
        "engine, check, and record the move; the volume then starts only with --meta-url URL. "
        "The password comes from FSM_META_PASSWORD. Config as for `run` (flags, FSM_*, "
        "--config). docs/shared-engine.md")
    _add_config_file(migrate)
    migrate.add_argument("--base-dir", metavar="DIR", help="the volume's directory (FSM_BASE_DIR)")
    migrate.add_argument("--to", required=True, metavar="URL", type=_url_without_password,
                         help="the engine: postgres://USER@HOST:PORT/DB?sslmode=... or "
                              "redis://HOST:PORT/N (empty; password in FSM_META_PASSWORD)")
    migrate.add_argument("--local", dest="local_mode", action=argparse.BooleanOptionalAction,
                         default=None, help="the volume is a local-mode one (FSM_LOCAL_MODE)")
    migrate.add_argument("--volume-name", metavar="NAME", help="(FSM_VOLUME_NAME)")
    migrate.add_argument("--json", action="store_true", help="print the result as JSON")
    migrate.set_defaults(handler=_migrate)


def _url_without_password(value: str) -> str:
    from .metaengine import split_password

    # argv is world-readable (/proc/<pid>/cmdline): the password travels in the environment.
    if split_password(value)[1]:
        raise argparse.ArgumentTypeError(
            "the URL carries a password; leave it out and set FSM_META_PASSWORD instead "
            "(command lines are readable by every user)")
    return value


def _migrate(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from .config import layered
    from .logs import configure
    from .migrate import migrate_metadata

    flags = {"base_dir": args.base_dir, "local_mode": args.local_mode,
             "volume_name": args.volume_name,
             "meta_url": ""}  # the volume moved is an SQLite one, whatever FSM_META_URL says
    cfg = layered(file=args.config, flags=flags)
    configure("auto", logging.WARNING, stdlib=True)
    result = asyncio.run(migrate_metadata(cfg, args.to))
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(f"moved volume {result.volume_name!r} to {result.moved_to}: {result.entries} "
              f"entries, {len(result.checkpoints)} checkpoint(s), {result.seconds:.1f}s; "
              f"start it with --meta-url {result.moved_to}")
    return 0


def _add_clients(sub: Any) -> None:
    def client(name: str, help_text: str, *, with_id: bool, json_flag: bool,
               handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text,
            description=help_text + " (asks the daemon serving BASE_DIR over {base_dir}/fsm.sock)")
        if with_id:
            p.add_argument("id", metavar="ID", help="checkpoint id: 1-200 of A-Z a-z 0-9 . _ -")
        p.add_argument("--base-dir", help="the daemon's base dir (default: $FSM_BASE_DIR, "
                                          "then base_dir in --config)")
        _add_config_file(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=_timeout, metavar="SECONDS",
                       help="how long to wait for the answer")
        p.set_defaults(handler=handler)
        return p

    client("status", "show the daemon's state, pids, versions and recent transitions",
           with_id=False, json_flag=True, handler=_status)
    client("checkpoint", "checkpoint the active tree as ID", with_id=True, json_flag=True,
           handler=_checkpoint)
    client("restore", "replace the active tree with checkpoint ID (the current one is kept as "
           "checkpoint pre-restore-ID-<unix>)", with_id=True, json_flag=True, handler=_restore)
    client("checkpoints", "list checkpoints", with_id=False, json_flag=True,
           handler=_checkpoints)
    client("delete", "delete checkpoint ID", with_id=True, json_flag=False, handler=_delete)
    _add_time_travel(client)


def _timeout(text: str) -> float:
    """--timeout SECONDS: digits only (no nan, inf or -1), then fsm.control's range."""
    from .control import check_timeout

    if not _NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; use e.g. 30 "
                                         f"or 2.5")
    try:
        return check_timeout(float(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_AT_HELP = ("the time: ISO 8601 (2026-01-02T03:04:05Z; no zone = local time), Unix seconds, "
            "or relative: '5m ago', '2 hours ago', -90s")
# A value of --at that reads as a negative duration (-90s, -0.5s, -5m).
_NEGATIVE_TIME = re.compile(r"-\.?\d")


def _add_time_travel(client: Callable[..., argparse.ArgumentParser]) -> None:
    client("history", "show the history window: the oldest and newest restorable times, and "
           "open browse mounts", with_id=False, json_flag=True, handler=_history)
    browse = client("browse", "mount the whole volume as it was at a past time, read-only, at "
                    "{base_dir}/history/<time>/ (the live volume keeps running)",
                    with_id=False, json_flag=True, handler=_browse)
    browse.add_argument("--at", required=True, metavar="TIME", help=_AT_HELP)
    unbrowse = client("unbrowse", "unmount and delete a browse mount", with_id=False,
                      json_flag=True, handler=_unbrowse)
    unbrowse.add_argument("target", nargs="?", metavar="TIME_OR_PATH",
                          help="the browse mount's time (as `history` shows it) or its path")
    unbrowse.add_argument("--all", action="store_true", help="every open browse mount")
    rollback = client("rollback", "roll the whole volume (checkpoints included) back to a past "
                      "time; the active tree it replaces is kept as checkpoint "
                      "pre-rollback-<unix>", with_id=False, json_flag=True, handler=_rollback)
    rollback.add_argument("--at", required=True, metavar="TIME", help=_AT_HELP)


# ---- run ---------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
    """The daemon's Config: flags > environment > --config file."""
    from .config import layered

    flags = {name: getattr(args, name) for name in _RUN_FIELDS}
    return layered(file=args.config, environ=environ, flags=flags)


def _run(args: argparse.Namespace) -> int:
    from .daemon import Exit
    from .daemon import run as run_daemon
    from .logs import configure

    try:
        _check_choice("--log-format / FSM_LOG_FORMAT", args.log_format, _LOG_FORMATS)
        _check_choice("--log-level / FSM_LOG_LEVEL", args.log_level, _LOG_LEVELS)
        cfg = run_config(args)
        from .preflight import check_before_start

        check_before_start(cfg)  # before the control socket creates base_dir
    except ConfigError as exc:
        _say_error(exc)
        return int(Exit.CONFIG)
    configure(args.log_format, getattr(logging, args.log_level.upper()), stdlib=True)
    if args.config:
        _warn_if_readable(Path(args.config))
    return run_daemon(cfg)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    # argparse checks choices on flags only, not on defaults taken from the environment.
    if value not in choices:
        raise ConfigError(f"{what} is {value!r}; use one of {', '.join(choices)}")


def _warn_if_readable(path: Path) -> None:
    from .config import file_values

    has_keys = {"s3_access_key", "s3_secret_access_key", "meta_password"} & set(
        file_values(path))
    if has_keys and path.stat().st_mode & 0o077:
        from .logs import get_logger

        get_logger().warning("config_file_readable_by_others", path=str(path),
                             fix=f"chmod 600 {path}: it holds S3 keys")


# ---- clients -----------------------------------------------------------------------------

def client_base_dir(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Path:
    """--base-dir, then FSM_BASE_DIR, then base_dir in the --config file."""
    env = os.environ if environ is None else environ
    raw = args.base_dir or env.get("FSM_BASE_DIR")
    if not raw and args.config:
        from .config import file_values

        raw = file_values(args.config).get("base_dir")
    if not raw:
        raise ConfigError("base_dir is required: pass --base-dir or set FSM_BASE_DIR")
    return Path(raw).expanduser().absolute()


def _call(args: argparse.Namespace, op: str, **request: Any) -> Any:
    from .control import call

    return call(client_base_dir(args), op, timeout=args.timeout, **request)


def _checked_id(cp_id: str) -> str:
    from .checkpoints import validate_id

    return validate_id(cp_id)  # refused here, before a round trip


def _show(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> int:
    """The daemon's answer as JSON with --json, else as `human(result)`."""
    if args.json:
        _print_json(result)
    else:
        print(human(result))
    return 0


def _status(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "status"), format_status)


def _checkpoint(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "checkpoint", id=_checked_id(args.id)),
                 lambda cp: f"checkpoint {cp['id']} created at {cp['created_at']}")


def _restore(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "restore", id=_checked_id(args.id)),
                 lambda kept: f"restored {args.id}; the previous tree is kept as checkpoint "
                              f"{kept['id']}")


def _checkpoints(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "checkpoints"), checkpoint_table)


def _delete(args: argparse.Namespace) -> int:
    _call(args, "delete", id=_checked_id(args.id))
    print(f"deleted checkpoint {args.id}")
    return 0


def _checked_at(text: str) -> str:
    from .errors import OutsideWindow
    from .timepoints import iso, parse_time

    # Relative and local times are read here, where the user typed them.
    try:
        return iso(parse_time(text))
    except OutsideWindow as exc:  # unreadable or out of range: a usage error (exit 2)
        raise ConfigError(f"--at: {exc}") from None


def _history(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "history"), format_history)


def _browse(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "browse", at=_checked_at(args.at)), lambda opened: (
        f"the volume as of {opened['at']} (replicated state of {opened['state_at']}) is "
        f"mounted read-only at {opened['path']}\nyour tree: {opened['tree']}\n"
        f"close it with: {PROG} unbrowse {opened['path']}"))


def _unbrowse(args: argparse.Namespace) -> int:
    if args.all == bool(args.target):
        raise ConfigError("unbrowse takes a browse mount's time or path, or --all")
    target = {"all": True} if args.all else {"at": _unbrowse_target(args.target)}
    return _show(args, _call(args, "unbrowse", **target), lambda closed: "\n".join(
        f"closed {browse['path']}" for browse in closed["closed"]) or "no browse mounts were open")


def _unbrowse_target(target: str) -> str:
    path = Path(target).expanduser()
    return str(path.absolute()) if path.exists() or "/" in target else _checked_at(target)


def _rollback(args: argparse.Namespace) -> int:
    return _show(args, _call(args, "rollback", at=_checked_at(args.at)), rollback_text)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# ---- diagram and demo (implemented in their own modules) ---------------------------------

def _diagram(args: argparse.Namespace) -> int:
    from .diagram import command

    return command(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import command

    return command(args)


# ---- errors ------------------------------------------------------------------------------

def _say_error(exc: BaseException) -> None:
    print(f"{PROG}: error: {one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)


def attach_negative_times(argv: Sequence[str]) -> list[str]:
    """`--at -5m` as `--at=-5m`: argparse takes a word that starts with '-' (and is not a plain
    number) for an option, and would say that --at lacks its value."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            out += [word, *words]
            break
        following = next(words, None) if word == "--at" else None
        if following is not None and _NEGATIVE_TIME.match(following):
            out.append(f"--at={following}")
            continue
        out.append(word)
        if following is not None:
            out.append(following)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        # First thing: a stop signal during start-up must not kill the daemon half-way.
        from . import early_signals

        early_signals.install()
    args = build_parser().parse_args(attach_negative_times(sys.argv[1:] if argv is None else argv))
    from .control import DaemonUnreachable

    try:
        code: int = args.handler(args)
    except DaemonUnreachable as exc:
        _say_error(exc)
        return EXIT_NO_DAEMON
    except ConfigError as exc:
        _say_error(exc)
        return EXIT_USAGE
    except FsmError as exc:
        _say_error(exc)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
