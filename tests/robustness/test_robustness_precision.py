"""bf16 on CPU: one DGPO optimizer step under ``Trainer(precision="bf16-true")`` and ``"bf16-mixed"``.

Lightning and torch 2.13 accept both on CPU (``bf16-mixed`` is CPU autocast, ``bf16-true`` casts the
module's weights to bfloat16). The step runs on fixed batches of whole groups (the training step
alone) and through ``RolloutDataModule`` (rollout + step).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.data.rollout import generate_groups
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone as load_world

PROMPTS = [{"prompt": "a photo of a red circle"}, {"prompt": "a photo of two blue squares"}]


def trainer(tmp_path, precision, **kwargs):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, precision=precision, reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


@pytest.fixture(scope="module")
def fixed_batches(tiny_world_path):
    """Two batches of one whole group each, rolled out in fp32 outside any Trainer."""
    reward = WeightedReward({"brightness": lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3))})
    rollout = generate_groups(load_world(tiny_world_path), PROMPTS, 4, reward, seed=0, settings=SamplerSettings(num_steps=2))
    assert rollout.advantages.abs().sum() > 0  # the step has a preference to learn
    return rollout.batches(1)


class AutocastProbe(L.Callback):
    """Records whether CPU autocast is on, and in which dtype, while the training step runs."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        original = module.backbone.velocity

        def velocity(*args, **kwargs):
            out = original(*args, **kwargs)
            self.seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
            return out

        module.backbone.velocity = velocity

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        del module.backbone.velocity  # back to the class method


def trainable_snapshot(module):
    return [p.detach().float().clone() for p in module.trainable_parameters()]


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_one_dgpo_step_in_bf16_on_fixed_batches(tmp_path, tiny_world_path, fixed_batches, precision, finetune):
    module = DGPOModule(model_path=str(tiny_world_path), finetune=finetune, lora_rank=4, lr=1e-2, t_min=0.3)
    module.configure_model()
    with torch.no_grad():  # move the online model off the reference so the step has a non-trivial loss
        generator = torch.Generator().manual_seed(0)
        for p in module.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    probe = AutocastProbe()
    run = trainer(tmp_path, precision, callbacks=[probe])
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):  # after Lightning cast the weights
            nonlocal before
            before = trainable_snapshot(module)

    run.callbacks.append(Snapshot())
    run.fit(module, train_dataloaders=DataLoader(fixed_batches, batch_size=None, collate_fn=lambda b: b))
    assert run.global_step == 1
    loss = run.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0
    after = trainable_snapshot(module)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the optimizer step changed nothing"
    dtypes = {p.dtype for p in module.backbone.denoiser.parameters()}
    if precision == "bf16-true":
        assert dtypes == {torch.bfloat16}
        assert probe.seen and all(not autocast and dtype == torch.bfloat16 for autocast, dtype in probe.seen)
    else:
        assert dtypes == {torch.float32}  # mixed: fp32 master weights, bf16 compute under autocast
        assert probe.seen and all(autocast for autocast, _ in probe.seen)


@pytest.mark.parametrize(
    "precision",
    [
        "bf16-true",
        "bf16-mixed",
    ],
)
def test_one_dgpo_step_in_bf16_through_the_rollout_datamodule(tmp_path, tiny_world_path, precision):
    module = DGPOModule(model_path=str(tiny_world_path), lr=1e-2, t_min=0.3)
    data = RolloutDataModule(
        group_size=3, prompts_per_rank=2, num_steps=2, rewards={"test_brightness": 1.0}, eval_prompts=None, progress=False
    )
    run = trainer(tmp_path, precision)
    run.fit(module, data)
    assert run.global_step == 1
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert torch.isfinite(data.last_rollout.rewards).all()


@pytest.fixture(scope="module")
def tiny_sd3_path(tmp_path_factory):
    from dgpo_lightning.models.testing import build_tiny_sd3

    path = tmp_path_factory.mktemp("tiny_sd3") / "sd3"
    build_tiny_sd3(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("backbone", ["world", "sd3"])
def test_flow_grpo_first_step_is_on_policy_with_a_bf16_denoiser(tiny_world_path, tiny_sd3_path, backbone):
    """Right after an SDE rollout the policy has not moved: every ratio is 1 and nothing is clipped,
    also when the base model is bf16 (SD3.5-M is trained as a bf16 base with fp32 LoRA adapters)."""
    if backbone == "world":
        module = DGPOModule(model_path=str(tiny_world_path), algorithm="flow_grpo", clip_range=1e-4, timesteps_per_sample=4)
        module.configure_model()
        module.to(torch.bfloat16)
    else:
        module = DGPOModule(
            backbone="sd3", model_path=str(tiny_sd3_path), backbone_options={"resolution": 32, "torch_dtype": "bfloat16"},
            finetune="lora", lora_rank=4, algorithm="flow_grpo", clip_range=1e-4, timesteps_per_sample=2,
        )
        module.configure_model()
    assert next(module.backbone.denoiser.parameters()).dtype == torch.bfloat16
    reward = WeightedReward({"brightness": lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3))})
    settings = SamplerSettings("sde", num_steps=4)
    rollout = generate_groups(module.backbone, PROMPTS, 3, reward, seed=0, settings=settings, keep_trajectory=True)
    _, logs = module.backward_step(rollout.batches(2)[0])  # no Trainer: a plain loss.backward()
    assert float(logs["clip_frac"]) == 0.0
    assert abs(float(logs["ratio_mean"]) - 1.0) < 1e-5


def test_flow_grpo_under_bf16_true_is_on_policy_or_refused(tmp_path, tiny_world_path):
    module = DGPOModule(model_path=str(tiny_world_path), algorithm="flow_grpo", clip_range=1e-4, timesteps_per_sample=4)
    data = RolloutDataModule(
        group_size=3, prompts_per_rank=2, num_steps=4, sampler="sde", rewards={"test_brightness": 1.0},
        eval_prompts=None, progress=False,
    )
    run = trainer(tmp_path, "bf16-true")
    try:
        run.fit(module, data)
    except ValueError as error:  # refusing the combination up front, naming the setting, is fine too
        assert "precision" in str(error)
        return
    assert run.global_step == 1
    assert float(run.callback_metrics["train/clip_frac"]) == 0.0
