"""Export the trained model when training ends, loadable without Lightning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def fit_problem(trainer: L.Trainer) -> str | None:
    """Why a ``fit`` that ended did not train to its stopping condition, or ``None`` if it did.

    Reaching ``max_steps``/``max_epochs`` or a stop requested by a callback (time budget, early
    stopping, ``max_time``) counts as finished; so does a resumed run that had already finished.
    Running out of training batches, or never training a step, does not: the model is not what the
    config asked for.
    """
    loop = trainer.fit_loop
    if loop.max_steps != -1 and trainer.global_step >= loop.max_steps:
        return None
    if trainer.global_step == 0:
        return "no optimizer step was taken (no training batches could be formed from the rollout?)"
    if loop.max_batches == 0:
        budget = f" of max_steps={loop.max_steps}" if loop.max_steps != -1 else ""
        return f"it stopped at step {trainer.global_step}{budget} because an epoch had no training batches"
    return None


class ExportTrained(L.Callback):
    """Write ``dirpath`` (default ``<run>/final``, ``<run>`` = ``trainer.default_root_dir``) at the end of ``fit``.

    Only a fit that reached its stopping condition is exported (see :func:`fit_problem`); one that ran
    out of training batches writes nothing here (its ``last.ckpt`` still holds what it trained).

    The embedded world is saved as a complete checkpoint (LoRA adapters merged into a copy), loadable
    by ``python -m dgpo_lightning.evaluate --model DIR``; with LoRA the adapter alone is also saved
    under ``DIR/adapter`` (peft format; for SD3 in the diffusers format that
    ``StableDiffusion3Pipeline.load_lora_weights`` reads). Runs after weight averaging has copied its
    averaged weights into the model, if that callback is used.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "final"
        problem = fit_problem(trainer)
        if problem:
            rank_zero_warn(f"{target} not written: {problem}")
            return
        if trainer.is_global_zero:
            export_model(pl_module, target)
            rank_zero_info(f"trained model written to {target}")
        trainer.strategy.barrier("export")


def export_model(module: L.LightningModule, target: str | Path) -> Path:
    """Save ``module.backbone`` (see :class:`ExportTrained`); returns ``target``."""
    import copy

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    backbone = module.backbone
    if hp.finetune == "lora":
        from dgpo_lightning.models.lora import save_lora

        save_lora(backbone, target / "adapter")
    if hp.backbone in ("world", "world_video"):
        from dgpo_lightning.world.backbone import save_backbone

        if hp.finetune == "lora":
            backbone = copy.deepcopy(backbone)
            backbone.denoiser = _merged(backbone.denoiser)
        save_backbone(backbone, target)
    return target


def _merged(denoiser):
    """The denoiser with its LoRA updates folded into the base weights and the peft layers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dgpo_lightning.models.lora import fold_lora

    fold_lora(denoiser)
    for module in list(denoiser.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(module, child_name, child.get_base_layer())
    if getattr(denoiser, "_hf_peft_config_loaded", False):  # diffusers' adapter bookkeeping
        denoiser._hf_peft_config_loaded = False
        denoiser.peft_config = {}
    return denoiser
