"""JPEG (in)compressibility: the size of the image saved as JPEG (DDPO's toy rewards; no weights).

``jpeg_incompressibility`` is the file size in kB at quality 95 (Black et al. 2023, DDPO; the same
setting in Flow-GRPO / DGPO's ``flow_grpo/rewards.py``); ``jpeg_compressibility`` is its negative.
``scale`` multiplies both (Flow-GRPO divides the compressibility by 500 for training).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.rewards.base import register


def jpeg_sizes_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image ``[B, 3, H, W]`` in ``[0, 1]`` saved by PIL as JPEG."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"JPEG reward: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize:
    """``sign · scale · size_kB`` (see module docstring)."""

    def __init__(self, sign: float, quality: int = 95, scale: float = 1.0):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must lie in [1, 100], got {quality}")
        self.sign, self.quality, self.scale = float(sign), int(quality), float(scale)

    def __call__(
        self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        return self.sign * self.scale * jpeg_sizes_kb(images, self.quality)


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95, scale: float = 1.0) -> JpegSize:
    """Reward large JPEG files (detail, noise)."""
    return JpegSize(+1.0, quality, scale)


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95, scale: float = 1.0) -> JpegSize:
    """Reward small JPEG files (flat, simple images)."""
    return JpegSize(-1.0, quality, scale)
