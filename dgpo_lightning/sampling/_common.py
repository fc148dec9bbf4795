"""Shared pieces of the samplers: the output type, input checks and the step loop's progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

#: ``velocity_fn(x_t [B, ...], t [B]) -> v [B, ...]``; conditioning and CFG are closed over by the caller.
VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleOutput:
    """What a sampler returns.

    Attributes:
        sample: ``[B, ...]`` final state (``x_0`` when the schedule ends at 0).
        trajectory: ``[S + 1, B, ...]`` states ``x_{sigma_0}, ..., x_{sigma_S}`` (only when asked).
        log_probs: ``[S, B]`` log-density of each transition (stochastic samplers only).
    """

    sample: Tensor
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None


def check_inputs(x_init: Tensor, sigmas: Tensor) -> list[float]:
    """Validate a sampler call; returns the schedule as float64 Python numbers (one host sync)."""
    if not isinstance(x_init, Tensor) or x_init.ndim < 1 or not x_init.is_floating_point():
        raise ValueError("x_init must be a floating tensor [B, ...]")
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor with at least 2 entries (S + 1 for S steps)")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()) or bool(((values < 0) | (values > 1)).any()):
        raise ValueError("sigmas must be finite and lie in [0, 1]")
    if bool((values[1:] >= values[:-1]).any()):
        raise ValueError("sigmas must be strictly decreasing (from noise, t = 1, towards data, t = 0)")
    return values.tolist()


def steps(num_steps: int, progress: bool, desc: str) -> Iterable[int]:
    """``range(num_steps)``, wrapped in a tqdm bar when ``progress``."""
    if not progress:
        return range(num_steps)
    from tqdm.auto import tqdm  # only needed for the bar

    return tqdm(range(num_steps), desc=desc, unit="step", leave=False)


def time_vector(sigma: float, x: Tensor) -> Tensor:
    """The ``[B]`` time tensor passed to ``velocity_fn`` (x's dtype and device)."""
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def call_velocity(velocity_fn: VelocityFn, x: Tensor, sigma: float) -> Tensor:
    v = velocity_fn(x, time_vector(sigma, x))
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for input {tuple(x.shape)}")
    return v.to(x.dtype)  # e.g. a bf16 model output: integrate in the state's precision
