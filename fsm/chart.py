"""The lifecycle of one JuiceFS volume: the single source of truth for what happens when.

Each state names the action that runs while it is active (an `invoke`, cancelled if the state is
left early) or on entry; the controller (`fsm.controller.JuiceFS`) is the model that implements
those actions by calling the adapters. Diagrams in `diagrams/` are drawn from this class.
"""

from __future__ import annotations

from typing import Any

from statemachine import State, StateChart


class Lifecycle(StateChart[Any]):
    """uninitialized -> acquiring_lease -> restoring_metadata (or taking_over after an unclean
    loss) -> [formatting] -> replicating -> mounting -> ready; a shared metadata engine skips
    the restore and replication. ready <-> checkpointing / restoring_checkpoint / rolling_back
    (its steps). stop from anywhere; failed on any error, when the mount dies, or when the
    lease is lost (fenced first); litestream dying is restarted in place (a loop on active)
    until its restart budget is spent, then failed."""

    uninitialized = State("Uninitialized", initial=True)

    class active(State.Compound, name="Active"):
        # base_dir's lock, and in S3 mode the bucket's single-writer lease (fsm.claim).
        acquiring_lease = State("Acquiring the lease", initial=True, invoke="claim_volume")
        restoring_metadata = State("Restoring metadata", invoke="restore_metadata")
        # After an unclean loss: the replica at the last holder's watermark (fsm.takeover).
        taking_over = State("Taking over", invoke="take_over")
        formatting = State("Formatting", invoke="format_volume")
        replicating = State("Replicating", invoke="start_replication")
        mounting = State("Mounting", invoke="mount_volume")
        ready = State("Ready", enter="announce_ready")
        checkpointing = State("Checkpointing", invoke="take_checkpoint")
        restoring_checkpoint = State("Restoring checkpoint", invoke="restore_checkpoint_tree")

        class rolling_back(State.Compound, name="Rolling back"):
            """Time travel (fsm.rollback): the whole volume back to a past second. The live
            volume runs until the restored point is checked; any failure after it stopped is
            undone (the previous metadata back, the volume restarted as it was)."""

            preparing_rollback = State("Restoring the point", initial=True,
                                       invoke="prepare_rollback")
            stopping_live_volume = State("Stopping the live volume", invoke="stop_live_volume")
            swapping_metadata = State("Swapping metadata", invoke="swap_metadata")
            replicating_new_path = State("Replicating to a new path",
                                         invoke="replicate_new_path")
            remounting = State("Remounting", invoke="remount_volume")
            carrying_over = State("Keeping the replaced tree", invoke="carry_over")
            committing = State("Committing", invoke="commit_rollback")
            collecting_garbage = State("Collecting garbage", invoke="collect_garbage")
            undoing_rollback = State("Undoing the rollback", invoke="undo_rollback")

            done_invoke_stopping_live_volume = stopping_live_volume.to(
                undoing_rollback, cond="rollback_failing") | stopping_live_volume.to(
                swapping_metadata)
            done_invoke_swapping_metadata = swapping_metadata.to(
                undoing_rollback, cond="rollback_failing") | swapping_metadata.to(
                replicating_new_path)
            done_invoke_replicating_new_path = replicating_new_path.to(
                undoing_rollback, cond="rollback_failing") | replicating_new_path.to(remounting)
            done_invoke_remounting = remounting.to(
                undoing_rollback, cond="rollback_failing") | remounting.to(carrying_over)
            done_invoke_carrying_over = carrying_over.to(
                undoing_rollback, cond="rollback_failing") | carrying_over.to(committing)
            done_invoke_committing = committing.to(
                undoing_rollback, cond="rollback_failing") | committing.to(collecting_garbage)

        # A shared metadata engine (meta_url) is its own durability: no restore, no litestream.
        done_invoke_acquiring_lease = acquiring_lease.to(
            formatting, cond="shared_engine") | acquiring_lease.to(
            taking_over, cond="after_unclean_loss") | acquiring_lease.to(restoring_metadata)
        done_invoke_taking_over = taking_over.to(replicating)
        done_invoke_restoring_metadata = restoring_metadata.to(
            formatting, cond="needs_format"
        ) | restoring_metadata.to(replicating)
        done_invoke_formatting = formatting.to(mounting, cond="shared_engine") | formatting.to(
            replicating)
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
        # Refused or failed before the live volume stopped: nothing changed.
        done_invoke_preparing_rollback = rolling_back.preparing_rollback.to(
            ready, cond="rollback_failing", after="settle_operation") | \
            rolling_back.preparing_rollback.to(rolling_back.stopping_live_volume)
        done_invoke_collecting_garbage = rolling_back.collecting_garbage.to(
            ready, after="settle_operation")
        done_invoke_undoing_rollback = rolling_back.undoing_rollback.to(
            ready, after="settle_operation")
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
    # The lease could not be refreshed in time, or another machine took the volume: fence at
    # once (no more uploads, no more replica writes), wherever the chart is.
    lease_lost = active.to(failed, on="fence") | stopping.to(
        None, on="fence") | failed.to(None, on="fence")
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
