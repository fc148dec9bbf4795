"""DiffusionNFT (Zheng et al., NVlabs 2025, arXiv 2509.16117): online RL on the forward process.

Each sample is noised on the forward process (``K`` timesteps ``t ∈ [t_min, t_max]`` and noises shared
inside the group, :func:`~dgpo_lightning.objectives.base.noisy_copies`) and the trained velocity
``v_θ`` is fitted through two implicit policies around the old policy ``v_old``,

    v⁺ = β·v_θ + (1 − β)·v_old,    v⁻ = (1 + β)·v_old − β·v_θ,
    loss = c · mean_rows (r·L⁺ + (1 − r)·L⁻) / β + kl_β · mean_rows ‖v_θ − v_ref‖²,

with ``r = ½ + ½·clip(A/c, −1, 1)`` the optimality probability of the sample's advantage and ``L±`` the
adaptively weighted x0-regression errors (:func:`dgpo_lightning.algo.nft_loss`,
:func:`dgpo_lightning.algo.optimality_probability`). Facts from the official code
(github.com/NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py``, ``config/nft.py``, ``config/base.py``):

- ``β`` (``config.beta``): 1.0 by default (GenEval, PickScore, HPSv2), 0.1 for OCR and multi-reward.
- ``c`` (``train.adv_clip_max``): 5, both the saturation of ``r`` and the loss multiplier.
- Advantages: group mean, global std (``sample.global_std=True``) plus 1e-4 — ``data.advantage_std: global``.
- KL to the reference (the LoRA-disabled base): ``train.beta`` = 1e-4 (SD3) — ``model.kl_beta``.
- The old policy is a soft EMA of the trained weights, ``θ_old ← η·θ_old + (1 − η)·θ`` with
  ``η = min(0.001·step, 0.5)`` (``decay_type=1``; OCR: ``decay_type=2``, which holds η = 0 for 75
  steps, then ``min(0.0075·(step − 75), 0.999)``), applied once per epoch. Here it is the module's
  :class:`~dgpo_lightning.models.reference.OldPolicy` (``model.old_policy=true`` with
  ``old_policy_decay_max: 0.5``, ``old_policy_decay_rate: 0.001``), updated after every optimizer step.
- CFG-free: rollouts at guidance 1 (``sample.guidance_scale=1.0``) and the losses without CFG; any
  solver (official: deterministic ``dpm2``, 10 steps), so ``needs`` asks for no SDE and no trajectory.

Rollouts sample with the old policy as the official script does when ``model.old_policy_rollouts_after:
0`` (``experiments/base/world_diffusion_nft.yaml`` sets it). Differences from the official script,
by design of this framework: timesteps are drawn ``t ~ U[t_min, t_max]``
(official: ``int(0.99·num_steps)`` of the sampler's own timesteps per sample, fresh noise per sample).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from dgpo_lightning.algo import nft_loss, optimality_probability, velocity_kl
from dgpo_lightning.errors import check
from dgpo_lightning.models.backbone import index_conditioning
from dgpo_lightning.objectives.base import (
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    TrainingSettings,
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


@register("diffusion_nft")
class DiffusionNFT(Objective):
    """DiffusionNFT on ODE (or SDE) rollouts; exact gradients for any ``micro_batch_size``.

    Options (``model.algorithm_options``):
        beta: ``β > 0`` of the implicit policies (official default 1.0). Not ``model.beta``, which is
            DGPO's implicit-reward scale and unused here.
        advantage_max: ``c > 0``: ``r`` saturates at ``A = ±c``, and the loss is multiplied by ``c``
            (official ``adv_clip_max`` 5).
        adaptive_weighting: the paper's self-normalised x0 regression (default) or the plain
            velocity error.
    """

    needs = RolloutNeeds(sampler="any", trajectory=False)
    uses_old_policy = True

    def __init__(self, settings: TrainingSettings, *, beta: float = 1.0, advantage_max: float = 5.0,
                 adaptive_weighting: bool = True, **options: Any):
        super().__init__(settings, **options)
        finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        check(finite(beta) and beta > 0, "model.algorithm_options.beta", beta, "must be a finite number > 0 (DiffusionNFT's β; official 1.0)")
        check(finite(advantage_max) and advantage_max > 0, "model.algorithm_options.advantage_max", advantage_max,
              "must be a finite number > 0 (official adv_clip_max 5)")
        check(isinstance(adaptive_weighting, bool), "model.algorithm_options.adaptive_weighting", adaptive_weighting, "must be true or false")
        check(settings.clip_range is None, "model.clip_range", settings.clip_range,
              "is not used by diffusion_nft (no ratio clip: the old policy and β bound the step); set it to null")
        self.beta, self.advantage_max, self.adaptive_weighting = float(beta), float(advantage_max), adaptive_weighting

    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        s = self.settings
        if ctx.old_velocity is None:
            raise ValueError("diffusion_nft builds its implicit policies around the old policy: set model.old_policy=true "
                             "(official soft update: model.old_policy_decay_max=0.5, model.old_policy_decay_rate=0.001)")
        k = s.timesteps_per_sample
        x0 = batch.latents.to(ctx.device)
        n = x0.shape[0]
        group_ids, groups = batch.group_index.to(ctx.device).unique(return_inverse=True)
        x_t, t, target = noisy_copies(x0, groups, group_ids, ctx, k=k, t_min=s.t_min, t_max=s.t_max)
        cond = repeat_for_timesteps(ctx.backbone.encode_prompts(list(batch.prompts)), k)
        guidance = s.train_guidance_scale
        v_old = chunked(ctx.old_velocity, x_t, t, cond, guidance, s.micro_batch_size)
        v_reference = reference_velocity(ctx, s, x_t, t, cond) if s.kl_beta > 0 else None
        optimality = optimality_probability(batch.advantages.to(ctx.device), self.advantage_max).repeat(k)  # k-major rows

        def forward(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            r = rows(idx, n, k)
            v = ctx.velocity(x_t[r], t[r], index_conditioning(cond, r), guidance)
            kl = velocity_kl(v, v_reference[r]).mean() if v_reference is not None else v.new_zeros(())
            return v, kl, r

        def loss_of(out, idx: Tensor, coupling) -> tuple[Tensor, dict[str, Tensor]]:
            v, kl, r = out
            loss, stats = nft_loss(v, v_old[r], target[r], t[r], optimality[r], beta=self.beta,
                                   adaptive_weighting=self.adaptive_weighting, scale=self.advantage_max)
            share = idx.numel() / n  # every sample has K rows: a chunk's share of the row mean
            named = {"nft_positive_loss": stats.positive_loss, "nft_negative_loss": stats.negative_loss,
                     "old_deviation": stats.old_deviation, "kl": kl.detach()}
            return (loss + s.kl_beta * kl) * share, {key: share * value for key, value in named.items()}

        return micro_batched_backward(ctx, sample_chunks(n, s.micro_batch_size, ctx.device), forward, loss_of)
