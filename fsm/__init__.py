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
    FsmError,
    HistoryOff,
    InUse,
    InvalidCheckpointId,
    MissingPrerequisite,
    MountLost,
    NoSpace,
    NotReadyError,
    NotReplicated,
    OutsideWindow,
    ReplicationLost,
    RollbackFailed,
    StartError,
    StopError,
    TimeTravelError,
    ToolError,
    UnsafeMetadataCopy,
)

if TYPE_CHECKING:
    from .checkpoints import Checkpoint
    from .config import Config
    from .controller import JuiceFS, Transition
    from .timepoints import RestoreWindow
    from .timetravel import Browse, RollbackResult

# Imported on first use: `juicefs-fsm status` and the other control-socket verbs need none of
# these (the controller pulls in python-statemachine, structlog and asyncio: ~60 ms).
_LAZY = {"Checkpoint": "checkpoints", "Config": "config", "JuiceFS": "controller",
         "Transition": "controller", "RestoreWindow": "timepoints", "Browse": "timetravel",
         "RollbackResult": "timetravel"}

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
    "FsmError",
    "HistoryOff",
    "InUse",
    "InvalidCheckpointId",
    "JuiceFS",
    "MissingPrerequisite",
    "MountLost",
    "NoSpace",
    "NotReadyError",
    "NotReplicated",
    "OutsideWindow",
    "ReplicationLost",
    "RestoreWindow",
    "RollbackFailed",
    "RollbackResult",
    "StartError",
    "StopError",
    "TimeTravelError",
    "ToolError",
    "Transition",
    "UnsafeMetadataCopy",
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
