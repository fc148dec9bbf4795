"""The SD3 path through the Lightning system: a tiny random SD3 pipeline saved to disk, loaded by
name like a real SD3.5-M directory, LoRA-trained by DGPO for two optimizer steps."""

import lightning as L
import torch

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.models.testing import build_tiny_sd3
from dgpo_lightning.module import DGPOModule


def test_two_dgpo_steps_on_tiny_sd3_with_lora(tmp_path):
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    module = DGPOModule(
        backbone="sd3",
        model_path=str(tmp_path / "sd3"),
        backbone_options={"resolution": 32},
        finetune="lora",
        lora_rank=4,
        lr=1e-3,
        t_min=0.5,
    )
    data = RolloutDataModule(
        train_prompts=str(prompts),
        group_size=2,
        prompts_per_rank=2,
        num_steps=2,
        rewards={"jpeg_incompressibility": 1.0},
        eval_prompts=None,
        progress=False,
    )
    module.configure_model()
    lora = {n: p.detach().clone() for n, p in module.backbone.denoiser.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in module.backbone.denoiser.named_parameters() if not p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 2
    after = dict(module.backbone.denoiser.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items() if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in base.items())  # the reference (adapter off) is untouched
