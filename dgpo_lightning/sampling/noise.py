"""Per-sample seeded Gaussian noise: a sample's noise depends on its seed only, never on the batch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A fixed integer mixer (Steele et al. 2014, "SplitMix") so derived seeds are decorrelated
    # functions of (base, group, member) without any RNG state.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def group_seeds(base_seed: int, num_groups: int, group_size: int, *, shared_in_group: bool = False) -> list[int]:
    """Per-sample seeds for ``num_groups`` groups of ``group_size``, group-major.

    Seed of member ``j`` of group ``g`` is a hash of ``(base_seed, g, j)`` (of ``(base_seed, g)`` when
    ``shared_in_group``), so it does not depend on ``num_groups``: group ``g`` gets the same noise in
    any batch or epoch size. Seeds are non-negative 63-bit integers.

    Args:
        base_seed: run/epoch seed.
        num_groups, group_size: counts (``>= 1``).
        shared_in_group: give every member of a group the same seed (same initial noise).

    Returns:
        ``num_groups · group_size`` seeds; entry ``g·group_size + j`` belongs to member ``j`` of group ``g``.
    """
    for name, value in (("num_groups", num_groups), ("group_size", group_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    base = _splitmix64(int(base_seed) & _MASK64)
    seeds = []
    for g in range(int(num_groups)):
        group = _splitmix64(base ^ g)
        for j in range(int(group_size)):
            seeds.append((group if shared_in_group else _splitmix64(group ^ (j + 1))) >> 1)
    return seeds


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


__all__ = ["draw_normal", "group_seeds", "initial_noise", "seeded_generators"]
