"""DiffusionNFT's loss: flow matching on implicit positive and negative policies around an old policy.

Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu, "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process" (NVlabs 2025, arXiv 2509.16117; code github.com/NVlabs/DiffusionNFT,
the loss in ``scripts/train_nft_sd3.py``, defaults in ``config/nft.py`` and ``config/base.py``).

With the old (sampling) policy ``v_old`` and the trained one ``v_θ`` the paper defines

    v⁺ = (1 − β)·v_old + β·v_θ,        v⁻ = (1 + β)·v_old − β·v_θ,

and trains ``v_θ`` by flow matching ``v⁺`` on the positive and ``v⁻`` on the negative share of each
sample, the share given by the reward-derived optimality probability ``r ∈ [0, 1]``:

    L = E[ r·‖v⁺ − v*‖² + (1 − r)·‖v⁻ − v*‖² ],       v* = ε − x0,

whose optimum is ``v_θ = v_old + (2/β)·Δ`` with ``Δ`` the positive-minus-old direction (paper, Sec. 3).
Time convention as everywhere in :mod:`dgpo_lightning.algo`: ``x_t = (1 − t)·x0 + t·ε``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_finite, check_same_shape, check_vector, compute_dtype


class NFTStats(NamedTuple):
    """Detached diagnostics of :func:`nft_loss` (0-d tensors).

    Attributes:
        positive_loss: mean of the per-sample positive terms ``L⁺_i``.
        negative_loss: mean of the per-sample negative terms ``L⁻_i``.
        old_deviation: ``mean((v_θ − v_old)²)``, how far the trained policy moved from the old one
            (the official ``old_deviate``).
    """

    positive_loss: Tensor
    negative_loss: Tensor
    old_deviation: Tensor


def optimality_probability(advantages: Tensor, advantage_max: float = 5.0) -> Tensor:
    """The reward-derived optimality probability ``r = ½ + ½·clip(A / c, −1, 1)``, in ``[0, 1]``.

    The paper's mapping ``r = ½ + ½·clip((r_raw − E_old[r_raw]) / Z_c, −1, 1)`` (Sec. 4) with the
    group-centred, std-normalised advantage ``A = (r_raw − mean_group) / std`` and ``Z_c = c·std``;
    the official code clips ``A`` to ``±adv_clip_max`` (``config/base.py``: 5) and maps
    ``r = clamp(clip(A, −c, c)/c/2 + ½, 0, 1)`` (``scripts/train_nft_sd3.py``, ``adv_mode="all"``).

    Args:
        advantages: ``[N]`` advantages (any real dtype).
        advantage_max: ``c > 0``, the advantage at which ``r`` saturates at 1 (and ``−c`` at 0).

    Returns:
        ``[N]`` probabilities in ``advantages``' dtype promoted to at least float32.
    """
    check_vector("advantages", advantages)
    check_finite("advantages", advantages)
    if not (isinstance(advantage_max, (int, float)) and math.isfinite(advantage_max) and advantage_max > 0):
        raise ValueError(f"advantage_max must be a finite number > 0, got {advantage_max}")
    a = advantages.to(compute_dtype(advantages)).clamp(-advantage_max, advantage_max)
    return (0.5 + 0.5 * a / advantage_max).clamp(0.0, 1.0)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _branch_loss(v_branch: Tensor, v_target: Tensor, t: Tensor, adaptive: bool, eps: float) -> Tensor:
    """``[N]`` flow-matching error of one implicit policy (adaptively weighted or plain)."""
    if not adaptive:
        return _per_sample_mean((v_branch - v_target).square())
    # x0-prediction error: x0_pred − x0 = (x_t − t·v) − x0 = t·(v* − v), since x_t − x0 = t·(ε − x0).
    t = t.reshape(-1, *([1] * (v_branch.ndim - 1)))
    error = t * (v_target - v_branch)
    with torch.no_grad():
        weight = _per_sample_mean(error.abs()).clamp(min=eps)
    return _per_sample_mean(error.square()) / weight


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    t: Tensor,
    optimality: Tensor,
    *,
    beta: float,
    adaptive_weighting: bool = True,
    scale: float = 1.0,
    eps: float = 1e-5,
) -> tuple[Tensor, NFTStats]:
    """DiffusionNFT's policy loss, as the official training script computes it.

    ``v⁺ = β·v_θ + (1 − β)·sg(v_old)``, ``v⁻ = (1 + β)·sg(v_old) − β·v_θ`` and, per sample,

    - adaptive weighting (the paper's "adaptive loss weighting", the official default): the
      x0-regression error ``e± = x0_pred(v±) − x0 = t·(v* − v±)`` normalised by its own detached mean
      absolute value, ``L±_i = mean_d(e±²) / sg(max(mean_d|e±|, eps))`` (official ``eps`` 1e-5);
    - plain: ``L±_i = mean_d((v± − v*)²)`` (the paper's Eq. of the objective above).

    ``loss = scale · mean_i (r_i·L⁺_i + (1 − r_i)·L⁻_i) / β``: the official code divides by ``β``
    (which keeps the gradient's size independent of ``β``, since ``∂v±/∂v_θ = ±β``) and multiplies by
    ``adv_clip_max`` (pass it as ``scale``). The KL term to the reference is added by the caller
    (official: ``train.beta · mean((v_θ − v_ref)²)``).

    Args:
        v_theta: ``[N, ...]`` velocities of the trained model (with gradient).
        v_old: ``[N, ...]`` velocities of the old policy on the same inputs (detached here).
        v_target: ``[N, ...]`` flow-matching targets ``v* = ε − x0``.
        t: ``[N]`` times of the noisy inputs (``x_t = (1 − t)·x0 + t·ε``), in ``[0, 1]``.
        optimality: ``[N]`` optimality probabilities ``r ∈ [0, 1]`` (:func:`optimality_probability`).
        beta: ``β > 0``, the step of the implicit policies away from the old one (official 1.0;
            0.1 for OCR and multi-reward).
        adaptive_weighting: the self-normalised x0 regression (``True``) or the plain velocity error.
        scale: the loss multiplier (official: ``adv_clip_max`` = 5).
        eps: lower clip of the adaptive weight.

    Returns:
        ``(loss, stats)``: a scalar loss and :class:`NFTStats`.

    Raises:
        ValueError: for mismatched shapes, ``r`` outside ``[0, 1]``, ``t`` outside ``[0, 1]``,
            non-finite inputs, an empty batch or ``β``, ``scale``, ``eps`` not finite and > 0.
    """
    check_same_shape(v_theta=v_theta, v_old=v_old, v_target=v_target)
    if v_theta.ndim == 0 or v_theta.shape[0] == 0:
        raise ValueError("nft_loss got an empty batch")
    for name, vector in (("t", t), ("optimality", optimality)):
        check_vector(name, vector)
        if vector.shape[0] != v_theta.shape[0]:
            raise ValueError(f"{name} has {vector.shape[0]} entries but the velocities have {v_theta.shape[0]}")
    for name, value in (("beta", beta), ("scale", scale), ("eps", eps)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    for name, tensor in (("v_theta", v_theta), ("v_old", v_old), ("v_target", v_target), ("t", t), ("optimality", optimality)):
        check_finite(name, tensor)
    if bool(((optimality < 0) | (optimality > 1)).any()):
        raise ValueError("optimality must hold probabilities in [0, 1]")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError("t must lie in [0, 1]")

    dtype = torch.promote_types(compute_dtype(v_theta), compute_dtype(v_old))
    v = v_theta.to(dtype)
    old = v_old.detach().to(dtype)
    target = v_target.to(dtype)
    r = optimality.detach().to(dtype)
    positive = beta * v + (1 - beta) * old
    negative = (1 + beta) * old - beta * v
    positive_loss = _branch_loss(positive, target, t.to(dtype), adaptive_weighting, eps)
    negative_loss = _branch_loss(negative, target, t.to(dtype), adaptive_weighting, eps)
    loss = scale * (r * positive_loss + (1 - r) * negative_loss).mean() / beta
    with torch.no_grad():
        stats = NFTStats(
            positive_loss=positive_loss.detach().mean(),
            negative_loss=negative_loss.detach().mean(),
            old_deviation=(v.detach() - old).square().mean(),
        )
    return loss, stats


__all__ = ["NFTStats", "nft_loss", "optimality_probability"]
