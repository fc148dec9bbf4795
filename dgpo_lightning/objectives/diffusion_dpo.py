"""Online Diffusion-DPO (Wallace et al. 2023) on each group's best/worst pair, or on all its pairs.

``loss = mean_pairs softplus(β·((ℓ_θ,w − ℓ_ref,w) − (ℓ_θ,l − ℓ_ref,l))) + kl_β · KL``; winner and
loser of a pair share their timesteps and noise (:func:`dgpo_lightning.algo.diffusion_dpo_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dgpo_lightning.algo import all_preference_pairs, best_worst_pairs, denoising_error, diffusion_dpo_loss, velocity_kl
from dgpo_lightning.models.backbone import index_conditioning
from dgpo_lightning.objectives.base import (
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    micro_batched_backward,
    noisy_copies,
    reference_velocity,
    register,
    repeat_for_timesteps,
    rows,
    sample_chunks,
)
from dgpo_lightning.objectives.batch import GroupBatch


@register("diffusion_dpo")
class DiffusionDPO(Objective):
    """Pairwise Diffusion-DPO on online rollouts (the paper's pairwise baseline).

    Options (``model.algorithm_options``):
        pairs: ``best_worst`` (default: one pair per group, its best and worst sample) or ``all``
            (every pair of the group with different rewards, :func:`~dgpo_lightning.algo.all_preference_pairs`;
            up to G(G−1)/2 pairs, each at the cost of two samples).
    """

    needs = RolloutNeeds(sampler="any", trajectory=False)
    PAIRINGS = {"best_worst": best_worst_pairs, "all": all_preference_pairs}

    def __init__(self, settings, *, pairs: str = "best_worst", **options: Any):
        super().__init__(settings, **options)
        if pairs not in self.PAIRINGS:
            raise ValueError(f"model.algorithm_options.pairs: {pairs!r} is not one of {', '.join(self.PAIRINGS)}")
        self.pairing = self.PAIRINGS[pairs]

    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        s = self.settings
        k = s.timesteps_per_sample
        winners, losers = self.pairing(batch.rewards, batch.group_index)
        if winners.numel() == 0:
            raise ValueError("diffusion_dpo got a batch without any pair of different rewards; set data.skip_zero_std_groups=true")
        pairs = torch.cat([winners, losers])
        num_pairs = winners.numel()
        x0 = batch.latents[pairs].to(ctx.device)
        pair_of = torch.arange(num_pairs, device=ctx.device).repeat(2)
        x_t, t, target = noisy_copies(x0, pair_of, batch.group_index[winners], ctx, k=k, t_min=s.t_min, t_max=s.t_max)
        cond = repeat_for_timesteps(ctx.backbone.encode_prompts([batch.prompts[i] for i in pairs.tolist()]), k)
        guidance = s.train_guidance_scale
        v_reference = reference_velocity(ctx, s, x_t, t, cond)
        dsm_reference = denoising_error(v_reference, target).view(k, 2 * num_pairs).mean(0)

        def forward(idx: Tensor) -> tuple[Tensor, Tensor]:  # idx: pair numbers; winner i, loser num_pairs + i
            r = rows(torch.cat([idx, idx + num_pairs]), 2 * num_pairs, k)
            v = ctx.velocity(x_t[r], t[r], index_conditioning(cond, r), guidance)
            return denoising_error(v, target[r]).view(k, -1).mean(0), velocity_kl(v, v_reference[r]).mean()

        def loss_of(out: tuple[Tensor, Tensor], idx: Tensor, coupling) -> tuple[Tensor, dict[str, Tensor]]:
            dsm, kl = out
            m = idx.numel()
            loss, stats = diffusion_dpo_loss(dsm[:m], dsm_reference[idx], dsm[m:], dsm_reference[idx + num_pairs], beta=s.beta)
            share = m / num_pairs
            named = {"reward_margin": stats.reward_margin, "reward_accuracy": stats.reward_accuracy,
                     "dpo_sigmoid_weight": stats.sigmoid_weight, "kl": kl.detach()}
            return (loss + s.kl_beta * kl) * share, {key: share * value for key, value in named.items()}

        return micro_batched_backward(ctx, sample_chunks(num_pairs, s.micro_batch_size, ctx.device), forward, loss_of)
