"""juicefs-fsm: a declarative state-chart controller for one JuiceFS volume."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BaseDirInUse,
    BrokenRestorePoint,
    BrowseNotFound,
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    ControlError,
    EngineUnavailable,
    FsmError,
    HistoryOff,
    InUse,
    InvalidCheckpointId,
    LeaseHeld,
    LeaseLost,
    MigrationFailed,
    MissingPrerequisite,
    MountLost,
    NoSpace,
    NotReadyError,
    NotReplicated,
    OperationLocked,
    OutsideWindow,
    ReplicationLost,
    RollbackFailed,
    S3AccessError,
    S3Unavailable,
    StartError,
    StopError,
    TimeTravelError,
    ToolError,
    UnsafeMetadataCopy,
    VolumeMoved,
)

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .config import Config
    from .controller import JuiceFS
    from .history import Browse
    from .migrate import MigrationResult, migrate_metadata
    from .rollback import RollbackResult
    from .timepoints import RestoreWindow
    from .transitions import Transition

# Imported on first use: `juicefs-fsm status` and the other control-socket verbs need none of
# these (the controller pulls in python-statemachine, structlog and asyncio: ~60 ms).
_LAZY = {"Checkpoint": "checkpoints", "Config": "config", "JuiceFS": "controller",
         "Transition": "transitions", "RestoreWindow": "timepoints", "Browse": "history",
         "RollbackResult": "rollback", "migrate_metadata": "migrate",
         "MigrationResult": "migrate"}

__all__ = [
    "BaseDirInUse",
    "BrokenRestorePoint",
    "Browse",
    "BrowseNotFound",
    "Checkpoint",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointNotFound",
    "Config",
    "ConfigError",
    "ControlError",
    "EngineUnavailable",
    "FsmError",
    "HistoryOff",
    "InUse",
    "InvalidCheckpointId",
    "JuiceFS",
    "LeaseHeld",
    "LeaseLost",
    "MigrationFailed",
    "MigrationResult",
    "MissingPrerequisite",
    "MountLost",
    "NoSpace",
    "NotReadyError",
    "NotReplicated",
    "OperationLocked",
    "OutsideWindow",
    "ReplicationLost",
    "RestoreWindow",
    "RollbackFailed",
    "RollbackResult",
    "S3AccessError",
    "S3Unavailable",
    "StartError",
    "StopError",
    "TimeTravelError",
    "ToolError",
    "Transition",
    "UnsafeMetadataCopy",
    "VolumeMoved",
    "migrate_metadata",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fsm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
