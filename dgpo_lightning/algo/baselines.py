"""The paper's baselines in the same layer: Flow-GRPO and Diffusion-DPO losses."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    check_finite,
    check_group_index,
    check_nonnegative_scalar,
    check_same_shape,
    check_vector,
    dense_groups,
)
from .loss import exact_softplus


class FlowGRPOStats(NamedTuple):
    """Detached diagnostics of :func:`flow_grpo_loss` (0-d tensors).

    Attributes:
        clip_frac: fraction of entries with ``|ρ − 1| > c``.
        approx_kl: ``0.5·mean((log p_θ − log p_old)²)``.
        ratio_mean: ``mean(ρ)``.
    """

    clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def flow_grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float
) -> tuple[Tensor, FlowGRPOStats]:
    """Flow-GRPO's clipped policy-gradient loss on per-step Gaussian log-probabilities.

    ``ρ = exp(log p_θ − log p_old)``, ``L = mean(max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c)))``
    (Liu et al. 2025, arXiv 2505.05470: the PPO objective on SDE transitions; the KL term to the
    reference is added by the caller).

    Args:
        log_prob: ``[N]`` (or any shape) log-probabilities of the stored transitions under the current
            policy (with gradient), e.g. from ``sampling.sde_log_prob``.
        old_log_prob: same shape, recorded at rollout time.
        advantages: same shape (expand per-sample advantages over steps yourself).
        clip_range: ``c > 0``.

    Returns:
        ``(loss, stats)``: scalar loss and :class:`FlowGRPOStats`.
    """
    check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_range must be a finite number > 0, got {clip_range}")
    if log_prob.numel() == 0:
        raise ValueError("flow_grpo_loss got an empty batch")
    check_finite("log_prob", log_prob)
    check_finite("old_log_prob", old_log_prob)
    check_finite("advantages", advantages)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = FlowGRPOStats(
            clip_frac=((ratio - 1).abs() > clip_range).to(ratio.dtype).mean(),
            approx_kl=0.5 * log_ratio.square().mean(),
            ratio_mean=ratio.mean(),
        )
    return loss, stats


class DPOStats(NamedTuple):
    """Detached diagnostics of :func:`diffusion_dpo_loss` (0-d tensors).

    Attributes:
        reward_margin: ``mean(−β·(Δ_w − Δ_l))``, the implicit reward of the winner minus the loser.
        reward_accuracy: fraction of pairs with a positive margin.
        sigmoid_weight: ``mean σ(β·(Δ_w − Δ_l))``, the per-pair gradient multiplier.
    """

    reward_margin: Tensor
    reward_accuracy: Tensor
    sigmoid_weight: Tensor


def diffusion_dpo_loss(
    dsm_online_w: Tensor,
    dsm_reference_w: Tensor,
    dsm_online_l: Tensor,
    dsm_reference_l: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, DPOStats]:
    """Diffusion-DPO pairwise loss in flow-matching form.

    ``L = mean_pairs −log σ(−β·((ℓ_θ,w − ℓ_ref,w) − (ℓ_θ,l − ℓ_ref,l)))`` (Wallace et al. 2023,
    arXiv 2311.12908, with ``ℓ`` the velocity error). The authors' released training script
    scales by ``0.5·beta_dpo``; pass ``beta = 0.5·beta_dpo`` to reproduce it.

    Args:
        dsm_online_w, dsm_reference_w: ``[P]`` denoising errors of the winners (online, reference).
        dsm_online_l, dsm_reference_l: ``[P]`` denoising errors of the losers, on the same ``t`` and noise.
        beta: ``β >= 0``.

    Returns:
        ``(loss, stats)``: scalar loss and :class:`DPOStats`.
    """
    tensors = {
        "dsm_online_w": dsm_online_w,
        "dsm_reference_w": dsm_reference_w,
        "dsm_online_l": dsm_online_l,
        "dsm_reference_l": dsm_reference_l,
    }
    for name, tensor in tensors.items():
        check_vector(name, tensor)
    check_same_shape(**tensors)
    check_nonnegative_scalar("beta", beta)
    if dsm_online_w.numel() == 0:
        raise ValueError("diffusion_dpo_loss got no pairs")
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    inside = -beta * ((dsm_online_w - dsm_reference_w) - (dsm_online_l - dsm_reference_l))
    loss = exact_softplus(-inside).mean()  # −log σ(x) = softplus(−x)
    with torch.no_grad():
        inside = inside.detach()
        stats = DPOStats(
            reward_margin=inside.mean(),
            reward_accuracy=(inside > 0).to(inside.dtype).mean(),
            sigmoid_weight=torch.sigmoid(-inside).mean(),
        )
    return loss, stats


def best_worst_pairs(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """One (winner, loser) pair per group for Diffusion-DPO on online rollouts.

    Winner = the group's highest reward, loser = its lowest (ties: the lowest sample index). Groups whose
    rewards are all equal (including single samples) give no pair.

    Args:
        rewards: ``[N]`` finite rewards.
        group_index: ``[N]`` integer group labels.

    Returns:
        ``(winner_idx, loser_idx)``: ``[P]`` long indices into the batch, ordered by group label.
    """
    check_vector("rewards", rewards)
    check_group_index(group_index, rewards.numel())
    check_finite("rewards", rewards)
    if rewards.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=rewards.device)
        return empty, empty.clone()
    inverse, num_groups = dense_groups(group_index.to(rewards.device))
    r = rewards.detach()
    group_max = r.new_zeros(num_groups).scatter_reduce(0, inverse, r, "amax", include_self=False)
    group_min = r.new_zeros(num_groups).scatter_reduce(0, inverse, r, "amin", include_self=False)
    position = torch.arange(r.numel(), device=r.device)
    sentinel = torch.full_like(position, r.numel())

    def first_index_where(hit: Tensor) -> Tensor:
        candidates = torch.where(hit, position, sentinel)
        return sentinel.new_full((num_groups,), r.numel()).scatter_reduce(
            0, inverse, candidates, "amin", include_self=True
        )

    winners = first_index_where(r == group_max[inverse])
    losers = first_index_where(r == group_min[inverse])
    informative = group_max > group_min
    return winners[informative], losers[informative]


def all_preference_pairs(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Every (winner, loser) pair of a group for Diffusion-DPO over all pairs: ``r_w > r_l``, same group.

    A group of G samples with distinct rewards gives G(G−1)/2 pairs; tied samples form no pair.

    Args:
        rewards: ``[N]`` finite rewards.
        group_index: ``[N]`` integer group labels.

    Returns:
        ``(winner_idx, loser_idx)``: ``[P]`` long indices into the batch, ordered by group label, then
        by the winner's and the loser's batch index.
    """
    check_vector("rewards", rewards)
    check_group_index(group_index, rewards.numel())
    check_finite("rewards", rewards)
    inverse, _ = dense_groups(group_index.to(rewards.device))
    order = torch.sort(inverse, stable=True).indices  # by group, batch order within a group
    r, g = rewards.detach()[order], inverse[order]
    better = (g[:, None] == g[None, :]) & (r[:, None] > r[None, :])
    winner, loser = better.nonzero(as_tuple=True)  # row-major: by winner, then loser
    return order[winner], order[loser]
