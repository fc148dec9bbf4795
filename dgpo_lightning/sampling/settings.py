"""Sampler settings as one value: which sampler, how many steps, schedule shift, CFG, SDE noise."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from .schedule import flow_sigmas

SamplerName = Literal["ode_dpm", "ode_euler", "sde"]
SAMPLER_NAMES: tuple[str, ...] = ("ode_dpm", "ode_euler", "sde")


# Not frozen: Lightning rebuilds dataclasses field by field when it casts a batch (bf16-true).
@dataclass
class SamplerSettings:
    """How images are sampled, passed as one value instead of five keywords.

    Attributes:
        sampler: ``ode_dpm`` (DPM-Solver++ 2M), ``ode_euler`` or ``sde`` (Flow-GRPO's SDE).
        num_steps: sampler steps ``S``.
        shift: schedule shift (``None``: the backbone's recommended one, see :meth:`resolve`).
        guidance_scale: CFG scale (``None``: the backbone's default).
        noise_level: the SDE's ``a`` (ignored by the ODE samplers).
        schedule: explicit ``[S + 1]`` sigmas; :meth:`resolve` fills it from
            ``backbone.sampling_sigmas(S)`` when the shift is the backbone's and its pipeline uses a
            schedule no shift expresses (Qwen-Image's ``shift_terminal``), else ``None``.
    """

    sampler: SamplerName = "ode_dpm"
    num_steps: int = 10
    shift: float | None = None
    guidance_scale: float | None = None
    noise_level: float = 0.7
    schedule: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
        if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        for name in ("shift", "guidance_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
        if not (math.isfinite(self.noise_level) and self.noise_level >= 0):
            raise ValueError(f"noise_level must be a finite number >= 0, got {self.noise_level!r}")

    @property
    def stochastic(self) -> bool:
        return self.sampler == "sde"

    def resolve(self, backbone: Any) -> "SamplerSettings":
        """The same settings with ``shift`` / ``guidance_scale`` filled from the backbone's defaults
        (``backbone.shift``, else SD3's 3.0; ``backbone.default_guidance_scale``, else 1.0), and
        ``schedule`` from ``backbone.sampling_sigmas`` where a backbone defines it and no shift
        was given."""
        schedule = self.schedule
        if self.shift is None and schedule is None and callable(getattr(backbone, "sampling_sigmas", None)):
            schedule = tuple(float(s) for s in backbone.sampling_sigmas(self.num_steps))
        shift = float(getattr(backbone, "shift", 3.0)) if self.shift is None else float(self.shift)
        scale = float(getattr(backbone, "default_guidance_scale", 1.0)) if self.guidance_scale is None else float(self.guidance_scale)
        return replace(self, shift=shift, guidance_scale=scale, schedule=schedule)

    def sigmas(self, device: torch.device | str | None = None) -> Tensor:
        """``[S + 1]`` schedule from 1 to 0 (``schedule`` if set, else ``flow_sigmas`` with the
        resolved ``shift``)."""
        if self.schedule is not None:
            if len(self.schedule) != self.num_steps + 1:
                raise ValueError(f"schedule has {len(self.schedule)} sigmas, expected num_steps + 1 = {self.num_steps + 1}")
            return torch.tensor(self.schedule, dtype=torch.float32, device=device)
        if self.shift is None:
            raise ValueError("resolve() the settings against a backbone before asking for sigmas")
        return flow_sigmas(self.num_steps, shift=self.shift, device=device)


__all__ = ["SAMPLER_NAMES", "SamplerName", "SamplerSettings"]
