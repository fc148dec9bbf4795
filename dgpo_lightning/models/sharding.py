"""FSDP2 sharding of denoisers over a data-parallel device mesh."""

from __future__ import annotations

from typing import Iterable

from torch import nn


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a denoiser: the elements of each of its top-level ``nn.ModuleList``s
    (SD3's ``transformer_blocks``; FLUX's ``transformer_blocks`` and ``single_transformer_blocks``;
    Z-Image's ``noise_refiner``, ``context_refiner`` and ``layers``; a UNet's down/up blocks) and a
    UNet's ``mid_block``. Each becomes its own shard unit, so one block is gathered at a time."""
    units: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
    if getattr(model, "mid_block", None) is not None:
        units.append(model.mid_block)
    return units


def shard_denoisers(models: Iterable[nn.Module | None], mesh) -> None:
    """``fully_shard`` every block of each model, then the model itself, over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for model in models:
        if model is None:
            continue
        for block in shard_units(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)


__all__ = ["shard_denoisers", "shard_units"]
