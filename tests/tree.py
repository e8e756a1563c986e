"""Exact snapshots of a directory tree: content, modes, owners, symlinks, empty directories."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

Entry = tuple[str, int, int, int, str]


def snapshot(root: Path) -> dict[str, Entry]:
    """relative path -> (kind, mode, uid, gid, content digest or link target)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                kind, detail = "link", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                kind, detail = "dir", ""
            else:
                kind, detail = "file", hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (
                kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail)
    return out


def make_rich_tree(root: Path) -> None:
    """Files of several owners and modes, a symlink, nested and empty directories."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "docs" / "readme.txt").write_text("hello\n")
    (root / "docs" / "deep" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "owned-by-1000").write_text("user file\n")
    os.chown(root / "owned-by-1000", 1000, 1000)
    (root / "private").write_text("secret-ish\n")
    os.chmod(root / "private", 0o600)
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o750)
    os.chown(root / "docs" / "deep", 1234, 4321)
    os.chmod(root / "docs" / "deep", 0o711)
    os.symlink("docs/readme.txt", root / "link-to-readme")
    os.symlink("/nonexistent/target", root / "dangling-link")
