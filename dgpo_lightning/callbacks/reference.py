"""Reference-switching schedule: periodically make the current policy the new reference."""

from __future__ import annotations

import lightning as L


class ReferenceSchedule(L.Callback):
    """Every ``every_n_epochs`` rollout epochs, set the reference to the current online weights.

    DGPO's implicit reward is measured against the reference; moving it lets training continue past
    the point where ``β``-scaled gaps saturate the sigmoid (see ``DGPOModule.reset_reference``).
    """

    def __init__(self, every_n_epochs: int):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            pl_module.reset_reference()
