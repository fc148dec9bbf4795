"""Group-relative advantages (GRPO-style normalisation within each prompt's group)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._checks import check_finite, check_group_index, check_vector, compute_dtype, dense_groups


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return values.new_zeros(num_groups).index_add_(0, inverse, values)


def group_advantages(
    rewards: Tensor,
    group_index: Tensor,
    *,
    std: Literal["group", "global"] = "group",
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """Normalised advantages within groups of samples that share a prompt.

    ``A_i = (r_i − mean_{g(i)}(r)) / (s + eps)`` where ``s`` is the population standard deviation
    (ddof = 0) of the sample's own group (``std="group"``, the GenEval recipe) or of all ``N`` rewards
    (``std="global"``, the OCR / PickScore recipe). Optionally ``A ← clamp(A, −clip, clip)`` (the
    official code clips to ±5; note that clipping can break ``Σ_{i∈g} A_i = 0``, which DGPO's
    reference-cancellation relies on).

    Groups may be ragged and labelled by arbitrary integers. A group whose rewards are all equal
    (including a group of one sample) gets exactly zero advantages.

    Args:
        rewards: ``[N]`` rewards (any real dtype; computed in at least float32).
        group_index: ``[N]`` integer group label of each sample.
        std: which standard deviation normalises, ``"group"`` or ``"global"``.
        eps: added to the standard deviation (``>= 0``).
        clip: if given (``> 0``), symmetric bound on the returned advantages.

    Returns:
        ``[N]`` advantages in ``rewards``' dtype promoted to at least float32.

    Raises:
        ValueError: on shape/dtype problems, unknown ``std``, negative ``eps``, non-positive ``clip`` or
            non-finite rewards (the message lists the offending indices).
    """
    check_vector("rewards", rewards)
    check_group_index(group_index, rewards.numel())
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    check_finite("rewards", rewards)
    if rewards.numel() == 0:
        return rewards.to(compute_dtype(rewards))

    r = rewards.to(compute_dtype(rewards))
    inverse, num_groups = dense_groups(group_index.to(r.device))
    counts = _group_sum(torch.ones_like(r), inverse, num_groups)
    centered = r - (_group_sum(r, inverse, num_groups) / counts)[inverse]
    if std == "group":
        spread = (_group_sum(centered.square(), inverse, num_groups) / counts).sqrt()[inverse]
    else:
        spread = r.std(correction=0).expand_as(r)

    # Equal rewards can leave rounding residue in `centered` (e.g. 3·0.1/3 != 0.1); force exact zeros.
    group_max = r.new_zeros(num_groups).scatter_reduce(0, inverse, r, "amax", include_self=False)
    group_min = r.new_zeros(num_groups).scatter_reduce(0, inverse, r, "amin", include_self=False)
    constant = (group_max == group_min)[inverse]
    denominator = torch.where(constant, torch.ones_like(spread), spread + eps)
    advantages = torch.where(constant, torch.zeros_like(r), centered / denominator)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def group_weights(
    advantages: Tensor, group_index: Tensor, *, scheme: Literal["advantage", "rank", "softmax"] = "advantage",
    temperature: float = 1.0,
) -> Tensor:
    """Per-sample signed weights ``w_i`` for the group sum of the DGPO loss (the paper's open question).

    DGPO's reference/partition terms cancel because ``Σ_{i∈g} w_i = 0`` in every group; each scheme
    keeps that property and the sign of the advantage (who is in ``G⁺`` and who in ``G⁻``):

    * ``advantage``: ``w = A`` (the paper).
    * ``rank``: ``w`` = the group-normalised *ranks* of ``A`` (ties share their mean rank), i.e.
      ``group_advantages(rank(A))``: only the order of rewards matters, not their spacing.
    * ``softmax``: ``w_i = |g|·(softmax_g(A/τ)_i − 1/|g|)``: concentrates the weight on the best
      samples, lightly spreading the negative weight over the rest.

    Args:
        advantages: ``[N]`` group-normalised advantages.
        group_index: ``[N]`` group labels.
        scheme: see above.
        temperature: ``τ > 0`` of ``softmax``.

    Returns:
        ``[N]`` weights; zero wherever the whole group's advantages are zero.
    """
    check_vector("advantages", advantages)
    check_group_index(group_index, advantages.numel())
    check_finite("advantages", advantages)
    if scheme == "advantage":
        return advantages
    inverse, num_groups = dense_groups(group_index.to(advantages.device))
    a = advantages.to(compute_dtype(advantages))
    if scheme == "rank":
        # rank_i = #{j in g: A_j < A_i} + (#{j in g: A_j == A_i} - 1) / 2, the mean rank of ties.
        same = inverse[:, None] == inverse[None, :]
        below = ((a[None, :] < a[:, None]) & same).sum(1).to(a.dtype)
        ties = ((a[None, :] == a[:, None]) & same).sum(1).to(a.dtype)
        return group_advantages(below + (ties - 1) / 2, inverse, eps=0.0)
    if scheme == "softmax":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = a / temperature
        group_max = logits.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse, logits, "amax")
        exp = (logits - group_max[inverse]).exp()
        counts = _group_sum(torch.ones_like(a), inverse, num_groups)
        soft = exp / _group_sum(exp, inverse, num_groups)[inverse]
        weights = counts[inverse] * soft - 1.0
        constant = (_group_sum(a.abs(), inverse, num_groups) == 0)[inverse]
        return torch.where(constant, torch.zeros_like(weights), weights)
    raise ValueError(f"unknown group weighting {scheme!r}; choose advantage, rank or softmax")
