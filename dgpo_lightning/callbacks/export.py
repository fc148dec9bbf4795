"""Export the trained model when training ends, loadable without Lightning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class ExportTrained(L.Callback):
    """Write ``dirpath`` (default ``<log_dir>/final``) at the end of ``fit``.

    The embedded world is saved as a complete checkpoint (LoRA adapters merged into a copy), loadable
    by ``python -m dgpo_lightning.evaluate --model DIR``; with LoRA the adapter alone is also saved
    under ``DIR/adapter`` (peft format; for SD3 in the diffusers format that
    ``StableDiffusion3Pipeline.load_lora_weights`` reads). Runs after weight averaging has copied its
    averaged weights into the model, if that callback is used.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "final"
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
    if hp.backbone == "world":
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
