"""``python -m dgpo_lightning fit|validate|test --config A.yaml --config B.yaml``.

Configs compose left to right (later files override earlier ones); the resolved config is saved as
``config.yaml`` in every run directory.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.module import DGPOModule

TRAINER_DEFAULTS = {
    # Rollouts are regenerated with the current policy at the start of every epoch.
    "reload_dataloaders_every_n_epochs": 1,
    # no_grad rather than inference_mode for evaluation: tensors made while evaluating (metric
    # states, prompt caches) are reused by training afterwards.
    "inference_mode": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "default_root_dir": "runs",
}


class DGPOCLI(LightningCLI):
    """LightningCLI over :class:`DGPOModule` and :class:`RolloutDataModule`.

    ``fit`` without ``--ckpt_path`` resumes from the run's ``last.ckpt`` when there is one
    (Lightning writes checkpoints atomically), so re-running a killed command continues it; use a
    new ``trainer.default_root_dir`` to start over.
    """

    def before_fit(self) -> None:
        if self.config_init["fit"].get("ckpt_path") is None:
            self.config_init["fit"]["ckpt_path"] = "last"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(DGPOModule, RolloutDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    DGPOCLI(args=args)


if __name__ == "__main__":
    main()
