"""TDM-R1 (Luo, Hu, Luo, Tang, arXiv 2603.07700): RL for few-step generators with non-differentiable rewards.

A few-step student samples deterministic trajectories ``x_{t_0} = noise → … → x_{t_S} = x0`` (the
rollout's stored trajectory, ``RolloutNeeds(trajectory=True)``). Each optimizer step trains three
models in turn, on ``M`` trajectory steps ``j`` drawn without replacement (shared by the batch):

1. **fake score** ``v_fake`` (TDM's "fake" adapter): flow matching on the generator's own one-step
   outputs noised above ``t_{j+1}`` (:func:`~dgpo_lightning.algo.fake_score_loss`);
2. **surrogate reward** ``v_sur`` ("dgpo" adapter): DGPO's group preference loss on the *stored*
   states ``x_{t_{j'+1}}`` noised to ``τ_r``, with the old-surrogate ratio clip and the teacher clip
   (:func:`~dgpo_lightning.algo.surrogate_clip_masks`, :func:`~dgpo_lightning.algo.surrogate_reward_loss`);
   ``j'`` is drawn with ``P(j') ∝ j' + 1``. Its old copy is an EMA with decay
   ``min(0.3, 0.001 + 0.001·step)`` updated after every surrogate step;
3. **generator** (the online model): its one-step ``x̂0 = x_{t_j} − t_j·v`` moves along the teacher's
   CFG direction, teacher minus fake (distribution matching) and surrogate minus teacher (the learned
   reward) (:func:`~dgpo_lightning.algo.generator_loss`). The module then steps the online optimizer.

The teacher (real score) is the frozen multi-step model: ``teacher_path: null`` uses the module's
reference (the starting weights: LoRA disabled, or the frozen copy; keep ``model.reference: initial``),
a path loads another checkpoint through the same backbone loader. The fake score and the surrogate
start from the teacher's weights (official: fresh adapters on the teacher's base).

Options (``model.algorithm_options``), official defaults from github.com/Luo-Yihong/TDM-R1
``config/tdmr1_clean.py`` (``compressibility()`` base, ``geneval_sd3_8gpu_G24_24_4step``) and
``scripts/train_tdmr1_pub.py``:

- ``trained_steps`` ``M`` = 2 (``num_train_timesteps``).
- ``fake_reg`` 0.02 (hard-coded ``0.02·loss_reg_fake``).
- ``surrogate_beta`` 1 (``train.beta_dpo``; 10 for OCR / HPS), ``surrogate_reg`` 0.001 (``train.beta``),
  ``surrogate_clip`` 1e-3 (``clip_range``; 2e-3 ImageReward / HPS), ``reference_clip_threshold`` 0.05
  (``reg_threshold``), ``time_weighting`` true (``use_tweight``: the surrogate loss × ``(j' + 1)/S``).
- ``t_min_reward`` 0.55 (``t_min_dgpo_reward`` 550; 0.3 OCR), ``t_min_generator`` 0.25
  (``t_min_dgpo`` of the GenEval config, 250; 0.3 OCR, 0.4 ImageReward / HPS).
- ``teacher_guidance`` 4.5 and ``cfg_reward_scale`` 3.5 (both hard-coded in the generator step),
  ``surrogate_guidance`` 4.5 (``rl_cfg``; 2.5 GenEval, 3.5 ImageReward / HPS).
- ``tdm_weight`` 0.3 (``train.tdm_weight``), ``trunc_steps`` 4 (2 for ImageReward / HPS): steps
  ``j >= trunc_steps`` drop the reward term.
- ``shift`` 3: every ``τ`` is uniform in the unshifted time (shift 3) above its bound + 0.02
  (``inv_convert(…, s=3) + 20``).
- ``advantage_clip`` 5 (``advantages.clip(-5, 5)`` before the surrogate loss).
- ``auxiliary_lr_scale`` 4: fake score and surrogate learn at 4 × the generator's learning rate
  (official: generator ``learning_rate / 4``, the other two ``learning_rate``; here ``model.lr`` — or
  the ``lr`` of ``model.optimizer`` — is the generator's). Betas: fake ``(0, 0.999)``
  (``train.adam_beta1 = 0``), surrogate ``(0.9, 0.999)`` (``rl_adam_beta1/2``); the generator's come
  from ``model.optimizer`` (official ``(0, 0.999)``). Weight decay and the grad-norm clip
  (``model.weight_decay``, ``model.grad_clip``) apply to each model, clipped separately.
- ``old_surrogate_decay_min`` 0.001, ``old_surrogate_decay_max`` 0.3 (``ema_old_decay_min/max``).
- ``teacher_path`` null; ``aux_finetune`` ``full`` | ``lora`` (``aux_lora_rank`` 32, ``aux_lora_alpha``
  null = 2·rank: the official r32 / alpha 64 adapters).

Cost. ``aux_finetune: full`` keeps two trained copies of the denoiser with their AdamW states (and a
third, the old surrogate's average; plus the teacher when ``teacher_path`` is set): nothing for the
embedded world, ~4× the denoiser's memory on a 2B+ model. ``lora`` copies the frozen base twice but
trains (and checkpoints) only the adapters; the old surrogate averages the adapter tensors only. The
official script shares one base among three adapters (peft ``add_adapter`` + ``set_adapter`` on the one
transformer, the teacher being ``disable_adapter``), which costs no copy at all; that needs named
adapters in :mod:`dgpo_lightning.models.lora` and is not done here.

Draws. Per step ``s`` everything is a function of ``(seed, s, …)``: the step-level draws (the ``M``
steps, ``j'``, the uniform ``u`` of each ``τ``, one scalar each, shared by all samples) come from
salt :data:`STEP_SALT`; per group ``g`` (salt = its group id) one generator draws, for each trained
step, the fake score's noise (per sample), the surrogate's noise (one per group), the generator's
noise at ``τ`` (per sample) and at ``τ_d`` (one per group) — the official sharing.

Differences from the official script. The official run accumulates gradients over half an epoch's
batches (``gradient_accumulation_steps = num_batches_per_epoch``, two updates per epoch); here one
batch is one update of each model with its gradients accumulated over the ``M`` trained steps, so
``data.groups_per_batch = data.prompts_per_rank / 2`` gives the official two updates per rollout. The
generator's targets are computed with the fake score and the surrogate already updated at this step
(officially only at the last accumulation step). Gradients are clipped per model (officially one
norm over the shared transformer). The teacher's CFG is the plain ``v_u + s·(v_c − v_u)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from dgpo_lightning.algo import (
    denoising_error,
    dgpo_group_weight,
    draw_tau,
    fake_score_loss,
    fake_score_target,
    forward_transition,
    generator_loss,
    reward_step_probabilities,
    surrogate_clip_masks,
    surrogate_reward_loss,
    surrogate_target,
)
from dgpo_lightning.errors import check
from dgpo_lightning.models.backbone import Conditioning, index_conditioning
from dgpo_lightning.objectives.base import (
    Auxiliary,
    AuxiliarySetup,
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    TrainingSettings,
    micro_batched_backward,
    register,
    sample_chunks,
)
from dgpo_lightning.objectives.batch import GroupBatch

#: Salt of the step-level draws (trained steps, ``j'``, the ``τ`` uniforms): above every group id
#: (group ids count the epoch's prompts) and below the seed chain's salt multiplier (65 537).
STEP_SALT = 65_535
#: The gap above each ``τ``'s bound in unshifted time (official ``+ 20`` on the 1000 scale).
TAU_MARGIN = 0.02

_KEY = "model.algorithm_options"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@register("tdm_r1")
class TDMR1(Objective):
    """TDM-R1 on deterministic few-step trajectories (see the module docstring for the options)."""

    needs = RolloutNeeds(sampler="any", trajectory=True)
    uses_old_policy = False

    def __init__(
        self,
        settings: TrainingSettings,
        *,
        trained_steps: int = 2,
        fake_reg: float = 0.02,
        surrogate_beta: float = 1.0,
        surrogate_reg: float = 0.001,
        surrogate_clip: float = 1e-3,
        reference_clip_threshold: float = 0.05,
        t_min_reward: float = 0.55,
        t_min_generator: float = 0.25,
        teacher_guidance: float = 4.5,
        cfg_reward_scale: float = 3.5,
        surrogate_guidance: float = 4.5,
        tdm_weight: float = 0.3,
        trunc_steps: int = 4,
        time_weighting: bool = True,
        shift: float = 3.0,
        advantage_clip: float = 5.0,
        auxiliary_lr_scale: float = 4.0,
        old_surrogate_decay_min: float = 0.001,
        old_surrogate_decay_max: float = 0.3,
        teacher_path: str | None = None,
        aux_finetune: Literal["full", "lora"] = "full",
        aux_lora_rank: int = 32,
        aux_lora_alpha: float | None = None,
        **options: Any,
    ):
        super().__init__(settings, **options)
        integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        check(integer(trained_steps) and trained_steps >= 1, f"{_KEY}.trained_steps", trained_steps, "must be an integer >= 1 (official num_train_timesteps 2)")
        for key, value, hint in (
            ("fake_reg", fake_reg, "official 0.02"), ("surrogate_beta", surrogate_beta, "official beta_dpo 1"),
            ("surrogate_reg", surrogate_reg, "official train.beta 0.001"), ("cfg_reward_scale", cfg_reward_scale, "official 3.5"),
        ):
            check(_finite(value) and value >= 0, f"{_KEY}.{key}", value, f"must be a finite number >= 0 ({hint})")
        for key, value, hint in (
            ("surrogate_clip", surrogate_clip, "official clip_range 1e-3"), ("reference_clip_threshold", reference_clip_threshold, "official reg_threshold 0.05"),
            ("teacher_guidance", teacher_guidance, "official 4.5"), ("surrogate_guidance", surrogate_guidance, "official rl_cfg 4.5, 2.5 GenEval"),
            ("shift", shift, "official 3"), ("advantage_clip", advantage_clip, "official 5"), ("auxiliary_lr_scale", auxiliary_lr_scale, "official 4"),
        ):
            check(_finite(value) and value > 0, f"{_KEY}.{key}", value, f"must be a finite number > 0 ({hint})")
        for key, value, hint in (("t_min_reward", t_min_reward, "official 0.55"), ("t_min_generator", t_min_generator, "official 0.25 GenEval")):
            check(_finite(value) and 0 <= value < 0.9, f"{_KEY}.{key}", value, f"must lie in [0, 0.9) ({hint}; tau needs room above it)")
        check(_finite(tdm_weight) and 0 <= tdm_weight <= 1, f"{_KEY}.tdm_weight", tdm_weight, "must lie in [0, 1] (official 0.3)")
        check(integer(trunc_steps) and trunc_steps >= 0, f"{_KEY}.trunc_steps", trunc_steps, "must be an integer >= 0 (official 4)")
        check(isinstance(time_weighting, bool), f"{_KEY}.time_weighting", time_weighting, "must be true or false")
        check(_finite(old_surrogate_decay_min) and 0 <= old_surrogate_decay_min <= 1, f"{_KEY}.old_surrogate_decay_min", old_surrogate_decay_min, "must lie in [0, 1]")
        check(_finite(old_surrogate_decay_max) and old_surrogate_decay_min <= old_surrogate_decay_max < 1, f"{_KEY}.old_surrogate_decay_max",
              old_surrogate_decay_max, "must lie in [old_surrogate_decay_min, 1)")
        check(teacher_path is None or (isinstance(teacher_path, str) and teacher_path), f"{_KEY}.teacher_path", teacher_path, "must be a path or null")
        check(aux_finetune in ("full", "lora"), f"{_KEY}.aux_finetune", aux_finetune, "must be 'full' or 'lora'")
        check(integer(aux_lora_rank) and aux_lora_rank >= 1, f"{_KEY}.aux_lora_rank", aux_lora_rank, "must be an integer >= 1")
        check(aux_lora_alpha is None or (_finite(aux_lora_alpha) and aux_lora_alpha > 0), f"{_KEY}.aux_lora_alpha", aux_lora_alpha, "must be > 0 or null")
        # Shared settings this objective has no use for: refuse them instead of ignoring them.
        check(settings.clip_range is None, "model.clip_range", settings.clip_range, f"is not used by tdm_r1 (its surrogate's clip is {_KEY}.surrogate_clip); set it to null")
        check(settings.kl_beta == 0, "model.kl_beta", settings.kl_beta, "is not used by tdm_r1 (the fake score's distribution matching regularises the generator); set it to 0")
        check(settings.timesteps_per_sample == 1, "model.timesteps_per_sample", settings.timesteps_per_sample,
              f"is not used by tdm_r1 (it trains {_KEY}.trained_steps trajectory steps); set it to 1")
        check(settings.t_min == 0.0 and settings.t_max == 1.0, "model.t_min", (settings.t_min, settings.t_max),
              f"and model.t_max are not used by tdm_r1 (its bounds are {_KEY}.t_min_reward / t_min_generator); keep 0 and 1")
        check(settings.train_guidance_scale == 1.0, "model.train_guidance_scale", settings.train_guidance_scale,
              "must be 1 for tdm_r1 (the generator's one-step prediction has no CFG; teacher_guidance / surrogate_guidance set the others)")
        check(settings.reference_guidance_scale is None, "model.reference_guidance_scale", settings.reference_guidance_scale,
              f"is not used by tdm_r1 (the teacher's CFG is {_KEY}.teacher_guidance); set it to null")
        self.trained_steps, self.fake_reg = trained_steps, float(fake_reg)
        self.surrogate_beta, self.surrogate_reg, self.surrogate_clip = float(surrogate_beta), float(surrogate_reg), float(surrogate_clip)
        self.reference_clip_threshold = float(reference_clip_threshold)
        self.t_min_reward, self.t_min_generator = float(t_min_reward), float(t_min_generator)
        self.teacher_guidance, self.cfg_reward_scale, self.surrogate_guidance = float(teacher_guidance), float(cfg_reward_scale), float(surrogate_guidance)
        self.tdm_weight, self.trunc_steps, self.time_weighting = float(tdm_weight), trunc_steps, time_weighting
        self.shift, self.advantage_clip, self.auxiliary_lr_scale = float(shift), float(advantage_clip), float(auxiliary_lr_scale)
        self.old_surrogate_decay_min, self.old_surrogate_decay_max = float(old_surrogate_decay_min), float(old_surrogate_decay_max)
        self.teacher_path, self.aux_finetune = teacher_path, aux_finetune
        self.aux_lora_rank, self.aux_lora_alpha = aux_lora_rank, aux_lora_alpha

    # ------------------------------------------------------------------ models

    def auxiliary_models(self, setup: AuxiliarySetup) -> dict[str, Auxiliary]:
        models: dict[str, Auxiliary] = {}
        if self.teacher_path is not None:
            teacher = setup.load_denoiser(self.teacher_path).requires_grad_(False).eval()
            models["teacher"] = Auxiliary(teacher)
        base = models["teacher"].module if "teacher" in models else setup.backbone.denoiser
        copies = [setup.trainable_copy(base, self.aux_finetune, self.aux_lora_rank, self.aux_lora_alpha) for _ in range(2)]
        fake, surrogate = copies
        models["fake"] = Auxiliary(fake, lr_scale=self.auxiliary_lr_scale, betas=(0.0, 0.999))
        models["surrogate"] = Auxiliary(surrogate, lr_scale=self.auxiliary_lr_scale, betas=(0.9, 0.999))
        # The old surrogate averages the surrogate's trained tensors (its decay is set per step here).
        models["old_surrogate"] = Auxiliary(setup.moving_average(surrogate), checkpoint_frozen=True)
        return models

    def old_surrogate_decay(self, step: int) -> float:
        """The old surrogate's EMA decay after step ``step``: ``min(max, min_ + 0.001·step)`` (official)."""
        return min(self.old_surrogate_decay_max, self.old_surrogate_decay_min + 0.001 * int(step))

    # ------------------------------------------------------------------ draws

    def draws(self, ctx: TrainContext, batch: GroupBatch) -> dict[str, Any]:
        """Every random quantity of this step, from ``(seed, step)`` and the group ids alone.

        Returns a dict with ``steps`` (``M`` trained steps ``j``), ``reward_steps`` (``M`` draws
        ``j'``), ``u_tau``, ``u_tau_generator``, ``u_tau_reward`` (``M`` uniforms each) and, ``[M, N, ...]``
        in batch order, ``fake_noise``, ``generator_noise`` (per sample), ``reward_noise`` and
        ``generator_group_noise`` (shared inside each group).
        """
        sigmas = batch.sigmas
        num_steps = sigmas.numel() - 1
        m = self.trained_steps
        g = ctx.generator(STEP_SALT)
        steps = torch.randperm(num_steps, generator=g)[:m]
        reward_steps = torch.multinomial(reward_step_probabilities(num_steps), m, replacement=True, generator=g)
        uniforms = torch.rand(3, m, generator=g, dtype=torch.float64)
        shape = tuple(batch.latents.shape[1:])
        n = len(batch)
        noises = {key: torch.empty(m, n, *shape) for key in ("fake_noise", "generator_noise", "reward_noise", "generator_group_noise")}
        group_ids, groups = batch.group_index.unique(return_inverse=True)
        for position, gid in enumerate(group_ids.tolist()):
            members = torch.nonzero(groups == position).flatten()
            generator = ctx.generator(gid)
            for k in range(m):
                noises["fake_noise"][k, members] = torch.randn((members.numel(), *shape), generator=generator)
                noises["reward_noise"][k, members] = torch.randn((1, *shape), generator=generator).expand(members.numel(), *shape)
                noises["generator_noise"][k, members] = torch.randn((members.numel(), *shape), generator=generator)
                noises["generator_group_noise"][k, members] = torch.randn((1, *shape), generator=generator).expand(members.numel(), *shape)
        return {"steps": steps.tolist(), "reward_steps": reward_steps.tolist(), "u_tau": uniforms[0].tolist(),
                "u_tau_generator": uniforms[1].tolist(), "u_tau_reward": uniforms[2].tolist(), **noises}

    def levels(self, sigmas: Tensor, draws: dict[str, Any], k: int) -> dict[str, float]:
        """The ``k``-th trained step's levels: ``t_j``, ``a = t_{j+1}``, ``τ``, ``τ_d`` and the
        surrogate's ``a_r = t_{j'+1}``, ``τ_r`` (python floats)."""
        j, jr = draws["steps"][k], draws["reward_steps"][k]
        t = float(sigmas[j])
        a = float(sigmas[j + 1])
        tau = float(draw_tau(a, draws["u_tau"][k], shift=self.shift, margin=TAU_MARGIN))
        lower = max(a, self.t_min_generator)
        tau_g = max(float(draw_tau(lower, draws["u_tau_generator"][k], shift=self.shift, margin=TAU_MARGIN)), lower)
        a_r = float(sigmas[jr + 1])
        tau_r = float(draw_tau(max(a_r, self.t_min_reward), draws["u_tau_reward"][k], shift=self.shift, margin=TAU_MARGIN))
        return {"j": j, "t": t, "a": a, "tau": tau, "tau_generator": tau_g, "reward_step": jr, "a_reward": a_r, "tau_reward": tau_r}

    # ------------------------------------------------------------------ step

    def teacher_velocity(self, ctx: TrainContext, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """The teacher's velocity (no gradients): the module's reference, or the ``teacher`` model."""
        with torch.no_grad():
            if "teacher" in ctx.auxiliary:
                return ctx.denoiser_velocity(ctx.auxiliary["teacher"], x, t, cond, guidance_scale)
            return ctx.reference_velocity(x, t, cond, guidance_scale)

    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        if batch.trajectory is None or batch.sigmas is None:
            raise ValueError("tdm_r1 trains on the rollout's trajectory: the batch has none (the module asks the data module for it)")
        for name in ("fake", "surrogate", "old_surrogate"):
            if name not in ctx.auxiliary:
                raise ValueError(f"tdm_r1 needs its auxiliary model {name!r}: build the context through DGPOModule (configure_model)")
        sigmas = batch.sigmas.detach().double().cpu()
        num_steps = sigmas.numel() - 1
        check(self.trained_steps <= num_steps, f"{_KEY}.trained_steps", self.trained_steps, f"exceeds the rollout's {num_steps} sampler steps (data.num_steps)")
        check(batch.trajectory.shape[1] == num_steps + 1, "data.num_steps", num_steps, f"does not match the trajectory's {batch.trajectory.shape[1]} states")
        draws = self.draws(ctx, batch)
        levels = [self.levels(sigmas, draws, k) for k in range(self.trained_steps)]
        cond = ctx.backbone.encode_prompts(list(batch.prompts))
        stats: dict[str, list[Tensor]] = {}

        def record(values: dict[str, Tensor]) -> None:
            for key, value in values.items():
                stats.setdefault(key, []).append(value.detach().float())

        for k, level in enumerate(levels):
            record(self._fake_step(batch, ctx, cond, level, draws["fake_noise"][k]))
        ctx.step_auxiliary("fake")
        for k, level in enumerate(levels):
            record(self._surrogate_step(batch, ctx, cond, level, draws["reward_noise"][k], num_steps))
        ctx.step_auxiliary("surrogate")
        ctx.auxiliary["old_surrogate"].update_with(self.old_surrogate_decay(ctx.step))
        losses = []
        for k, level in enumerate(levels):
            out = self._generator_step(batch, ctx, cond, level, draws["generator_noise"][k], draws["generator_group_noise"][k])
            losses.append(out.loss)
            record(out.stats)
        summary = {key: torch.stack(values).mean() for key, values in stats.items()}
        return StepOutput(torch.stack(losses).sum().detach(), summary)

    def _chunks(self, n: int, device) -> list[Tensor]:
        return sample_chunks(n, self.settings.micro_batch_size, device)

    def _fake_step(self, batch: GroupBatch, ctx: TrainContext, cond: Conditioning, level: dict, noise: Tensor) -> dict[str, Tensor]:
        """Back-propagate ``1/M`` of the fake score's loss at trained step ``level["j"]``."""
        n, device, m = len(batch), ctx.device, self.trained_steps
        x_t = batch.trajectory[:, level["j"]].to(device)
        noise = noise.to(device, x_t.dtype)
        fake = ctx.auxiliary["fake"]

        def forward(idx: Tensor):
            c = index_conditioning(cond, idx)
            t = x_t.new_full((idx.numel(),), level["t"])
            tau = x_t.new_full((idx.numel(),), level["tau"])
            with torch.no_grad():
                v = ctx.velocity(x_t[idx], t, c)
                x0_hat = x_t[idx] - level["t"] * v
                x_next = x_t[idx] - (level["t"] - level["a"]) * v
                x_tau = forward_transition(x_next, level["a"], level["tau"], noise[idx]).x_tau
                target = fake_score_target(x_tau, x0_hat, level["tau"])
                v_real = self.teacher_velocity(ctx, x_tau, tau, c)
            return ctx.denoiser_velocity(fake, x_tau, tau, c), target, v_real

        def loss_of(out, idx: Tensor, coupling):
            v_fake, target, v_real = out
            loss, parts = fake_score_loss(v_fake, target, v_real, reg=self.fake_reg)
            share = idx.numel() / n / m  # every sample has the same size: the chunk's share of the mean
            return loss * share, {"fake_loss": loss.detach() * idx.numel() / n, "fake_regression": parts.regression * idx.numel() / n}

        return micro_batched_backward(ctx, self._chunks(n, device), forward, loss_of).stats

    def _surrogate_step(self, batch: GroupBatch, ctx: TrainContext, cond: Conditioning, level: dict, noise: Tensor, num_steps: int) -> dict[str, Tensor]:
        """Back-propagate ``1/M`` of the surrogate's DGPO loss on the stored state ``x_{t_{j'+1}}``."""
        n, device, m = len(batch), ctx.device, self.trained_steps
        x = batch.trajectory[:, level["reward_step"] + 1].to(device)
        noise = noise.to(device, x.dtype)
        a, tau = level["a_reward"], level["tau_reward"]
        x_tau = forward_transition(x, a, tau, noise).x_tau
        target = surrogate_target(x, noise, a, tau)
        taus = x.new_full((n,), tau)
        _, groups = batch.group_index.to(device).unique(return_inverse=True)
        advantages = batch.advantages.to(device).clamp(-self.advantage_clip, self.advantage_clip)
        surrogate, old = ctx.auxiliary["surrogate"], ctx.auxiliary["old_surrogate"]
        size = self.settings.micro_batch_size or n
        with torch.no_grad():
            v_ref = torch.cat([self.teacher_velocity(ctx, x_tau[i:i + size], taus[i:i + size], index_conditioning(cond, slice(i, i + size)))
                               for i in range(0, n, size)])
            with old.weights():
                v_old = torch.cat([ctx.denoiser_velocity(surrogate, x_tau[i:i + size], taus[i:i + size], index_conditioning(cond, slice(i, i + size)))
                                   for i in range(0, n, size)])
        dsm_ref, dsm_old = denoising_error(v_ref, target), denoising_error(v_old, target)
        weight = (level["reward_step"] + 1) / num_steps if self.time_weighting else 1.0

        def forward(idx: Tensor):
            v = ctx.denoiser_velocity(surrogate, x_tau[idx], taus[idx], index_conditioning(cond, idx))
            return denoising_error(v, target[idx]), denoising_error(v, v_ref[idx])

        def couple(out):
            dsm, reg = out
            gap = reg.detach().mean()
            masks = surrogate_clip_masks(dsm.detach(), dsm_old, dsm_ref, advantages, gap, clip_range=self.surrogate_clip,
                                         reference_threshold=self.reference_clip_threshold)
            sigma = dgpo_group_weight(dsm.detach(), dsm_ref, advantages, groups, beta=self.surrogate_beta)
            kept = torch.where(masks.keep, dsm, dsm.detach())
            loss, _ = surrogate_reward_loss(kept, dsm_ref, advantages, groups, beta=self.surrogate_beta, group_weight=sigma)
            total = weight * (loss + self.surrogate_reg * reg.mean())
            logs = {
                "surrogate_loss": total.detach(), "surrogate_dsm": dsm.detach().mean(), "surrogate_dsm_gap": (dsm.detach() - dsm_ref).mean(),
                "surrogate_reg": gap, "surrogate_clip_frac": masks.ratio_clipped.float().mean(),
                "surrogate_ref_clip_frac": masks.reference_clipped.float().mean(), "surrogate_sigmoid_weight": sigma.mean(),
            }
            return (masks.keep, sigma), total, logs

        def loss_of(out, idx: Tensor, coupling):
            if coupling is None:  # the whole batch in one pass
                _, total, logs = couple(out)
                return total / m, logs
            dsm, reg = out
            keep, sigma = coupling
            kept = torch.where(keep[idx], dsm, dsm.detach())
            loss, _ = surrogate_reward_loss(kept, dsm_ref[idx], advantages[idx], groups[idx], beta=self.surrogate_beta,
                                            group_weight=sigma[idx], num_samples=n)
            return weight * (loss + self.surrogate_reg * reg.sum() / n) / m, {}

        return micro_batched_backward(ctx, self._chunks(n, device), forward, loss_of, couple=couple).stats

    def _generator_step(self, batch: GroupBatch, ctx: TrainContext, cond: Conditioning, level: dict, noise: Tensor,
                        group_noise: Tensor) -> StepOutput:
        """Back-propagate ``1/M`` of the generator's loss at trained step ``level["j"]``."""
        n, device, m = len(batch), ctx.device, self.trained_steps
        x_t = batch.trajectory[:, level["j"]].to(device)
        noise, group_noise = noise.to(device, x_t.dtype), group_noise.to(device, x_t.dtype)
        fake, surrogate = ctx.auxiliary["fake"], ctx.auxiliary["surrogate"]
        with_reward = level["j"] < self.trunc_steps
        tau, tau_g = level["tau"], level["tau_generator"]

        def forward(idx: Tensor):
            c = index_conditioning(cond, idx)
            rows = idx.numel()
            v = ctx.velocity(x_t[idx], x_t.new_full((rows,), level["t"]), c)
            x0_hat = x_t[idx] - level["t"] * v
            # Only x̂0 carries the gradient: every other state and prediction is a detached target.
            x_next = (x_t[idx] - (level["t"] - level["a"]) * v).detach()
            with torch.no_grad():
                taus = x_t.new_full((rows,), tau)
                x_tau = forward_transition(x_next, level["a"], tau, noise[idx]).x_tau
                fake_x0 = x_tau - tau * ctx.denoiser_velocity(fake, x_tau, taus, c)
                v_cond = self.teacher_velocity(ctx, x_tau, taus, c)
                needs_uncond = self.teacher_guidance != 1.0 or self.cfg_reward_scale != 0.0
                v_uncond = self.teacher_velocity(ctx, x_tau, taus, c, 0.0) if needs_uncond else v_cond
                v_guided = v_uncond + self.teacher_guidance * (v_cond - v_uncond)
                targets = {"real_x0": x_tau - tau * v_guided, "real_cond_x0": x_tau - tau * v_cond,
                           "real_uncond_x0": x_tau - tau * v_uncond, "fake_x0": fake_x0}
                if with_reward:
                    taus_g = x_t.new_full((rows,), tau_g)
                    x_tau_g = forward_transition(x_next, level["a"], tau_g, group_noise[idx]).x_tau
                    targets["surrogate_x0"] = x_tau_g - tau_g * ctx.denoiser_velocity(surrogate, x_tau_g, taus_g, c, self.surrogate_guidance)
                    targets["surrogate_reference_x0"] = x_tau_g - tau_g * self.teacher_velocity(ctx, x_tau_g, taus_g, c)
            return x0_hat, targets

        def loss_of(out, idx: Tensor, coupling):
            x0_hat, targets = out
            per_sample, parts = generator_loss(x0_hat, **targets, tdm_weight=self.tdm_weight, cfg_scale=self.cfg_reward_scale)
            logs = {"generator_cfg": parts.cfg.sum() / n, "generator_kl": parts.kl.sum() / n, "generator_weight": parts.weight.sum() / n}
            if with_reward:
                logs.update(generator_reward=parts.reward.sum() / n, generator_reward_weight=parts.reward_weight.sum() / n)
            return per_sample.sum() / n / m, logs

        return micro_batched_backward(ctx, self._chunks(n, device), forward, loss_of)


__all__ = ["STEP_SALT", "TAU_MARGIN", "TDMR1"]
