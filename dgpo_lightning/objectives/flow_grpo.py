"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): PPO's clipped policy gradient on SDE transitions.

For ``K`` stored transitions ``x_{σ_s} → x_{σ_{s+1}}`` per sample (drawn per step from the
stochastic ones), ``ρ = exp(log p_θ − log p_old)`` with per-dimension mean log-densities and
``loss = mean(max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c))) + kl_β · KL`` (:func:`dgpo_lightning.algo.flow_grpo_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dgpo_lightning.algo import flow_grpo_loss, velocity_kl
from dgpo_lightning.models.backbone import index_conditioning
from dgpo_lightning.objectives.base import (
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    TrainingSettings,
    micro_batched_backward,
    reference_velocity,
    register,
    repeat_for_timesteps,
    rows,
    sample_chunks,
)
from dgpo_lightning.objectives.batch import GroupBatch
from dgpo_lightning.sampling import sde_step_log_prob


@register("flow_grpo")
class FlowGRPO(Objective):
    """Flow-GRPO's clipped policy gradient on the rollout's own SDE transitions."""

    needs = RolloutNeeds(sampler="sde", trajectory=True)

    def __init__(self, settings: TrainingSettings, **options):
        super().__init__(settings, **options)
        if settings.clip_range is None:
            raise ValueError("model.clip_range=None: flow_grpo needs its ratio clip (e.g. 1e-4)")

    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        s = self.settings
        if batch.trajectory is None or batch.log_probs is None:
            raise ValueError("flow_grpo trains on SDE transitions: set data.sampler=sde")
        trajectory = batch.trajectory.to(ctx.device)  # [N, S + 1, ...]
        old_log_probs = batch.log_probs.to(ctx.device)  # [N, S]
        sigmas = batch.sigmas.to(ctx.device)
        n = old_log_probs.shape[0]
        # A step ending at sigma = 0 is deterministic (no noise), so it has no likelihood to train.
        candidates = (sigmas[1:] > 0).nonzero().flatten()
        k = min(s.timesteps_per_sample, candidates.numel())
        salt = int(batch.group_index.min())
        steps = candidates[torch.randperm(candidates.numel(), generator=ctx.generator(salt))[:k].to(ctx.device)]
        x_t = trajectory[:, steps].transpose(0, 1).reshape(k * n, *trajectory.shape[2:])
        x_next = trajectory[:, steps + 1].transpose(0, 1).reshape(k * n, *trajectory.shape[2:])
        sigma = sigmas[steps].repeat_interleave(n)
        sigma_next = sigmas[steps + 1].repeat_interleave(n)
        cond = repeat_for_timesteps(ctx.backbone.encode_prompts(list(batch.prompts)), k)
        # The ratio must use the sampler settings the transitions were drawn with.
        guidance = float(batch.settings.guidance_scale if batch.settings.guidance_scale is not None else s.train_guidance_scale)
        noise_level = float(batch.settings.noise_level)
        v_reference = reference_velocity(ctx, s, x_t, sigma, cond) if s.kl_beta > 0 else None
        # Flow-GRPO puts the per-dimension mean log-density in the ratio (a sum over thousands of
        # dimensions would overflow exp(log-ratio) after the first update).
        dims = x_t[0].numel()
        old = old_log_probs[:, steps].T.reshape(-1) / dims
        adv = batch.advantages.to(ctx.device).repeat(k)

        def forward(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            r = rows(idx, n, k)
            v = ctx.velocity(x_t[r], sigma[r], index_conditioning(cond, r), guidance)
            log_probs = sde_step_log_prob(v, x_t[r], x_next[r], sigma[r], sigma_next[r], noise_level=noise_level) / dims
            kl = velocity_kl(v, v_reference[r]).mean() if v_reference is not None else v.new_zeros(())
            return log_probs, kl, r

        def loss_of(out, idx: Tensor, coupling) -> tuple[Tensor, dict[str, Tensor]]:
            log_probs, kl, r = out
            loss, stats = flow_grpo_loss(log_probs, old[r], adv[r], clip_range=s.clip_range)
            share = idx.numel() / n
            named = {**stats._asdict(), "kl": kl.detach()}
            return (loss + s.kl_beta * kl) * share, {key: share * value for key, value in named.items()}

        return micro_batched_backward(ctx, sample_chunks(n, s.micro_batch_size, ctx.device), forward, loss_of)
