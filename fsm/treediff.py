"""Carrying a tree from one metadata copy into another: the rollback keeps the active tree it
replaces as a checkpoint by cloning the restored tree and copying only what changed since."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections import Counter
from pathlib import Path


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    keys = ("st_ino", "st_ctime_ns", "st_mtime_ns", "st_size", "st_mode", "st_uid", "st_gid")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def apply_tree_diff(src: Path, base: Path, dst: Path) -> dict[str, int]:
    """Make `dst` (a clone of `base`) hold what `src` holds. `base` and `src` are one tree as two
    metadata copies of one volume see it: an entry with the same inode, ctime, mtime, size, mode
    and owner in both is unchanged (JuiceFS never reuses inode numbers; any change moves
    ctime), so only changed entries are copied. Hard links become separate files."""
    counts: Counter[str] = Counter()
    _sync_dir(src, base, dst, counts)
    return dict(counts)


def _sync_dir(src: Path, base: Path | None, dst: Path, counts: Counter[str]) -> bool:
    with os.scandir(src) as it:
        entries = {e.name: e.stat(follow_symlinks=False) for e in it}
    before: dict[str, os.stat_result] = {}
    if base is not None:
        with os.scandir(base) as it:
            before = {e.name: e.stat(follow_symlinks=False) for e in it}
    changed = False
    for name in before.keys() - entries.keys():
        _remove(dst / name)
        counts["removed"] += 1
        changed = True
    for name, now in entries.items():
        was = before.get(name)
        target = dst / name
        if stat.S_ISDIR(now.st_mode):
            same_dir = was is not None and stat.S_ISDIR(was.st_mode)
            if not same_dir:
                _remove(target)
                target.mkdir()
                counts["copied"] += 1
                changed = True
            inner = _sync_dir(src / name, base / name if same_dir and base else None, target,
                              counts)
            if inner or was is None or not _same(now, was):
                _copy_attrs(now, target)
        elif was is not None and _same(now, was):
            counts["unchanged"] += 1
        else:
            _remove(target)
            _copy_entry(src / name, now, target)
            counts["copied"] += 1
            changed = True
    return changed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _copy_entry(src: Path, st: os.stat_result, dst: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.lchown(dst, st.st_uid, st.st_gid)
        with contextlib.suppress(NotImplementedError, OSError):
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    if stat.S_ISREG(st.st_mode):
        shutil.copyfile(src, dst)
    else:  # fifo, socket, device
        os.mknod(dst, st.st_mode, st.st_rdev)
    # chown clears set-id bits: the mode (and xattrs, times) come after it.
    os.chown(dst, st.st_uid, st.st_gid)
    shutil.copystat(src, dst)


def _copy_attrs(st: os.stat_result, dst: Path) -> None:
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


