"""Stateless flow-matching samplers (torch only).

Time convention: ``x_t = (1 − t)·x0 + t·ε`` with ``t`` (``sigma``) from 1 (noise) to 0 (data); the
velocity is ``v = ε − x0``. Every sampler has the signature
``sampler(velocity_fn, x_init, sigmas, *, return_trajectory=False, progress=False, ...) -> SampleOutput``
with ``velocity_fn(x_t [B, ...], t [B]) -> v`` (conditioning and CFG closed over by the caller, e.g.
``lambda x, t: backbone.velocity(x, t, cond, guidance_scale)``).
"""

from __future__ import annotations

from typing import Callable

from ._common import SampleOutput, VelocityFn
from .noise import initial_noise
from .ode import ode_dpm, ode_euler
from .schedule import flow_sigmas, time_shift
from .sde import sde, sde_step_log_prob

#: Sampler name (as configs spell it) → function.
SAMPLERS: dict[str, Callable[..., SampleOutput]] = {"ode_euler": ode_euler, "ode_dpm": ode_dpm, "sde": sde}


def get_sampler(name: str) -> Callable[..., SampleOutput]:
    """The sampler called ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None


__all__ = [
    "SAMPLERS",
    "SampleOutput",
    "VelocityFn",
    "flow_sigmas",
    "get_sampler",
    "initial_noise",
    "ode_dpm",
    "ode_euler",
    "sde",
    "sde_step_log_prob",
    "time_shift",
]
