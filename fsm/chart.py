"""The lifecycle of one JuiceFS volume: the single source of truth for what happens when.

Each state names the action that runs while it is active (an `invoke`, cancelled if the state is
left early) or on entry; the controller (`fsm.controller.JuiceFS`) is the model that implements
those actions by calling the adapters. Diagrams in `diagrams/` are drawn from this class.
"""

from __future__ import annotations

from typing import Any

from statemachine import State, StateChart


class Lifecycle(StateChart[Any]):
    """uninitialized -> restoring_metadata -> [formatting] -> replicating -> mounting -> ready;
    ready <-> checkpointing / restoring_checkpoint / rolling_back; stop from anywhere; failed on
    any error, or when the mount dies; litestream dying is restarted in place (a loop on active)
    until its restart budget is spent, then failed."""

    uninitialized = State("Uninitialized", initial=True)

    class active(State.Compound, name="Active"):
        restoring_metadata = State("Restoring metadata", initial=True, invoke="restore_metadata")
        formatting = State("Formatting", invoke="format_volume")
        replicating = State("Replicating", invoke="start_replication")
        mounting = State("Mounting", invoke="mount_volume")
        ready = State("Ready", enter="announce_ready")
        checkpointing = State("Checkpointing", invoke="take_checkpoint")
        restoring_checkpoint = State("Restoring checkpoint", invoke="restore_checkpoint_tree")
        # Time travel (fsm.timetravel): stop, swap in the metadata of a past second, restart.
        rolling_back = State("Rolling back", invoke="roll_back")

        done_invoke_restoring_metadata = restoring_metadata.to(
            formatting, cond="needs_format"
        ) | restoring_metadata.to(replicating)
        done_invoke_formatting = formatting.to(replicating)
        done_invoke_replicating = replicating.to(mounting)
        done_invoke_mounting = mounting.to(ready)

        checkpoint = ready.to(checkpointing)
        done_invoke_checkpointing = checkpointing.to(ready, after="settle_operation")
        restore = ready.to(restoring_checkpoint)
        done_invoke_restoring_checkpoint = restoring_checkpoint.to(
            ready, after="settle_operation"
        )
        delete_checkpoint = ready.to(None, on="remove_checkpoint", after="settle_operation")
        rollback = ready.to(rolling_back)
        done_invoke_rolling_back = rolling_back.to(ready, after="settle_operation")
        # Read-only mounts of past seconds beside the live volume, which keeps running.
        browse = ready.to(None, on="open_history", after="settle_operation")
        unbrowse = ready.to(None, on="close_history", after="settle_operation")

    stopping = State("Stopping", invoke="shut_down")
    stopped = State("Stopped", final=True, enter="announce_stopped")
    failed = State("Failed", enter="clean_up")

    start = uninitialized.to(active)
    stop = active.to(stopping) | failed.to(stopping) | uninitialized.to(stopped)
    done_invoke_stopping = stopping.to(stopped)
    # An error while stopping still ends in `stopped` (recorded, raised by stop()): the chart
    # would otherwise drop it and leave stop() waiting forever.
    error_execution = active.to(failed) | stopping.to(stopped, on="record_stop_error")
    mount_lost = active.to(failed)
    # litestream exiting is survivable: while the restart budget lasts (replication_restarts
    # within replication_restart_window seconds) a restart is scheduled with backoff and the
    # volume stays where it is (targetless: no state is left, no operation interrupted); the
    # backoff's end respawns it. Past the budget, failed.
    # (mypy: the stubs type a compound state's .to() as taking a State, not None.)
    replication_lost = active.to(  # type: ignore[operator]
        None,  # type: ignore[arg-type]
        cond="replication_restartable", on="schedule_replication_restart",
    ) | active.to(failed)
    restart_replication = active.to(None, on="respawn_replicator")  # type: ignore[arg-type]


LEAF_STATES = tuple(
    s.id for s in Lifecycle.states_map.values() if not s.states
)
