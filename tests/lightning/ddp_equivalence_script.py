"""Run one DGPO optimizer step on fixed groups and save the gradient (used by test_lightning_ddp.py).

    python ddp_equivalence_script.py WORLD_PATH OUT.pt DEVICES [ddp|fsdp] [full|lora]

With DEVICES=2 each rank holds half of the groups; with 1 the single process holds all of them.
``fsdp`` shards the denoiser with FSDP2 through Lightning's ModelParallelStrategy.
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from dgpo_lightning.algo import group_advantages
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.objectives import GroupBatch

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle", "a photo of a green square"]
GROUP_SIZE = 3


def groups(ids):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(len(PROMPTS) * GROUP_SIZE, 3, 32, 32, generator=generator)
    rewards = torch.rand(len(PROMPTS) * GROUP_SIZE, generator=generator)
    group_index = torch.arange(len(PROMPTS)).repeat_interleave(GROUP_SIZE)
    advantages = group_advantages(rewards, group_index)
    keep = torch.isin(group_index, torch.tensor(ids))
    return GroupBatch(
        latents=latents[keep],
        prompts=[PROMPTS[g] for g in group_index[keep].tolist()],
        advantages=advantages[keep],
        rewards=rewards[keep],
        group_index=group_index[keep],
        sigmas=torch.linspace(1, 0, 5),
    )


class FixedGroups(L.LightningDataModule):
    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        ids = list(range(rank, len(PROMPTS), world))
        return DataLoader([groups(ids)], batch_size=None, collate_fn=lambda b: b)


class SaveGradient(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # FSDP2 grads are sharded DTensors: gather them (a collective, so on every rank).
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in pl_module.trainable_parameters()]
        grad = torch.cat([g.flatten() for g in grads])
        if trainer.is_global_zero:
            torch.save({"grad": grad}, self.out)


if __name__ == "__main__":
    world_path, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parallel = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    finetune = sys.argv[5] if len(sys.argv) > 5 else "full"
    torch.manual_seed(0)
    module = DGPOModule(
        model_path=world_path, beta=40.0, kl_beta=0.05, timesteps_per_sample=2, grad_clip=None, finetune=finetune, lora_rank=4
    )
    if devices == 1:
        strategy = "auto"
    elif parallel == "fsdp":
        strategy = L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SaveGradient(out)],
    )
    trainer.fit(module, FixedGroups())
    if trainer.is_global_zero:
        saved = torch.load(out)
        saved["loss"] = float(trainer.callback_metrics["train/loss"])
        torch.save(saved, out)
