"""FSDP2 sharding of denoisers over a data-parallel device mesh."""

from __future__ import annotations

from typing import Iterable

from torch import nn


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a denoiser: a transformer's ``transformer_blocks`` or a UNet's
    down/mid/up blocks (each becomes its own shard unit, so one block is gathered at a time)."""
    units: list[nn.Module] = []
    for name in ("transformer_blocks", "down_blocks", "up_blocks"):
        units.extend(getattr(model, name, None) or [])
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
