"""Weight-free visual-quality proxies for out-of-domain evaluation.

``sharpness``: the variance of the Laplacian of the luminance (Pech-Pacheco et al. 2000, the
classic focus / blur measure), computed per image on the ``[0, 1]`` scale and multiplied by
``scale`` (default 100). Blur and flat colour lower it; fine detail and noise raise it, so it is a
proxy to watch next to a trained reward (reward hacking by smoothing shows up as a drop), not a
target in itself.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dgpo_lightning.rewards.base import register

#: ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def laplacian_variance(images: Tensor) -> Tensor:
    """Variance over pixels of the 4-neighbour Laplacian of the luma, per image ``[B]``.

    Border pixels are excluded (valid convolution), so image size does not bias the value.
    """
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 3:
        raise ValueError(f"sharpness: expected images [B, 3, H >= 3, W >= 3] in [0, 1], got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    luma = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kernel = torch.tensor(_LAPLACIAN, device=x.device).view(1, 1, 3, 3)
    response = F.conv2d(luma, kernel)
    return response.flatten(1).var(dim=1, unbiased=False)


class Sharpness:
    """``scale · Var(Laplacian(luma))`` per image."""

    def __init__(self, scale: float = 100.0):
        self.scale = float(scale)

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        return self.scale * laplacian_variance(images)


@register("sharpness")
def sharpness(scale: float = 100.0) -> Sharpness:
    """Eval-only visual-quality proxy (see module docstring)."""
    return Sharpness(scale)
