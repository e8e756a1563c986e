"""Checks of base_dir that refuse a start before anything is created on disk.

`check_config_paths` is pure (no disk access): Config runs it at construction.
`check_before_start` reads the disk and the mount table: start() runs it first. Each refusal is a
ConfigError (exit 2 in the daemon) whose one line says what to change (docs/faults.md, "Refused
at start").
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

# sun_path is 108 bytes including the terminating NUL. fsm.sock has a way around it
# (fsm.control binds through /proc/self/fd) but litestream binds its socket by name.
MAX_SOCKET_PATH = 107
_SOCKETS = ("litestream.sock", "fsm.sock")
JUICEFS_FSTYPE = "fuse.juicefs"


def check_config_paths(config: Config) -> None:
    """What can be refused from the path alone: a NUL byte, a base_dir too long for the unix
    sockets under it."""
    base = str(config.base_dir)
    if "\0" in base:
        raise ConfigError(f"base_dir {base!r} contains a NUL byte; no path can")
    # A shared metadata engine (meta_url) runs no Litestream: only fsm.sock, which can go long.
    if getattr(config, "meta_url", ""):
        return
    longest = max(_SOCKETS, key=len)
    room = MAX_SOCKET_PATH - len(longest) - 1
    size = len(os.fsencode(base))
    if size > room:
        raise ConfigError(
            f"base_dir {base} is {size} bytes long, the limit is {room}: {longest} in it must "
            f"fit a unix socket name (sun_path, {MAX_SOCKET_PATH + 1} bytes with its NUL); use "
            f"a shorter base_dir (a short symlink to this directory works)")


def check_before_start(config: Config) -> None:
    """Refuse a base_dir that cannot work, before anything is created: one that cannot be
    created or written, a data/ that something else is mounted on, and a base_dir nested in
    (or holding) another juicefs-fsm volume."""
    base = Path(os.path.realpath(config.base_dir))
    mounts = list(_mounts())
    _check_nesting(config, base, mounts)
    _check_writable(Path(config.base_dir))
    _check_data_mount(config, base, mounts)


# ---- base_dir can be created and written ----------------------------------------------------

def _check_writable(base_dir: Path) -> None:
    """base_dir, or the nearest ancestor that exists, takes a new entry. Tried for real (and
    removed at once): permissions, a read-only mount, the immutable flag, quotas, a root-squashed
    NFS export all say no only when asked."""
    existing = base_dir
    while not os.path.lexists(existing):
        existing = existing.parent
    what = "base_dir" if existing == base_dir else f"cannot create base_dir {base_dir}:"
    if os.path.islink(existing) and not os.path.exists(existing):
        raise ConfigError(f"{what} {existing} is a symlink to {os.readlink(existing)}, which "
                          f"does not exist; fix or remove the symlink")
    if not os.path.isdir(existing):
        raise ConfigError(f"{what} {existing} exists and is not a directory; move it away or "
                          f"choose another base_dir")
    try:
        probe = tempfile.mkdtemp(prefix=".juicefs-fsm-probe-", dir=existing)
    except OSError as exc:
        raise ConfigError(f"{what} {existing} {_why_not_writable(exc, existing)}") from None
    os.rmdir(probe)


def _why_not_writable(exc: OSError, path: Path) -> str:
    if exc.errno == errno.EROFS:
        return "is on a read-only filesystem; remount it read-write or choose another base_dir"
    if exc.errno == errno.EPERM:
        return (f"does not allow new entries (immutable or append-only?): `lsattr -d {path}`, "
                f"then `chattr -i -a {path}`, or choose another base_dir")
    if exc.errno == errno.EACCES:
        return (f"is not writable by uid {os.geteuid()}; run as its owner (usually root) or "
                f"choose another base_dir")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "is on a full filesystem (or over quota); free some space"
    return f"cannot be written ({exc.strerror or exc}); choose another base_dir"


# ---- what is mounted ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Mount:
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        "utf-8", "surrogateescape")


def _mounts() -> Iterator[_Mount]:
    """Every mount of this namespace, oldest first, from /proc/self/mountinfo: it never asks a
    filesystem, so a hung FUSE mount cannot hang the check."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            left, _, right = line.partition(" - ")
            parts, rest = left.split(), right.split()
            if len(parts) > 4 and len(rest) > 1:
                yield _Mount(_unescape(parts[4]), rest[0], _unescape(rest[1]))


def _under(path: str, top: str) -> bool:
    """`path` is `top` or below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _volume(mount: _Mount) -> str:
    # juicefs mounts show the source "JuiceFS:<volume name>".
    return mount.source.removeprefix("JuiceFS:")


def _ours(config: Config, mount: _Mount) -> bool:
    """A juicefs mount of this volume: a leftover (live or stale) that fsm.leftovers clears."""
    return mount.fstype == JUICEFS_FSTYPE and _volume(mount) == config.volume_name


def _check_nesting(config: Config, base: Path, mounts: list[_Mount]) -> None:
    """One volume's base_dir inside another's is refused both ways: its files would live in (or
    under) the other's mount, whose stop would have to tear this volume down, and a FUSE
    filesystem served from another is one hang away from a deadlock."""
    here = str(base)
    for mount in mounts:
        if mount.fstype == JUICEFS_FSTYPE and _under(here, mount.point):
            raise ConfigError(
                f"base_dir {here} is inside the JuiceFS mount {mount.point} (volume "
                f"{_volume(mount)!r}); a volume inside another volume is refused: choose a "
                f"base_dir outside {mount.point}")
    own = [str(base / name) for name in ("data", "history", "time-travel")]
    for mount in mounts:
        if mount.fstype == JUICEFS_FSTYPE and _under(mount.point, here) and \
                not any(_under(mount.point, mine) for mine in own):
            other = mount.point.removesuffix("/data")
            raise ConfigError(
                f"base_dir {here} holds another running volume: {other} (JuiceFS volume "
                f"{_volume(mount)!r} mounted at {mount.point}); a volume inside another volume "
                f"is refused: stop that one and move it, or choose another base_dir")
    holder = _running_base_dir_above(base)
    if holder is not None:
        path, pid = holder
        raise ConfigError(
            f"base_dir {here} is inside {path}, the base_dir of a running juicefs-fsm volume "
            f"(pid {pid} holds {path}/fsm.lock); a volume inside another volume is refused: "
            f"choose a base_dir outside {path}")


def _running_base_dir_above(base: Path) -> tuple[Path, str] | None:
    """An ancestor of base_dir whose fsm.lock a live controller holds, from /proc/locks (reading
    it takes no lock: trying flock() ourselves could make that controller's own start fail)."""
    locked = _flock_holders()
    for ancestor in base.parents:
        pid = _lock_holder(ancestor, locked)
        if pid is not None:
            return ancestor, pid
    return None


def _lock_holder(base_dir: Path, locked: dict[tuple[int, int, int], str] | None = None
                 ) -> str | None:
    """The pid holding base_dir/fsm.lock, if a controller runs there."""
    try:
        st = os.stat(base_dir / "fsm.lock")
    except OSError:
        return None
    held = _flock_holders() if locked is None else locked
    return held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))


def _flock_holders() -> dict[tuple[int, int, int], str]:
    """(major, minor, inode) -> pid of every flock() in /proc/locks."""
    held: dict[tuple[int, int, int], str] = {}
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return held
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) > 5 and fields[1] == "FLOCK":
            try:
                major, minor, inode = fields[5].split(":")
                held[(int(major, 16), int(minor, 16), int(inode))] = fields[4]
            except ValueError:
                continue
    return held


def _check_data_mount(config: Config, base: Path, mounts: list[_Mount]) -> None:
    """JuiceFS mounted over something at data/ would hide it without a word."""
    data = str(base / "data")
    at_data = [m for m in mounts if m.point == data]
    if at_data:
        top = at_data[-1]
        if _ours(config, top):
            return  # our own leftover, live or stale: fsm.leftovers unmounts it
        if top.fstype == JUICEFS_FSTYPE and _lock_holder(base) is not None:
            return  # a controller runs here: the lock refuses with its pid (BaseDirInUse)
        raise ConfigError(
            f"{data} is already a mount point ({top.fstype} from {top.source!r}); juicefs-fsm "
            f"mounts the volume there and would hide it: unmount it (umount {data}) or choose "
            f"another base_dir")
    below = [m for m in mounts if _under(m.point, data) and m.point != data]
    if below:
        first = below[0]
        raise ConfigError(
            f"{first.point} is a mount point ({first.fstype} from {first.source!r}) inside "
            f"{data}, where juicefs-fsm mounts the volume and would hide it: unmount it "
            f"(umount {first.point}) or choose another base_dir")
