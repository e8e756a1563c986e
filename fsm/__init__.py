"""juicefs-fsm: a declarative state-chart controller for one JuiceFS volume."""

from .checkpoints import Checkpoint
from .config import Config
from .controller import JuiceFS, Transition
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
from .timepoints import RestoreWindow
from .timetravel import Browse, RollbackResult

__all__ = [
    "BaseDirInUse", "BrokenRestorePoint", "Browse", "BrowseNotFound", "Checkpoint",
    "CheckpointError", "CheckpointExists", "CheckpointNotFound", "Config", "ConfigError",
    "ControlError", "FsmError", "HistoryOff", "InvalidCheckpointId", "JuiceFS",
    "MissingPrerequisite", "MountLost", "NoSpace", "NotReadyError", "NotReplicated",
    "OutsideWindow", "ReplicationLost", "RestoreWindow", "RollbackFailed", "RollbackResult",
    "StartError", "StopError", "TimeTravelError", "ToolError", "Transition",
    "UnsafeMetadataCopy",
]
__version__ = "0.1.0"
