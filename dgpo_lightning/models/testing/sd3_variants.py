"""Tiny SD3 pipelines with the architectural traits of the other SD3 releases, built offline.

:func:`~dgpo_lightning.models.testing.build_tiny_sd3` is shaped like SD3.5-Medium (MMDiT-X: a
dual-attention block, QK RMS-norm). SD3.5-Large differs in its transformer only (same three text
encoders, same 16-channel VAE with scaling 1.5305 / shift 0.0609, same flow-matching scheduler with
shift 3; ``stabilityai/stable-diffusion-3.5-large``'s ``transformer/config.json``):

* no dual-attention blocks (``dual_attention_layers`` absent, i.e. ``()``): every block is a plain
  joint-attention MMDiT block;
* QK RMS-norm (``qk_norm: "rms_norm"``), as in Medium;
* a positional table of ``pos_embed_max_size = 192`` for ``sample_size = 128`` (ratio 1.5; Medium's is
  384 for 128, ratio 3), so Large crops a smaller table;
* wider and deeper (38 blocks of 38 heads x 64; ``caption_projection_dim = 2432`` = the inner width).

:func:`build_tiny_sd35_large` keeps every other part of the tiny SD3 (text encoders, tokenizers, VAE,
scheduler, seeds) and swaps in a transformer with those traits at tiny width.
"""

from __future__ import annotations

from typing import Any

import torch

from dgpo_lightning.models.testing import TINY_SD3, build_tiny_sd3

#: SD3.5-Large's positional table over its sample size (192 / 128).
SD35_LARGE_POS_EMBED_RATIO = 1.5


def tiny_sd35_large_transformer_config(sizes: dict[str, int] = TINY_SD3, num_layers: int = 2) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs with SD3.5-Large's traits at tiny width (see the module docstring).

    The caption projection equals the inner width (heads x head dim), as in Large (2432 = 38 x 64);
    the pooled projection is the two CLIP projections side by side, as in every SD3.
    """
    sample_size = sizes["resolution"] // 2  # the tiny VAE downsamples by 2
    heads, head_dim = 2, 8
    return {
        "sample_size": sample_size,
        "patch_size": 2,
        "in_channels": sizes["latent_channels"],
        "out_channels": sizes["latent_channels"],
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": sizes["t5_width"],
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": 2 * sizes["clip_projection"],
        "pos_embed_max_size": int(SD35_LARGE_POS_EMBED_RATIO * sample_size),
        "qk_norm": "rms_norm",
        "dual_attention_layers": (),
    }


def build_tiny_sd35_large(seed: int = 0, num_layers: int = 2):
    """A ``StableDiffusion3Pipeline`` shaped like SD3.5-Large with tiny random components.

    Text encoders, tokenizers, VAE and scheduler are :func:`build_tiny_sd3`'s (same seeds, so the
    same weights); the transformer is :func:`tiny_sd35_large_transformer_config`'s, seeded with
    ``seed + 3`` as :func:`build_tiny_sd3` seeds its own. 32 px images, 16x16 latents.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    medium = build_tiny_sd3(seed=seed)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(**tiny_sd35_large_transformer_config(num_layers=num_layers))
    transformer.eval()
    components = {**medium.components, "transformer": transformer}
    return StableDiffusion3Pipeline(**components)


__all__ = ["SD35_LARGE_POS_EMBED_RATIO", "build_tiny_sd35_large", "tiny_sd35_large_transformer_config"]
