"""juicefs-fsm: a declarative state-chart controller for one JuiceFS volume."""

from .checkpoints import Checkpoint
from .config import Config
from .controller import JuiceFS, Transition
from .errors import (
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    ControlError,
    FsmError,
    InvalidCheckpointId,
    MissingPrerequisite,
    MountLost,
    NotReadyError,
    ReplicationLost,
    StartError,
    StopError,
    ToolError,
)

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointExists", "CheckpointNotFound", "Config",
    "ConfigError", "ControlError", "FsmError", "InvalidCheckpointId", "JuiceFS",
    "MissingPrerequisite", "MountLost", "NotReadyError", "ReplicationLost", "StartError",
    "StopError", "ToolError", "Transition",
]
__version__ = "0.1.0"
