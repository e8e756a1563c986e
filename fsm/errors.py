"""Every error juicefs-fsm raises is an FsmError with a message a person can act on."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoints import Checkpoint


def one_line(text: str) -> str:
    """A multi-line message (a tool's stderr tail) as one line, for a one-line error."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class FsmError(Exception):
    """Base class of all juicefs-fsm errors."""


class ConfigError(FsmError, ValueError):
    """The configuration cannot work; the message says which field and how to fix it."""


class MissingPrerequisite(ConfigError):
    """A binary or device the controller needs is not on this machine."""


class ToolError(FsmError):
    """An external command (juicefs, litestream, umount) failed."""

    def __init__(self, tool: str, action: str, returncode: int | None, stderr_tail: str) -> None:
        self.tool = tool
        self.action = action
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        rc = "timed out" if returncode is None else f"exited {returncode}"
        detail = f"\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"{tool} {action} {rc}{detail}")


class StartError(FsmError):
    """start() did not reach ready. `stage` is the state it failed in."""

    def __init__(self, stage: str, cause: BaseException | None, stderr_tail: str = "") -> None:
        self.stage = stage
        self.cause = cause
        self.stderr_tail = stderr_tail
        what = str(cause) if cause is not None else "start was interrupted by stop()"
        super().__init__(f"start failed while {stage}: {what}")


class StopError(FsmError):
    """stop() could not leave the volume cleanly unmounted with no child running."""


class NotReadyError(FsmError):
    """An operation was asked for in a state that does not allow it."""

    def __init__(self, operation: str, state: str) -> None:
        self.operation = operation
        self.state = state
        super().__init__(
            f"cannot {operation} while the volume is {state}; "
            f"it is allowed only when ready (call start() and wait for it to return)"
        )


class MountLost(FsmError):
    """The juicefs mount process exited while the volume was in use."""


class ReplicationLost(FsmError):
    """litestream exited and could not be kept running."""


class BaseDirInUse(FsmError):
    """Another controller (in this or another process) holds this base_dir."""


class NoSpace(FsmError):
    """The filesystem holding base_dir is (nearly) full; the message says how much is free."""


class CheckpointError(FsmError):
    """A checkpoint operation failed; the active tree is unchanged."""


class InvalidCheckpointId(CheckpointError, ValueError):
    """A checkpoint id is not 1-200 characters of [A-Za-z0-9._-], or is '.' or '..'."""


class CheckpointExists(CheckpointError):
    """A checkpoint with this id already exists."""


class CheckpointNotFound(CheckpointError):
    """No checkpoint with this id exists."""


class NotReplicated(CheckpointError):
    """A checkpoint or restore is done on the volume, but the sync barrier could not confirm
    that the replica has it. It is in the local metadata.db and is replicated once Litestream
    answers again; `.checkpoint` is the operation's result (do not repeat the operation)."""

    def __init__(self, message: str, checkpoint: Checkpoint | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class ControlError(FsmError):
    """The control socket could not be reached or answered with an error."""


class S3Unavailable(FsmError):
    """S3 could not be reached or is not serving (connection refused, timeout, 5xx): retried
    until `s3_retry_deadline`."""


class S3AccessError(ConfigError):
    """S3 answered but refused: wrong credentials, no permission, or no such bucket.
    Not retried: fix the configuration."""


class TimeTravelError(FsmError):
    """A history, browse or rollback request could not be carried out (fsm.history)."""


class HistoryOff(TimeTravelError):
    """Time travel is off (history_hours = 0); the message says how to turn it on."""


class OutsideWindow(TimeTravelError, ValueError):
    """The requested time is not in the history window that is actually available."""


class BrokenRestorePoint(TimeTravelError):
    """`juicefs fsck` found objects missing for the restored metadata: refused, not mounted."""


class BrowseNotFound(TimeTravelError):
    """No browse mount is open for that time or path."""


class InUse(TimeTravelError):
    """unbrowse or rollback refused: programs are still inside the mount it would take away
    (the message names them); nothing was changed."""


class UnsafeMetadataCopy(TimeTravelError):
    """Refused: a second read-write mount of a metadata copy, or gc against a copy that is
    not the primary, would corrupt or delete the live volume's data."""


class RollbackFailed(TimeTravelError):
    """A rollback step failed; the message says whether the volume is back as it was."""


class S3PreconditionFailed(FsmError):
    """A conditional write was refused (HTTP 412): the object exists, or changed since it was
    read. Not retried as such: read the object again and decide."""


class S3ObjectMissing(FsmError):
    """The object is not in the bucket (HTTP 404 on a read or a conditional write)."""


class LeaseHeld(FsmError):
    """Another machine holds the volume's single-writer lease (fsm.lease) and is alive; nothing
    was changed. `holder` is the lease body (host, pid, base_dir, since, ...), `expires_in_s`
    the soonest it could be taken over if the holder stopped refreshing now."""

    def __init__(self, message: str, holder: dict[str, object] | None = None,
                 expires_in_s: float | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}
        self.expires_in_s = expires_in_s


class LeaseLost(FsmError):
    """This machine no longer holds the volume's lease: another took it over, or it could not
    be refreshed before its fence deadline. The volume must stop writing at once."""


class EngineUnavailable(FsmError):
    """The shared metadata engine (meta_url) could not be asked: down, unreachable, or it
    refused the user or password. The message names the engine without its password."""


class OperationLocked(FsmError):
    """Another machine (or process) holds the volume's lock for this kind of operation (format,
    or restore/delete of trees on a shared engine) longer than the bounded wait. Nothing was
    changed; `holder` is what the lock says about its holder."""

    def __init__(self, message: str, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class VolumeMoved(ConfigError):
    """The volume's metadata was moved to a shared engine (`juicefs-fsm migrate`): starting it
    in the SQLite mode would fork it. Set meta_url to the engine named in the message."""


class MigrationFailed(FsmError):
    """`migrate_metadata` did not complete; the SQLite volume is as it was, and the message says
    what (if anything) to clean in the target engine."""
