"""Move a stopped SQLite volume to a shared metadata engine (docs/shared-engine.md).

`juicefs dump` of the SQLite metadata (the whole tree: active tree, checkpoints, trash) ->
`juicefs load` into the empty engine -> checked (the engine's own dump must describe the same
tree, and `juicefs fsck` must find every object) -> recorded as `moved.json` (in the bucket
under `{volume}/fsm/` in S3 mode, and in base_dir). Only then is the move done: from there on
a start in the SQLite mode is refused (`check_not_moved`), since two metadata copies writing
one bucket would corrupt it.

The source is base_dir's metadata.db or, when there is none, the replica restored first (as a
start would). In S3 mode the volume's lease is held for the move (LeaseHeld while another machine
runs it; a volume not stopped cleanly is refused: its takeover is a start's job).

Nothing on the SQLite side is changed, whatever fails: metadata.db is only read, and the
replica in the bucket is not touched. The data objects stay where they are and are shared by
both metadata copies; that is why the target is never cleaned with `juicefs destroy` (it would
delete them): a failed load is cleaned by dropping the target database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, FsmError, MigrationFailed, ToolError, VolumeMoved, one_line
from .juicefs import is_juicefs_mount, read_format
from .layout import control_key
from .lease import Lease
from .leftovers import BaseDirLock
from .logs import get_logger
from .metaengine import MetaURL, engine_status, parse_meta_url
from .proc import child_env, run

MOVED = "moved.json"
DUMP_TIMEOUT = 6 * 3600.0

Restore = Callable[[Config], Awaitable[None]]


@dataclass(frozen=True)
class MigrationResult:
    volume_name: str
    moved_to: str  # the engine, without its password
    entries: int  # files, directories and links: active tree, checkpoints and trash
    checkpoints: list[str]
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # dump, load, verify, fsck, record


def moved_file(cfg: Config) -> Path:
    return Path(cfg.base_dir) / MOVED


def _moved_message(cfg: Config, marker: dict[str, Any]) -> str:
    return (f"volume {cfg.volume_name!r} moved to {marker.get('moved_to', '?')} on "
            f"{marker.get('at', '?')}: its SQLite metadata is an old copy, and starting it would "
            f"write the bucket from two metadata copies; set meta_url (FSM_META_URL, run "
            f"--meta-url) to that engine and the password in FSM_META_PASSWORD")


def moved_locally(cfg: Config) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        value = json.loads(moved_file(cfg).read_text())
        if isinstance(value, dict):
            return value
    return None


async def read_moved(cfg: Config) -> dict[str, Any] | None:
    """The move record of this volume: base_dir's, else (S3 mode) the bucket's, which every
    machine sees. None when the volume was not moved."""
    marker = moved_locally(cfg)
    if marker is None and not cfg.local_mode:
        from .s3 import get_text

        text = await get_text(cfg, control_key(cfg.volume_name, MOVED))
        with contextlib.suppress(ValueError):
            value = json.loads(text) if text else None
            marker = value if isinstance(value, dict) else None
    return marker


async def check_not_moved(cfg: Config) -> None:
    """For the SQLite start path: VolumeMoved when the volume now lives on a shared engine."""
    if getattr(cfg, "meta_url", ""):
        return
    marker = await read_moved(cfg)
    if marker is not None:
        raise VolumeMoved(_moved_message(cfg, marker))


def _private_file(path: Path) -> None:
    """An empty 0600 file: juicefs dump then writes into it with that mode (the dump holds the
    object store's secret key)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def count_entries(dump: dict[str, Any]) -> tuple[int, list[str]]:
    """(entries in the dump's trees, the checkpoint ids under /checkpoints)."""
    def walk(node: Any) -> int:
        children = node.get("entries") if isinstance(node, dict) else None
        if not isinstance(children, dict):
            return 1
        return 1 + sum(walk(child) for child in children.values())

    total = sum(walk(dump[key]) for key in ("FSTree", "Trash") if isinstance(dump.get(key), dict))
    tree = dump.get("FSTree") or {}
    cps = (tree.get("entries") or {}).get("checkpoints") or {}
    return total, sorted(cps.get("entries") or {})


def _tree_of(dump: dict[str, Any]) -> Any:
    return {k: dump.get(k) for k in ("FSTree", "Trash", "Quotas", "Acls", "DelFiles")}


def _sqlite_counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                for t in ("jfs_node", "jfs_edge")}


async def migrate_metadata(config: Config, to_url: str, *, password: str | None = None,
                           restore: Restore | None = None, log: Any = None) -> MigrationResult:
    """Move the stopped SQLite volume of `config` to the engine at `to_url` (its password in the
    URL, in `password`, or in config.meta_password / FSM_META_PASSWORD). When base_dir has no
    metadata.db (a fresh base_dir, or one whose copy another machine superseded), `restore`
    brings it from the replica first (default: litestream, as a start would). S3 mode: the
    volume's lease is held during the move (LeaseHeld while another machine runs it).
    MigrationFailed when the move did not complete: the SQLite volume is as it was."""
    log = (log or get_logger()).bind(volume=config.volume_name)
    if getattr(config, "meta_url", ""):
        raise ConfigError(f"volume {config.volume_name!r} already uses {config.meta_url}; "
                          f"migrate moves an SQLite volume: leave meta_url unset")
    engine = parse_meta_url(to_url, password if password is not None else config.meta_password)
    started = time.monotonic()
    steps: dict[str, float] = {}
    lock = BaseDirLock(config)
    _hold_stopped(config, lock)
    lease: Lease | None = None
    try:
        marker = await read_moved(config)
        if marker is not None:
            raise VolumeMoved(_moved_message(config, marker))
        lease = await _take_lease(config, log)
        db = config.layout.metadata_db
        if not db.exists():
            t0 = time.monotonic()
            await (restore or restore_from_replica)(config)
            steps["restore"] = round(time.monotonic() - t0, 3)
        _check_nothing_staged(config)
        fmt = read_format(db)
        if fmt is None:
            raise MigrationFailed(
                f"{db} is missing or not a formatted JuiceFS database, and the replica had "
                f"none: is base_dir / the bucket / volume_name the volume's?")
        if fmt.get("Name") != config.volume_name:
            raise MigrationFailed(f"{db} holds volume {fmt.get('Name')!r}, not "
                                  f"{config.volume_name!r}; fix volume_name")
        if await engine_status(str(config.juicefs_bin), engine, log=log) is not None:
            raise MigrationFailed(
                f"{engine.display} already holds a volume: migrate loads into an empty engine "
                f"(a new PostgreSQL database, an unused Redis db number); nothing was changed")
        return await _move(config, engine, db, started, steps, log)
    finally:
        if lease is not None:
            # Nothing of the SQLite volume was left unflushed: the next holder (if any: after
            # the move only a failed one starts it) may start at once.
            await lease.release(clean=True)
        lock.release()


async def restore_from_replica(config: Config) -> None:
    """metadata.db from the volume's Litestream replica (the path the replica pointer names),
    as a start in the SQLite mode restores it."""
    from .litestream import LitestreamTool
    from .pointintime import POINTER, valid_subpath

    log = get_logger().bind(volume=config.volume_name)
    tool = LitestreamTool(config, log)
    if config.local_mode:
        pointer = _read_json_file(config.layout.litestream_replica_dir / POINTER)
    else:
        from .s3 import get_text

        text = await get_text(config, control_key(config.volume_name, POINTER))
        pointer = _loads(text) if text else None
    tool.replica_subpath = valid_subpath(str((pointer or {}).get("replica", "")))
    tool.write_config()
    restored = await tool.restore()
    log.info("migrate_metadata_restored" if restored else "migrate_replica_empty",
             replica=tool.replica_location)


def _read_json_file(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError):
        return _loads(path.read_text())
    return None


def _loads(text: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    return None


async def _take_lease(config: Config, log: Any) -> Lease | None:
    """S3 mode: hold the volume's single-writer lease for the move, so that no machine starts
    the SQLite volume meanwhile (LeaseHeld when one runs it now). A metadata.db here that
    another machine superseded is set aside (as a start does): the replica is restored."""
    if config.local_mode:
        return None
    from . import s3
    from .lease import Lease

    lease = Lease.for_config(config, log)
    acquired = await lease.acquire(wait=False)
    if acquired.takeover:
        previous = acquired.previous or {}
        # Keep the lost holder's watermark for the start that takes the volume over.
        with contextlib.suppress(FsmError):
            await lease.refresh(extra=previous.get("extra") or
                                {"watermark": previous.get("since")})
        await lease.release(clean=False)
        raise MigrationFailed(
            f"volume {config.volume_name!r} was not stopped cleanly (its last holder, "
            f"{previous.get('host', '?')} {previous.get('base_dir', '?')}, did not release the "
            f"lease): start it once in the SQLite mode (it takes the volume over to the last "
            f"point whose data is all in the bucket) and stop it, then migrate; the lease runs "
            f"out in {config.lease_ttl:g}s")
    if acquired.previous is not None and not acquired.same_disk and s3.metadata_files(
            config.layout):
        folder = await asyncio.to_thread(s3.set_aside, config.layout)
        log.warning("superseded_set_aside", moved_to=str(folder),
                    reason="another machine held the volume since this one")
    return lease


def _check_nothing_staged(config: Config) -> None:
    """Writeback blocks not uploaded yet (an unclean stop here): the metadata references them,
    the engine's copy would reference objects the bucket does not have."""
    staged = [p for p in config.layout.cache_dir.glob("*/rawstaging/**/*") if p.is_file()]
    if staged:
        raise MigrationFailed(
            f"{len(staged)} written blocks in {config.layout.cache_dir}/*/rawstaging were never "
            f"uploaded (the volume did not stop cleanly): start and stop it once (the mount "
            f"uploads them), then migrate")


def _hold_stopped(config: Config, lock: BaseDirLock) -> None:
    """Hold base_dir's controller lock for the whole move, so no start can begin meanwhile;
    BaseDirInUse while a controller runs the volume."""
    base = Path(config.base_dir)
    if config.local_mode and not base.is_dir():
        raise MigrationFailed(f"{base} does not exist: migrate needs the volume's base_dir")
    base.mkdir(parents=True, exist_ok=True)  # S3 mode: a new base_dir restores the replica
    lock.acquire()
    if is_juicefs_mount(config.layout.mount_point):
        lock.release()
        raise MigrationFailed(f"{config.layout.mount_point} is mounted: stop the volume first")


async def _move(config: Config, engine: MetaURL, db: Path, started: float,
                steps: dict[str, float], log: Any) -> MigrationResult:
    juicefs = str(config.juicefs_bin)
    env = child_env(engine.env())
    hide = [*engine.secrets, *config.secrets()]
    base = Path(config.base_dir)
    source_dump, check_dump = base / "migrate-dump.json", base / "migrate-check.json"
    loaded = False

    async def step(name: str, argv: list[str]) -> str:
        t0 = time.monotonic()
        done = await run("juicefs", name, [juicefs, *argv], env=env, log=log, secrets=hide,
                         timeout=DUMP_TIMEOUT)
        steps[name] = round(time.monotonic() - t0, 3)
        return done.stderr

    try:
        _private_file(source_dump)
        # --keep-secret-key: the engine's format must be complete to mount in S3 mode.
        await step("dump", ["dump", "--fast", "--keep-secret-key", layout_url(config),
                            str(source_dump)])
        source = await asyncio.to_thread(_read_json, source_dump)
        entries, checkpoints = count_entries(source)
        loaded = True  # from here on the target may hold part of the volume
        await step("load", ["load", engine.url, str(source_dump)])
        _private_file(check_dump)
        await step("verify", ["dump", "--fast", "--keep-secret-key", engine.url,
                              str(check_dump)])
        target = await asyncio.to_thread(_read_json, check_dump)
        counts = await asyncio.to_thread(_sqlite_counts, db)
        got, _ = count_entries(target)
        if got != entries or _tree_of(target) != _tree_of(source):
            raise MigrationFailed(
                f"the engine's copy differs from the SQLite metadata ({got} entries loaded, "
                f"{entries} dumped; SQLite has {counts['jfs_node']} nodes)")
        await step("fsck", ["fsck", engine.url])
        t0 = time.monotonic()
        await _record(config, engine, entries, source.get("Setting") or {})
        steps["record"] = round(time.monotonic() - t0, 3)
    except (FsmError, OSError, ValueError) as exc:
        why = one_line(str(exc)) if isinstance(exc, ToolError) else str(exc)
        clean = (f" {engine.display} may hold part of the volume: drop that database (PostgreSQL"
                 f" DROP DATABASE, Redis FLUSHDB on that db number) before trying again; never "
                 f"`juicefs destroy` it, that would delete the data objects the SQLite volume "
                 f"still uses." if loaded else " The target engine was not written.")
        log.error("migration_failed", to=engine.display, error=why)
        raise MigrationFailed(f"moving volume {config.volume_name!r} to {engine.display} "
                              f"failed: {why}. The SQLite volume is unchanged.{clean}") from None
    finally:
        for path in (source_dump, check_dump):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    result = MigrationResult(config.volume_name, engine.display, entries, checkpoints,
                             round(time.monotonic() - started, 3), steps)
    log.info("migration_done", to=engine.display, entries=entries,
             checkpoints=len(checkpoints), seconds=result.seconds, steps=steps)
    return result


def layout_url(config: Config) -> str:
    return config.layout.meta_url


def _read_json(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


async def _record(config: Config, engine: MetaURL, entries: int,
                  setting: dict[str, Any]) -> None:
    """The move is done once recorded: the bucket first (every machine sees it), then base_dir.
    No password: the engine as displayed."""
    marker = json.dumps({
        "moved_to": engine.display, "scheme": engine.scheme, "volume": config.volume_name,
        "uuid": setting.get("UUID"), "entries": entries, "host": socket.gethostname(),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1)
    if not config.local_mode:
        from .s3 import put_text

        await put_text(config, control_key(config.volume_name, MOVED), marker)
    path = moved_file(config)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(marker)
    os.replace(tmp, path)
