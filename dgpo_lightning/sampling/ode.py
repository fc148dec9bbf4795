"""Deterministic flow-ODE samplers: Euler and DPM-Solver++ (2M) in data-prediction form.

ODE ``dx/dσ = v(x, σ)`` integrated from ``σ_0`` (noise) down to ``σ_S`` (usually 0). Both are
hand-written rather than wrapping diffusers' schedulers: ``sampling/`` must stay torch-only and
stateless; the tests check them step by step against diffusers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import SampleOutput, VelocityFn, call_velocity, check_inputs, steps


def ode_euler(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    sigmas: Tensor,
    *,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """Euler integration of the flow ODE: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i)``.

    Same update as diffusers' ``FlowMatchEulerDiscreteScheduler.step``.

    Args:
        velocity_fn: ``(x_t [B, ...], t [B]) -> v [B, ...]``.
        x_init: ``[B, ...]`` state at ``σ_0`` (noise when ``σ_0 = 1``).
        sigmas: ``[S + 1]`` strictly decreasing schedule in ``[0, 1]`` (e.g. :func:`flow_sigmas`).
        return_trajectory: also return ``[S + 1, B, ...]`` states.
        progress: show a tqdm bar over the ``S`` steps.

    Returns:
        :class:`SampleOutput` (``log_probs`` is ``None``).
    """
    sig = check_inputs(x_init, sigmas)
    x = x_init
    trajectory = [x] if return_trajectory else None
    for i in steps(len(sig) - 1, progress, "ode_euler"):
        x = x + (sig[i + 1] - sig[i]) * call_velocity(velocity_fn, x, sig[i])
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(sample=x, trajectory=torch.stack(trajectory) if trajectory is not None else None)


def _log_snr(sigma: float) -> float:
    """``λ = log(α/σ)`` with ``α = 1 − σ`` (``−∞`` at pure noise)."""
    return -math.inf if sigma >= 1.0 else math.log((1.0 - sigma) / sigma)


def _dpm_coefficients(sig: list[float]) -> list[tuple[float, float, float]]:
    """Per step ``(a_i, b_i, c_i)`` with ``x_{i+1} = a_i·x_i + b_i·D0 + c_i·(D0 − D_prev)``.

    Flow matching as a diffusion with ``α = 1 − σ``, ``λ = log(α/σ)``, ``h_i = λ_{i+1} − λ_i``
    (Lu et al. 2022, DPM-Solver++, Eqs. for the 1st-order and 2M multistep updates):
    first order ``x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h_i})·D0``, the 2M correction adds
    ``α_{i+1}(1 − e^{−h_i})/(2 r_i)·(D0 − D_prev)`` with ``r_i = h_{i−1}/h_i``. ``e^{−h}`` is computed
    as ``α_i σ_{i+1} / (σ_i α_{i+1})`` so ``σ_i = 1`` (``λ = −∞``) is exact: ``e^{−h} = 0`` and
    ``1/r = 0``. The first step and a step to ``σ = 0`` are first order; the last is then ``x0``
    itself (diffusers: ``lower_order_final``, ``final_sigmas_type="zero"``).
    """
    coeffs = []
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        if t == 0.0:
            coeffs.append((0.0, 1.0, 0.0))  # x_{i+1} = x0 prediction
            continue
        alpha_s, alpha_t = 1.0 - s, 1.0 - t
        exp_neg_h = alpha_s * t / (s * alpha_t)
        b = alpha_t * (1.0 - exp_neg_h)
        c = 0.0
        if i > 0:
            p = sig[i - 1]
            h = _log_snr(t) - _log_snr(s)
            h_prev = _log_snr(s) - _log_snr(p)  # +inf when σ_{i−1} = 1: the correction vanishes
            c = 0.5 * b * (h / h_prev)
        coeffs.append((t / s, b, c))
    return coeffs


def ode_dpm(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    sigmas: Tensor,
    *,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SampleOutput:
    """DPM-Solver++ 2M (second-order multistep, data prediction) for the flow ODE.

    Data prediction ``D_i = x_i − σ_i·v(x_i, σ_i)``; with ``α = 1 − σ``, ``λ = log(α/σ)``,
    ``h_i = λ_{i+1} − λ_i``, ``r_i = h_{i−1}/h_i``::

        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h_i})·(D_i + (D_i − D_{i−1}) / (2 r_i))

    The first step drops the correction (no ``D_{i−1}`` yet) and a step to ``σ = 0`` returns ``D_i``.
    Matches diffusers' ``DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++",
    use_flow_sigmas=True, prediction_type="flow_prediction")`` on the same sigmas.

    Args:
        velocity_fn: ``(x_t [B, ...], t [B]) -> v [B, ...]``.
        x_init: ``[B, ...]`` state at ``σ_0``.
        sigmas: ``[S + 1]`` strictly decreasing schedule in ``[0, 1]``.
        return_trajectory: also return ``[S + 1, B, ...]`` states.
        progress: show a tqdm bar over the ``S`` steps.

    Returns:
        :class:`SampleOutput` (``log_probs`` is ``None``).
    """
    sig = check_inputs(x_init, sigmas)
    coeffs = _dpm_coefficients(sig)
    x = x_init
    d_prev: Tensor | None = None
    trajectory = [x] if return_trajectory else None
    for i in steps(len(sig) - 1, progress, "ode_dpm"):
        d = x - sig[i] * call_velocity(velocity_fn, x, sig[i])
        a, b, c = coeffs[i]
        if sig[i + 1] == 0.0:
            x = d
        elif c == 0.0 or d_prev is None:
            x = a * x + b * d
        else:
            x = a * x + b * d + c * (d - d_prev)
        d_prev = d
        if trajectory is not None:
            trajectory.append(x)
    return SampleOutput(sample=x, trajectory=torch.stack(trajectory) if trajectory is not None else None)


__all__ = ["ode_dpm", "ode_euler"]
