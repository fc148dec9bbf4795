"""DGPO (Luo, Hu, Tang, ICLR 2026): the group Bradley–Terry loss on Diffusion-DPO implicit rewards.

Per group ``g`` with advantages ``A_i`` (or another signed weighting ``w_i``, ``Σ_g w_i = 0``):

    z_g = (β/|g|) · Σ_{i∈g} w_i · (ℓ_θ(x_i) − ℓ_ref(x_i)),     loss = mean_g softplus(z_g) + kl_β · KL,

with ``ℓ(x) = mean_k ‖v(x_{t_k}, t_k, c) − (ε_k − x_0)‖²`` over ``K`` timesteps ``t_k ∈ [t_min, t_max]``
and noises shared inside the group (see :func:`dgpo_lightning.algo.dgpo_loss`). Optionally the
official PPO-style clip detaches ``ℓ_θ`` of samples that already moved far enough from the old
policy (:func:`dgpo_lightning.algo.ppo_clip_mask`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dgpo_lightning.algo import denoising_error, dgpo_group_weight, dgpo_loss, group_weights, ppo_clip_mask, velocity_kl
from dgpo_lightning.models.backbone import index_conditioning
from dgpo_lightning.objectives.base import (
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    chunked,
    micro_batched_backward,
    noisy_copies,
    reference_velocity,
    register,
    repeat_for_timesteps,
    rows,
    sample_chunks,
)
from dgpo_lightning.objectives.batch import GroupBatch


class _Errors(NamedTuple):
    dsm: Tensor  # [n] online denoising error, mean over the K timesteps
    kl: Tensor  # [n] velocity KL to the reference, mean over the K timesteps


@register("dgpo")
class DGPO(Objective):
    """DGPO on ODE (or SDE) rollouts; exact gradients for any ``micro_batch_size``."""

    needs = RolloutNeeds(sampler="any", trajectory=False)
    uses_old_policy = True

    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        s = self.settings
        k = s.timesteps_per_sample
        x0 = batch.latents.to(ctx.device)
        n = x0.shape[0]
        group_ids, groups = batch.group_index.to(ctx.device).unique(return_inverse=True)
        num_groups = group_ids.numel()
        weights = group_weights(batch.advantages.to(ctx.device), groups, scheme=s.group_weighting)
        x_t, t, target = noisy_copies(x0, groups, group_ids, ctx, k=k, t_min=s.t_min, t_max=s.t_max)
        cond = repeat_for_timesteps(ctx.backbone.encode_prompts(list(batch.prompts)), k)
        guidance = s.train_guidance_scale
        v_reference = reference_velocity(ctx, s, x_t, t, cond)
        dsm_reference = denoising_error(v_reference, target).view(k, n).mean(0)
        dsm_old = None
        if s.clip_range is not None:
            if ctx.old_velocity is None:
                dsm_old = dsm_reference  # the slow EMA reference doubles as the old policy
            else:
                v_old = chunked(ctx.old_velocity, x_t, t, cond, guidance, s.micro_batch_size)
                dsm_old = denoising_error(v_old, target).view(k, n).mean(0)
        logs: dict[str, Tensor] = {}

        def forward(idx: Tensor) -> _Errors:
            r = rows(idx, n, k)
            v = ctx.velocity(x_t[r], t[r], index_conditioning(cond, r), guidance)
            return _Errors(denoising_error(v, target[r]).view(k, -1).mean(0), velocity_kl(v, v_reference[r]).view(k, -1).mean(0))

        def keep_mask(dsm: Tensor) -> Tensor:
            if dsm_old is None:
                return torch.ones_like(dsm, dtype=torch.bool)
            keep = ppo_clip_mask(dsm, dsm_old, weights, s.clip_range)
            logs["clip_frac"] = 1.0 - keep.float().mean()
            return keep

        def whole(out: _Errors, keep: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            dsm = torch.where(keep, out.dsm, out.dsm.detach())
            loss, stats = dgpo_loss(dsm, dsm_reference, weights, groups, beta=s.beta)
            return loss + s.kl_beta * out.kl.mean(), self._stats(stats, out, dsm_reference)

        def couple(out: _Errors):
            keep = keep_mask(out.dsm)
            loss, stats = whole(out, keep)
            sigmoid = dgpo_group_weight(out.dsm, dsm_reference, weights, groups, beta=s.beta)
            return (sigmoid, torch.bincount(groups)[groups], keep), loss, stats

        def loss_of(out: _Errors, idx: Tensor, coupling) -> tuple[Tensor, dict[str, Tensor]]:
            if coupling is None:  # the whole batch in one pass
                return whole(out, keep_mask(out.dsm))
            sigmoid, sizes, keep = coupling
            dsm = torch.where(keep[idx], out.dsm, out.dsm.detach())
            part, _ = dgpo_loss(
                dsm, dsm_reference[idx], weights[idx], groups[idx], beta=s.beta,
                group_weight=sigmoid[idx], group_size=sizes[idx], num_groups=num_groups,
            )
            return part + s.kl_beta * out.kl.sum() / n, {}

        out = micro_batched_backward(ctx, sample_chunks(n, s.micro_batch_size, ctx.device), forward, loss_of, couple=couple)
        out.stats.update({key: value.detach() for key, value in logs.items()})
        return out

    @staticmethod
    def _stats(stats, out: _Errors, dsm_reference: Tensor) -> dict[str, Tensor]:
        return {
            "dgpo_sigmoid_weight": stats.sigmoid_weight,
            "reward_margin": stats.reward_margin,
            "reward_accuracy": stats.reward_accuracy,
            "zero_advantage_frac": stats.zero_advantage_frac,
            "kl": out.kl.mean().detach(),
            "dsm_gap": (out.dsm - dsm_reference).mean().detach(),
        }
