"""Where everything lives under base_dir (the Go package's layout, plus our own files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    base_dir: Path

    @property
    def cache_dir(self) -> Path:
        return self.base_dir / "cache"

    @property
    def local_storage_dir(self) -> Path:
        return self.base_dir / "local"

    @property
    def litestream_replica_dir(self) -> Path:
        return self.base_dir / "litestream"

    @property
    def metadata_db(self) -> Path:
        return self.base_dir / "metadata.db"

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.metadata_db}"

    @property
    def mount_point(self) -> Path:
        return self.base_dir / "data"

    @property
    def active_root(self) -> Path:
        return self.mount_point / "active"

    @property
    def active_dir(self) -> Path:
        return self.active_root / "fs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.mount_point / "checkpoints"

    @property
    def litestream_config(self) -> Path:
        return self.base_dir / "litestream.yml"

    @property
    def litestream_socket(self) -> Path:
        return self.base_dir / "litestream.sock"

    @property
    def control_socket(self) -> Path:
        return self.base_dir / "fsm.sock"

    @property
    def state_file(self) -> Path:
        # The children of the controller holding the lock: the next start ends them if it dies.
        return self.base_dir / "fsm.state.json"

    @property
    def lock_file(self) -> Path:
        # flock()ed by the controller from start to stop: one controller per base_dir.
        return self.base_dir / "fsm.lock"

    @property
    def set_aside_dir(self) -> Path:
        # Metadata files moved out of the way instead of being deleted.
        return self.base_dir / "set-aside"

    @property
    def history_dir(self) -> Path:
        # Read-only mounts of past points in time: history/<timestamp>/ (fsm.history).
        return self.base_dir / "history"

    @property
    def time_travel_dir(self) -> Path:
        # Restored metadata copies, their caches, the rollback journal (fsm.history).
        return self.base_dir / "time-travel"


# ---- keys in the bucket (S3 mode): every key the controller writes is under the volume's own
# prefix, beside JuiceFS's {volume_name}/chunks/, so volumes can share a bucket (docs/s3.md).

LEGACY_REPLICA_PREFIX = "juicefs-metadata"
"""Where releases before the per-volume layout kept every volume's replica (shared: unsafe)."""


def replica_prefix(volume_name: str) -> str:
    """The Litestream replica's root; a rollback's new histories are sub-paths under it."""
    return f"{volume_name}/metadata"


def control_key(volume_name: str, name: str) -> str:
    """A key of the controller's own: the lease, the replica pointer (CURRENT), markers."""
    return f"{volume_name}/fsm/{name}"
