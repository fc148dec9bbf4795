"""The one exponential moving average of parameters in the package (references, old policies, pretraining)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def ema_update_(averaged: Iterable[Tensor], online: Iterable[Tensor], decay: float) -> None:
    """In place: ``θ̄ ← decay · θ̄ + (1 − decay) · θ`` for each pair of tensors.

    Args:
        averaged: tensors of the moving average (updated in place).
        online: the current values, same shapes (read only).
        decay: in ``[0, 1]``; ``0`` copies ``online``, ``1`` keeps ``averaged``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    averaged, online = list(averaged), [t.detach() for t in online]
    if len(averaged) != len(online):
        raise ValueError(f"EMA over {len(averaged)} tensors but {len(online)} online tensors")
    if averaged:
        torch._foreach_lerp_(averaged, online, 1.0 - decay)


__all__ = ["ema_update_"]
