"""Resuming from an epoch-end checkpoint exactly where an uninterrupted run would continue.

``ModelCheckpoint(save_on_train_epoch_end=True)`` writes ``last.ckpt`` inside ``on_train_epoch_end``,
before Lightning counts the epoch as completed; with ``trainer.max_steps`` set, Lightning 2.6 then
treats the resume as a mid-epoch restart and re-enters the finished epoch (a second rollout for the
same epoch, one extra step, scalars logged one step late). Lightning has no option for this, so the
checkpoint's loop state is rewritten to "the next epoch has not started yet".
"""

from __future__ import annotations

from typing import Any


def resume_at_next_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the fit-loop state of a checkpoint written at the end of a training epoch (in
    ``on_train_epoch_end``, before Lightning counts the epoch as completed) into the state at the
    start of the next epoch; returns whether it did. Mid-epoch checkpoints are left as they are."""
    fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches:
        return False
    total = epochs["total"]
    ended = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    if not (ended and batches.get("is_last_batch")):
        return False
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    return True
