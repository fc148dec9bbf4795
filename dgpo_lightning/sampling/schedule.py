"""Sigma schedules for flow-matching samplers (``x_t = (1 − t)·x0 + t·ε``, t = 1 is noise).

The sampler time ``t`` is called ``sigma`` here, as in diffusers' flow-matching schedulers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def time_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's resolution time shift ``t' = s·t / (1 + (s − 1)·t)`` (Esser et al. 2024, SD3 paper, Sec. 5.3.2).

    Maps ``[0, 1]`` onto itself monotonically with ``0 ↦ 0`` and ``1 ↦ 1``; ``s > 1`` spends more
    steps at high noise, ``s = 1`` is the identity.

    Args:
        t: times in ``[0, 1]`` (tensor of any shape, or a float).
        shift: ``s > 0``.

    Returns:
        Shifted times, same type/shape as ``t``.
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(
    num_steps: int,
    *,
    shift: float = 3.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``num_steps``-step sampling schedule from noise (``1``) to data (``0``).

    ``sigma_i = time_shift(1 − i/N, shift)`` for ``i = 0..N``, so ``sigma_0 = 1`` and ``sigma_N = 0``
    exactly. This equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` given
    ``set_timesteps(sigmas=linspace(1, 1/N, N))`` (the Flux pipelines' grid). Diffusers' *default*
    grids differ slightly: ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` spaces
    ``linspace(1, time_shift(1/1000), N)`` before shifting, and ``DPMSolverMultistepScheduler`` with
    ``use_flow_sigmas`` spaces ``linspace(1 − 1/1000, 0, N + 1)`` (first sigma ``≈ 0.9997``).

    Args:
        num_steps: ``N >= 1`` sampler steps.
        shift: time shift ``s > 0`` (``1`` = linear; SD3 and DGPO's 10-step rollouts use ``3``).
        device, dtype: of the result (computed in float64 first).

    Returns:
        ``[N + 1]`` non-increasing sigmas.
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    t = torch.linspace(1.0, 0.0, int(num_steps) + 1, dtype=torch.float64)
    sigmas = time_shift(t, float(shift))
    sigmas[0], sigmas[-1] = 1.0, 0.0  # exact ends whatever the rounding
    return sigmas.to(device=device, dtype=dtype)


__all__ = ["flow_sigmas", "time_shift"]
