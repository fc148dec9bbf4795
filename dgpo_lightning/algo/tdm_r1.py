"""TDM-R1's maths: a surrogate reward on the few-step trajectory and a distribution-matching generator.

Luo, Hu, Luo, Tang, "TDM-R1: Reinforcing Few-Step Diffusion Models with Non-Differentiable Reward"
(arXiv 2603.07700). Facts below were read from the official code (github.com/Luo-Yihong/TDM-R1,
``scripts/train_tdmr1_pub.py`` and ``config/tdmr1_clean.py``); the code here is our own.

Time convention as everywhere in :mod:`dgpo_lightning.algo`: ``x_t = (1 − t)·x0 + t·ε``, ``t = 1`` is
noise, ``v = ε − x0`` (the official code's ``1000·t``). A few-step student samples the deterministic
path ``x_{t_0} = noise, …, x_{t_S} = x0`` on the schedule ``t_0 = 1 > t_1 > … > t_S = 0``. Three
models are trained from it, per trained step ``j`` (the generator's one-step predictions from the
stored state ``x_{t_j}`` are ``x̂0 = x_{t_j} − t_j·v`` and ``x̂_{t_{j+1}} = x_{t_j} − (t_j − t_{j+1})·v``):

1. the *fake score* ``v_fake`` regresses the flow of the generator's own outputs
   (:func:`fake_score_target`, :func:`fake_score_loss`);
2. the *surrogate reward* ``v_sur`` is a diffusion model trained with DGPO's group loss on the stored
   states (:func:`surrogate_target`, :func:`surrogate_clip_masks`, :func:`surrogate_reward_loss`);
3. the *generator* moves ``x̂0`` along the teacher-minus-fake (distribution matching), the teacher's
   CFG direction ("CFG as a reward") and the surrogate-minus-teacher (reward) directions
   (:func:`generator_loss`).

All noisy states above ``t_{j+1}`` come from the forward transition of the flow from level ``a`` to
``τ > a`` (:func:`forward_transition`), with ``τ`` drawn uniformly in the *unshifted* time above the
lower bound (:func:`draw_tau`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_finite, check_same_shape, check_vector, compute_dtype
from .loss import dgpo_group_weight
from .regularizers import ppo_clip_mask


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _broadcast(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or ``[N]`` value as ``[N, 1, …, 1]`` (or 0-d) in ``like``'s dtype and device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(f"expected a scalar or [{like.shape[0]}] value, got shape {tuple(value.shape)}")
    return value.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- time draws


def shift_time(u: Tensor | float, shift: float) -> Tensor:
    """The SD3 schedule shift ``σ_s(u) = s·u / (1 + (s − 1)·u)`` (maps ``[0, 1]`` onto itself).

    Args:
        u: times in ``[0, 1]`` (any shape).
        shift: ``s > 0`` (TDM-R1's τ draws: 3).
    """
    shift = _positive("shift", shift)
    u = torch.as_tensor(u, dtype=torch.float64 if not isinstance(u, Tensor) else None)
    return shift * u / (1 + (shift - 1) * u)


def unshift_time(t: Tensor | float, shift: float) -> Tensor:
    """The inverse of :func:`shift_time`: ``u = t / (s − (s − 1)·t)``."""
    shift = _positive("shift", shift)
    t = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, Tensor) else None)
    return t / (shift - (shift - 1) * t)


def draw_tau(lower: Tensor | float, u: Tensor | float, *, shift: float = 3.0, margin: float = 0.02) -> Tensor:
    """TDM-R1's noise level above ``lower``, uniform in the unshifted time.

    ``b = σ_s⁻¹(lower) + margin``, ``τ = σ_s(b + u·(1 − b))`` with ``u ~ U[0, 1)``: ``τ ∈ [σ_s(b), 1)``,
    so ``τ > lower`` always (official: ``inv_convert(lower) + 20`` on the 1000 scale, shift 3, one
    ``u`` per draw shared by every sample of the step).

    Args:
        lower: the bound (a scalar or a tensor of bounds) in ``[0, 1)``.
        u: the uniform draw(s), broadcast against ``lower``.
        shift: ``s`` of the unshifting (3).
        margin: the gap in unshifted time (0.02).

    Returns:
        ``τ`` with the broadcast shape of ``lower`` and ``u``.

    Raises:
        ValueError: if ``σ_s⁻¹(lower) + margin >= 1`` (no room above the bound) or ``u`` is outside ``[0, 1]``.
    """
    lower_t = torch.as_tensor(lower, dtype=torch.float64) if not isinstance(lower, Tensor) else lower
    u_t = torch.as_tensor(u, dtype=lower_t.dtype if lower_t.is_floating_point() else torch.float64) if not isinstance(u, Tensor) else u
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if bool(((lower_t < 0) | (lower_t >= 1)).any()):
        raise ValueError(f"lower must lie in [0, 1), got {lower_t}")
    if bool(((u_t < 0) | (u_t > 1)).any()):
        raise ValueError(f"u must lie in [0, 1], got {u_t}")
    base = unshift_time(lower_t, shift) + margin
    if bool((base >= 1).any()):
        raise ValueError(f"no room for tau above lower={lower_t}: its unshifted time + margin {margin} reaches 1")
    return shift_time(base + u_t * (1 - base), shift)


def reward_step_probabilities(num_steps: int) -> Tensor:
    """``P(j) ∝ j + 1`` over the trajectory steps ``j = 0 … S − 1`` (the surrogate's step draw,
    favouring late, low-noise steps; official ``weights = arange(N) + 1``). Returns ``[S]`` float64."""
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    weights = torch.arange(1, int(num_steps) + 1, dtype=torch.float64)
    return weights / weights.sum()


# --------------------------------------------------------------------------- the forward transition


class Transition(NamedTuple):
    """:func:`forward_transition`'s result: the noisy state and its coefficients.

    Attributes:
        x_tau: ``[N, ...]`` ``α·x + β·ε``.
        alpha: ``α = (1 − τ)/(1 − a)`` (0-d or ``[N, 1, …]``).
        beta: ``β = sqrt(τ² − (a·α)²)``.
    """

    x_tau: Tensor
    alpha: Tensor
    beta: Tensor


def forward_transition(x: Tensor, a: Tensor | float, tau: Tensor | float, noise: Tensor) -> Transition:
    """Noise a state at level ``a`` up to level ``τ > a`` along the flow's forward process.

    ``α = (1 − τ)/(1 − a)``, ``β = sqrt(τ² − a²·α²)``, ``x_τ = α·x + β·ε``. If ``x = (1 − a)·x0 + a·ε₁``
    then ``x_τ = (1 − τ)·x0 + (α·a·ε₁ + β·ε)`` whose noise has variance ``α²a² + β² = τ²``: exactly the
    flow marginal ``(1 − τ)·x0 + τ·ε'`` (official ``alpha``, ``beta``, ``xtau``).

    Args:
        x: ``[N, ...]`` states at level ``a``.
        a: the level of ``x``, a scalar or ``[N]``, in ``[0, 1)``.
        tau: the target level, a scalar or ``[N]``, ``a < τ <= 1``.
        noise: ``[N, ...]`` fresh Gaussian noise.

    Returns:
        :class:`Transition` ``(x_tau, alpha, beta)``.
    """
    check_same_shape(x=x, noise=noise)
    a_t, tau_t = _broadcast(a, x), _broadcast(tau, x)
    if bool((a_t >= 1).any()) or bool((a_t < 0).any()):
        raise ValueError("a must lie in [0, 1)")
    if bool((tau_t <= a_t).any()) or bool((tau_t > 1).any()):
        raise ValueError("tau must lie in (a, 1]")
    alpha = (1 - tau_t) / (1 - a_t)
    beta = (tau_t.square() - (a_t * alpha).square()).clamp(min=0).sqrt()
    return Transition(alpha * x + beta * noise, alpha, beta)


# --------------------------------------------------------------------------- targets


def fake_score_target(x_tau: Tensor, x0_hat: Tensor, tau: Tensor | float) -> Tensor:
    """The fake score's velocity target ``v = (x_τ − x̂0)/τ``: the flow velocity ``ε − x̂0`` of
    ``x_τ = (1 − τ)·x̂0 + τ·ε`` written without ``ε`` (official ``target_v``). Shapes ``[N, ...]``."""
    check_same_shape(x_tau=x_tau, x0_hat=x0_hat)
    return (x_tau - x0_hat) / _broadcast(tau, x_tau)


def surrogate_target(x: Tensor, noise: Tensor, a: Tensor | float, tau: Tensor | float) -> Tensor:
    """The surrogate reward's velocity target on the stored state ``x`` at level ``a``.

    The time derivative of the transition path ``x_τ = α(τ)·x + β(τ)·ε`` of :func:`forward_transition`
    at fixed ``x`` and ``ε``: ``α' = −1/(1 − a)``, ``β' = (τ + a²·α/(1 − a))/β``, so

        v = −x/(1 − a) + ε·(τ + a²·α/(1 − a))/β

    (the official ``target_v_dgpo``, "η = 0" limit of the paper's Eq. 9). At ``a = 0`` it is the
    flow-matching target ``ε − x``.

    Args:
        x: ``[N, ...]`` stored states at level ``a`` (the rollout's trajectory).
        noise: ``[N, ...]`` the ``ε`` of ``x_τ``.
        a, tau: levels (scalars or ``[N]``), ``0 <= a < τ <= 1``.

    Returns:
        ``[N, ...]`` targets.
    """
    transition = forward_transition(x, a, tau, noise)
    a_t, tau_t = _broadcast(a, x), _broadcast(tau, x)
    alpha, beta = transition.alpha, transition.beta
    return -x / (1 - a_t) + noise * (tau_t + a_t.square() * alpha / (1 - a_t)) / beta


# --------------------------------------------------------------------------- fake score


class FakeScoreStats(NamedTuple):
    """Detached diagnostics of :func:`fake_score_loss` (0-d): the two terms before weighting."""

    regression: Tensor
    regularizer: Tensor


def fake_score_loss(v_fake: Tensor, v_target: Tensor, v_real: Tensor, *, reg: float = 0.02) -> tuple[Tensor, FakeScoreStats]:
    """TDM's fake-score loss ``mean (sg(v*) − v_fake)² + reg·mean (sg(v_real) − v_fake)²``.

    The second term keeps the fake score near the teacher (official ``loss_fake + 0.02·loss_reg_fake``,
    both means over every element of the batch).

    Args:
        v_fake: ``[N, ...]`` fake-score velocities at ``(x_τ, τ)`` (with gradient).
        v_target: ``[N, ...]`` :func:`fake_score_target` (detached here).
        v_real: ``[N, ...]`` the teacher's velocities at ``(x_τ, τ)``, no CFG (detached here).
        reg: the regulariser's weight (0.02).

    Returns:
        ``(loss, stats)``.
    """
    check_same_shape(v_fake=v_fake, v_target=v_target, v_real=v_real)
    if not (isinstance(reg, (int, float)) and math.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    dtype = compute_dtype(v_fake)
    v = v_fake.to(dtype)
    regression = (v_target.detach().to(dtype) - v).square().mean()
    regularizer = (v_real.detach().to(dtype) - v).square().mean()
    return regression + reg * regularizer, FakeScoreStats(regression.detach(), regularizer.detach())


# --------------------------------------------------------------------------- surrogate reward


class SurrogateMasks(NamedTuple):
    """:func:`surrogate_clip_masks`' result (``[N]`` bool each).

    Attributes:
        keep: the sample keeps its gradient (neither clip fired).
        ratio_clipped: the old-policy ratio clip fired.
        reference_clipped: the reference clip fired.
    """

    keep: Tensor
    ratio_clipped: Tensor
    reference_clipped: Tensor


def surrogate_clip_masks(
    dsm: Tensor,
    dsm_old: Tensor,
    dsm_reference: Tensor,
    advantages: Tensor,
    reference_gap: Tensor | float,
    *,
    clip_range: float = 1e-3,
    reference_threshold: float = 0.05,
) -> SurrogateMasks:
    """The two clips of the surrogate's DGPO loss (official ``should_clip``, ``should_clip_ref``).

    - Old-policy ratio clip (DGPO's, :func:`~dgpo_lightning.algo.ppo_clip_mask`):
      ``ρ = exp(ℓ_old − ℓ)``, clipped if ``A > 0 and ρ > 1 + c`` or ``A <= 0 and ρ < 1 − c``.
    - Reference clip: with ``g = mean_i mean_d (v_sur − v_real)²`` the batch's gap to the teacher and
      ``ρ_ref = exp(ℓ_ref − ℓ)``, clipped if ``g > threshold`` and (``A > 0 and ρ_ref > 1`` or
      ``A <= 0 and ρ_ref < 1``): a surrogate already far from the teacher stops moving further in the
      direction its advantage asks for.

    Args:
        dsm, dsm_old, dsm_reference: ``[N]`` denoising errors of the surrogate, its old (EMA) copy and
            the teacher on the same ``x_τ`` and target.
        advantages: ``[N]`` (clipped) advantages.
        reference_gap: ``g``, a scalar.
        clip_range: ``c > 0`` (official 1e-3; 2e-3 for ImageReward / HPS).
        reference_threshold: the gap above which the reference clip applies (0.05).

    Returns:
        :class:`SurrogateMasks`.
    """
    for name, tensor in (("dsm", dsm), ("dsm_old", dsm_old), ("dsm_reference", dsm_reference), ("advantages", advantages)):
        check_vector(name, tensor)
    check_same_shape(dsm=dsm, dsm_old=dsm_old, dsm_reference=dsm_reference, advantages=advantages)
    _positive("reference_threshold", reference_threshold)
    keep_ratio = ppo_clip_mask(dsm, dsm_old, advantages, clip_range)
    with torch.no_grad():
        ratio = torch.exp(dsm_reference.detach().double() - dsm.detach().double())
        positive = advantages.detach() > 0
        far = torch.as_tensor(reference_gap, device=dsm.device).detach().double() > reference_threshold
        reference_clipped = far & torch.where(positive, ratio > 1, ratio < 1)
    ratio_clipped = ~keep_ratio
    return SurrogateMasks(~(ratio_clipped | reference_clipped), ratio_clipped, reference_clipped)


def surrogate_reward_loss(
    dsm: Tensor,
    dsm_reference: Tensor,
    advantages: Tensor,
    group_index: Tensor,
    *,
    beta: float = 1.0,
    group_weight: Tensor | None = None,
    num_samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The surrogate's DGPO loss as the official script back-propagates it.

    ``L = (1/N) Σ_i sg(σ(z_{g(i)}))·A_i·ℓ_i`` with ``z_g = (β/|g|) Σ_{i∈g} A_i·(ℓ_i − ℓ_ref,i)``
    (official ``compute_group_dgpo_loss_allreduce``). Its gradient is that of DGPO's group loss
    ``(1/G) Σ_g softplus(z_g)`` (:func:`~dgpo_lightning.algo.dgpo_loss`) divided by ``β`` (whole groups
    of equal size): the step size does not grow with ``β``.

    Args:
        dsm: ``[N]`` surrogate denoising errors (gradient through the kept samples).
        dsm_reference: ``[N]`` the teacher's errors.
        advantages: ``[N]`` advantages; group_index: ``[N]`` integer group labels.
        beta: ``β_dpo >= 0`` (official 1; 10 for OCR / HPS).
        group_weight: ``[N]`` precomputed ``σ(z_g)`` (micro-batches: from a pass over the whole
            batch); ``None``: computed here from these samples.
        num_samples: the divisor ``N`` (micro-batches: the whole batch's size).

    Returns:
        ``(loss, group_weight)`` — the scalar loss and the detached ``[N]`` ``σ(z_g)`` used.
    """
    if group_weight is None:
        group_weight = dgpo_group_weight(dsm.detach(), dsm_reference.detach(), advantages, group_index, beta=beta)
    check_same_shape(dsm=dsm, group_weight=group_weight, advantages=advantages)
    check_finite("dsm", dsm)
    n = dsm.numel() if num_samples is None else int(num_samples)
    if n < dsm.numel():
        raise ValueError(f"num_samples={n} is smaller than the {dsm.numel()} samples given")
    dtype = compute_dtype(dsm)
    loss = (group_weight.detach().to(dtype) * advantages.detach().to(dtype) * dsm.to(dtype)).sum() / n
    return loss, group_weight.detach()


# --------------------------------------------------------------------------- generator


class GeneratorStats(NamedTuple):
    """Per-sample terms of :func:`generator_loss` (``[N]``, detached), each already divided by its weight.

    Attributes:
        cfg: ``mean_d (r_cfg − x̂0)² / w``; kl: ``mean_d (r_kl − x̂0)² / w``;
        reward: ``mean_d (r_sur − x̂0)² / w_d`` (zeros without the reward term);
        weight: ``w``; reward_weight: ``w_d`` (zeros without the reward term).
    """

    cfg: Tensor
    kl: Tensor
    reward: Tensor
    weight: Tensor
    reward_weight: Tensor


def generator_loss(
    x0_hat: Tensor,
    *,
    real_x0: Tensor,
    real_cond_x0: Tensor,
    real_uncond_x0: Tensor,
    fake_x0: Tensor,
    surrogate_x0: Tensor | None = None,
    surrogate_reference_x0: Tensor | None = None,
    tdm_weight: float = 0.3,
    cfg_scale: float = 3.5,
    eps: float = 1e-12,
) -> tuple[Tensor, GeneratorStats]:
    """TDM-R1's generator loss on revised x0 targets, per sample.

    Every prediction except ``x̂0`` is detached. With the targets

        r_cfg = x̂0 + λ·(x̂0_real,c − x̂0_real,u)      (the teacher's CFG direction as a reward, λ = 3.5)
        r_kl  = x̂0 + (x̂0_real,c − x̂0_fake)          (distribution matching: teacher minus fake)
        r_sur = x̂0 + (x̂0_sur − x̂0_sur,ref)          (surrogate reward minus the teacher)

    and the adaptive weights ``w = mean_d |x̂0 − x̂0_real|`` (teacher with CFG) and
    ``w_d = mean_d |x̂0 − x̂0_sur|`` (both detached, per sample), the per-sample loss is

        with the reward:    λ_tdm·e_cfg/w + (1 − λ_tdm)·e_sur/w_d + e_kl/w
        without (j >= trunc_steps):  λ_tdm·(e_cfg + e_kl)/w,

    ``e_• = mean_d (sg(r_•) − x̂0)²``. The gradient of ``(sg(x̂0 + d) − x̂0)²`` is ``−2d``: each term
    pushes ``x̂0`` along its direction ``d`` (official ``loss`` of the generator, ``use_huber=False``;
    the official batch mean is the mean of these per-sample values).

    Args:
        x0_hat: ``[N, ...]`` the generator's one-step prediction (with gradient).
        real_x0: ``[N, ...]`` the teacher's x0 with CFG (teacher guidance 4.5) at ``(x_τ, τ)``.
        real_cond_x0, real_uncond_x0: ``[N, ...]`` its conditional and unconditional x0.
        fake_x0: ``[N, ...]`` the fake score's x0 at ``(x_τ, τ)``.
        surrogate_x0: ``[N, ...]`` the surrogate's x0 (with its CFG) at ``(x_τd, τ_d)``; ``None``:
            no reward term (steps at or after ``trunc_steps``).
        surrogate_reference_x0: ``[N, ...]`` the teacher's x0 (no CFG) at ``(x_τd, τ_d)``.
        tdm_weight: ``λ_tdm`` (0.3).
        cfg_scale: ``λ`` of the CFG reward (3.5).
        eps: lower clamp of the weights (the official code has none; a weight of 0 means ``x̂0``
            equals the teacher's prediction exactly).

    Returns:
        ``(per_sample_loss [N], stats)``.
    """
    tensors = {"real_x0": real_x0, "real_cond_x0": real_cond_x0, "real_uncond_x0": real_uncond_x0, "fake_x0": fake_x0}
    with_reward = surrogate_x0 is not None
    if with_reward != (surrogate_reference_x0 is not None):
        raise ValueError("surrogate_x0 and surrogate_reference_x0 go together")
    if with_reward:
        tensors.update(surrogate_x0=surrogate_x0, surrogate_reference_x0=surrogate_reference_x0)
    check_same_shape(x0_hat=x0_hat, **tensors)
    if x0_hat.ndim == 0 or x0_hat.shape[0] == 0:
        raise ValueError("generator_loss got an empty batch")
    if not (isinstance(tdm_weight, (int, float)) and math.isfinite(tdm_weight) and 0 <= tdm_weight <= 1):
        raise ValueError(f"tdm_weight must lie in [0, 1], got {tdm_weight!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    dtype = compute_dtype(x0_hat)
    x0 = x0_hat.to(dtype)
    d = {name: t.detach().to(dtype) for name, t in tensors.items()}
    anchor = x0.detach()

    def error(direction: Tensor) -> Tensor:
        return _per_sample_mean(((anchor + direction) - x0).square())

    weight = _per_sample_mean((anchor - d["real_x0"]).abs()).clamp(min=eps)
    cfg = error(cfg_scale * (d["real_cond_x0"] - d["real_uncond_x0"])) / weight
    kl = error(d["real_cond_x0"] - d["fake_x0"]) / weight
    zeros = torch.zeros_like(weight)
    if with_reward:
        reward_weight = _per_sample_mean((anchor - d["surrogate_x0"]).abs()).clamp(min=eps)
        reward = error(d["surrogate_x0"] - d["surrogate_reference_x0"]) / reward_weight
        loss = tdm_weight * cfg + (1 - tdm_weight) * reward + kl
    else:
        reward_weight, reward = zeros, zeros
        loss = tdm_weight * (cfg + kl)
    stats = GeneratorStats(cfg.detach(), kl.detach(), reward.detach(), weight.detach(), reward_weight.detach())
    return loss, stats


__all__ = [
    "FakeScoreStats",
    "GeneratorStats",
    "SurrogateMasks",
    "Transition",
    "draw_tau",
    "fake_score_loss",
    "fake_score_target",
    "forward_transition",
    "generator_loss",
    "reward_step_probabilities",
    "shift_time",
    "surrogate_clip_masks",
    "surrogate_reward_loss",
    "surrogate_target",
    "unshift_time",
]
