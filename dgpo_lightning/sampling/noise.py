"""Per-sample seeded Gaussian noise: a sample's noise depends on its seed only, never on the batch.

The seeds themselves come from :mod:`dgpo_lightning.sampling.seeds` (the one place that derives them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per seed."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def draw_normal(generators: Sequence[torch.Generator], shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """``[len(generators), *shape]`` standard normals, row ``i`` drawn from ``generators[i]``.

    Drawn in float32 on the CPU and then moved/cast, so the values do not depend on ``device`` or
    ``dtype`` (CPU and GPU runs see the same noise).
    """
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def initial_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial noise ``x_1 ~ N(0, I)``, one sample per seed.

    Sample ``i`` is ``torch.randn(shape, generator=torch.Generator().manual_seed(seeds[i]))`` (float32,
    CPU), so it is the same in any batch split and on any device.

    Args:
        shape: per-sample shape, e.g. ``(C, H, W)``.
        seeds: one integer per sample.
        device, dtype: of the result.

    Returns:
        ``[len(seeds), *shape]`` noise.
    """
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    return draw_normal(seeded_generators(seeds), shape, device=device, dtype=dtype)


__all__ = ["draw_normal", "initial_noise", "seeded_generators"]
