"""Flow-GRPO's flow-SDE sampler with per-step Gaussian log-probabilities.

Reference: Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv
2505.05470), Sec. 4 ("ODE-to-SDE"); the constants follow the authors' ``sd3_sde_with_logprob``
(github.com/yifan123/flow_grpo, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``).

With the score of the flow ``∇log p_σ(x) = −(x + (1 − σ)·v)/σ``, the reverse SDE that keeps the
ODE's marginals, discretised with Euler–Maruyama from ``σ`` to ``σ' < σ`` (``dt = σ' − σ < 0``), is::

    x' ~ N(mean, std²),  mean = x + [v + std_σ²/(2σ)·(x + (1 − σ)·v)]·dt,  std = std_σ·sqrt(−dt),
    std_σ = a·sqrt(σ / (1 − σ))

with noise level ``a`` (0.7 in Flow-GRPO). At ``σ = 1`` the denominator uses the next sigma
(Flow-GRPO: ``torch.where(sigma == 1, sigma_max, sigma)`` with ``sigma_max = sigmas[1]``).

A step that ends at ``σ' = 0`` is taken deterministically (the ODE/Euler step to the data
prediction ``x − σ·v``, i.e. ``E[x0 | x_σ]``): the SDE mean there shrinks the sample by
``−std_σ²σ/2·(x + (1 − σ)v)`` and would need noise added at data level, leaving visible grain.
Its log-prob is recorded as 0 (a point mass has no density), as is every step when ``a = 0``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._common import SampleOutput, VelocityFn, call_velocity, check_inputs, steps
from .noise import draw_normal, seeded_generators

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_noise_level(noise_level: float) -> float:
    if not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level}")
    return float(noise_level)


def _coefficients(sigma, sigma_next, noise_level: float):
    """``(dt, k, step_std)`` of the transition, with ``mean = x + (v + k·(x + (1 − σ)v))·dt``.

    Works on Python floats (the sampler) or on broadcastable tensors (recomputation). ``k = 0`` and
    ``step_std = 0`` for a step to ``σ' = 0`` (deterministic Euler step, see the module docstring).
    """
    dt = sigma_next - sigma
    if isinstance(sigma, Tensor):
        denominator = 1.0 - torch.where(sigma == 1, sigma_next, sigma)
        std_sigma = noise_level * torch.sqrt(sigma / denominator)
        k = std_sigma**2 / (2.0 * sigma)
        final = sigma_next == 0
        k = torch.where(final, torch.zeros_like(k), k)
        step_std = torch.where(final, torch.zeros_like(k), std_sigma * torch.sqrt(-dt))
        return dt, k, step_std
    if sigma_next == 0.0 or noise_level == 0.0:
        return dt, 0.0, 0.0
    denominator = 1.0 - (sigma_next if sigma == 1.0 else sigma)
    std_sigma = noise_level * math.sqrt(sigma / denominator)
    return dt, std_sigma**2 / (2.0 * sigma), std_sigma * math.sqrt(-dt)


def _mean(v: Tensor, x: Tensor, sigma, dt, k) -> Tensor:
    return x + (v + k * (x + (1.0 - sigma) * v)) * dt


def _log_prob(x_next: Tensor, mean: Tensor, step_std) -> Tensor:
    """``[B]`` Gaussian log-density summed over non-batch dims; 0 where ``step_std == 0``."""
    batch = x_next.shape[0]
    if not isinstance(step_std, Tensor):
        if step_std == 0.0:
            return x_next.new_zeros(batch)
        z = (x_next - mean) / step_std
        return (-0.5 * z**2 - math.log(step_std) - _HALF_LOG_2PI).flatten(1).sum(1)
    std = step_std.expand(batch, *([1] * (x_next.ndim - 1)))
    positive = std > 0
    safe = torch.where(positive, std, torch.ones_like(std))  # no NaN gradients from the masked rows
    z = (x_next - mean) / safe
    per_sample = (-0.5 * z**2 - torch.log(safe) - _HALF_LOG_2PI).flatten(1).sum(1)
    return torch.where(positive.flatten(), per_sample, torch.zeros_like(per_sample))


def _as_column(value, batch: int, ndim: int, like: Tensor) -> Tensor:
    """A float, 0-d or ``[B]`` tensor as a ``[B, 1, ..., 1]`` tensor in ``like``'s dtype/device."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sigma must be a float, a 0-d tensor or a [{batch}] tensor, got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def sde_step_log_prob(
    velocity: Tensor,
    x_t: Tensor,
    x_next: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float = 0.7,
) -> Tensor:
    """Log-probability of a stored SDE transition ``x_t → x_next`` under a (new) velocity.

    ``log N(x_next; mean(v, x_t), std²)`` summed over all non-batch dimensions, with the mean and
    std of the flow-SDE (module docstring) — what Flow-GRPO's importance ratio needs after a policy
    update. Differentiable in ``velocity``. Computed in at least float32 (bf16 model outputs are
    upcast, as in Flow-GRPO). Rows whose step ends at ``sigma_next = 0`` (deterministic) give 0.

    Args:
        velocity: ``[B, ...]`` velocity at ``(x_t, sigma)`` under the current policy.
        x_t, x_next: ``[B, ...]`` stored states before and after the step.
        sigma, sigma_next: step start and end: floats, 0-d tensors or ``[B]`` tensors.
        noise_level: Flow-GRPO's ``a`` used when the transition was sampled.

    Returns:
        ``[B]`` log-probabilities.
    """
    a = _check_noise_level(noise_level)
    if not (velocity.shape == x_t.shape == x_next.shape) or x_t.ndim < 1:
        raise ValueError(f"shape mismatch: velocity {tuple(velocity.shape)}, x_t {tuple(x_t.shape)}, x_next {tuple(x_next.shape)}")
    dtype = torch.promote_types(torch.promote_types(x_t.dtype, velocity.dtype), torch.float32)
    v, x, x_next = velocity.to(dtype), x_t.to(dtype), x_next.to(dtype)
    batch, ndim = x.shape[0], x.ndim
    s = _as_column(sigma, batch, ndim, x)
    s_next = _as_column(sigma_next, batch, ndim, x)
    if bool(((s_next >= s) | (s > 1) | (s_next < 0)).any()):
        raise ValueError("need 0 <= sigma_next < sigma <= 1 for every row")
    dt, k, step_std = _coefficients(s, s_next, a)
    return _log_prob(x_next, _mean(v, x, s, dt, k), step_std)


def sde(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    sigmas: Tensor,
    *,
    noise_level: float = 0.7,
    noise_seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """Sample with Flow-GRPO's flow-SDE, recording each transition's log-probability.

    ``x_{i+1} = mean_i + std_i·ε_i`` (module docstring). ``noise_level = 0`` gives exactly
    :func:`ode_euler`.

    Args:
        velocity_fn: ``(x_t [B, ...], t [B]) -> v [B, ...]``.
        x_init: ``[B, ...]`` state at ``σ_0``.
        sigmas: ``[S + 1]`` strictly decreasing schedule in ``[0, 1]``.
        noise_level: ``a >= 0``.
        noise_seeds: one seed per sample for the step noise: sample ``i``'s noise comes from its own
            generator, so results do not depend on the batch split (or device). Exclusive with
            ``generator``.
        generator: one ``torch.Generator`` for the whole batch's step noise (default: global RNG).
        return_trajectory: also return ``[S + 1, B, ...]`` states (needed to recompute log-probs).
        progress: show a tqdm bar over the ``S`` steps.

    Returns:
        :class:`SampleOutput` with ``log_probs [S, B]`` (sum over non-batch dims; 0 for
        deterministic steps).
    """
    sig = check_inputs(x_init, sigmas)
    a = _check_noise_level(noise_level)
    batch = x_init.shape[0]
    if noise_seeds is not None and generator is not None:
        raise ValueError("pass noise_seeds or generator, not both")
    generators = None
    if noise_seeds is not None:
        if len(noise_seeds) != batch:
            raise ValueError(f"{len(noise_seeds)} noise_seeds for a batch of {batch}")
        generators = seeded_generators(noise_seeds)
    x = x_init
    trajectory = [x] if return_trajectory else None
    log_probs = []
    for i in steps(len(sig) - 1, progress, "sde"):
        v = call_velocity(velocity_fn, x, sig[i])
        dt, k, step_std = _coefficients(sig[i], sig[i + 1], a)
        mean = _mean(v, x, sig[i], dt, k)
        if step_std == 0.0:
            x_next = mean
        else:
            if generators is not None:
                noise = draw_normal(generators, x.shape[1:], device=x.device, dtype=x.dtype)
            elif generator is not None:
                noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
                noise = noise.to(device=x.device, dtype=x.dtype)
            else:
                noise = torch.randn_like(x)
            x_next = mean + step_std * noise
        log_probs.append(_log_prob(x_next, mean, step_std))
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(
        sample=x,
        trajectory=torch.stack(trajectory) if trajectory is not None else None,
        log_probs=torch.stack(log_probs),
    )


__all__ = ["sde", "sde_step_log_prob"]
