"""A tiny random FLUX.1 (dev or schnell) pipeline, built offline in code (tests, notebooks, CI).

The architecture is FLUX.1's: CLIP-L (pooled output only) + T5 encoder, a ``FluxTransformer2DModel``
with double-stream (MMDiT) and single-stream blocks, rotary position ids over (text, row, column),
2x2 latent packing (``in_channels = 4 x 16``), a 16-channel VAE without quant convs and FLUX's VAE
scaling 0.3611 / shift 0.1159, and the flow-matching Euler scheduler configured like the real model's
``scheduler/scheduler_config.json``. Widths are tiny; the VAE downsamples by 2, so the default 32 px
images have 16x16 latents, i.e. 8x8 = 64 packed transformer tokens.
"""

from __future__ import annotations

import torch

from dgpo_lightning.models.testing import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    eval_components,
    tiny_autoencoder_kl,
    tiny_clip_text_config,
    tiny_t5_encoder,
)

#: Widths of the tiny FLUX.1. ``attention_head_dim`` equals ``sum(axes_dims_rope)`` as FLUX requires
#: (128 = 16 + 56 + 56 in the real model).
TINY_FLUX = {
    "clip_hidden": 16,
    "t5_width": 32,
    "latent_channels": 16,
    "attention_head_dim": 8,
    "axes_dims_rope": (2, 2, 4),
    "resolution": 32,
}

#: FLUX.1-dev's scheduler config (black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json):
#: resolution-dependent ("dynamic") shifting, ``mu`` from the packed image sequence length.
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

#: FLUX.1-schnell's scheduler config: no dynamic shifting, ``shift = 1`` (a plain linear schedule).
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` with tiny random components, built offline.

    Args:
        seed: seeds every component (each from its own offset, so they differ).
        guidance_embeds: ``True`` builds a FLUX.1-dev-like model (guidance-distilled: the guidance
            value is an input embedding) with dev's dynamically shifted scheduler; ``False`` a
            FLUX.1-schnell-like one (no guidance embedding, scheduler shift 1, no dynamic shifting).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    sizes = TINY_FLUX
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, sizes["clip_hidden"], sizes["clip_hidden"]))
    torch.manual_seed(seed + 1)
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, sizes["t5_width"])
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * sizes["latent_channels"],  # 2x2 packed latents
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=sizes["attention_head_dim"],
        num_attention_heads=2,
        joint_attention_dim=sizes["t5_width"],
        pooled_projection_dim=sizes["clip_hidden"],  # CLIPTextModel's pooler output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=sizes["axes_dims_rope"],
    )
    torch.manual_seed(seed + 3)
    # FLUX.1's vae/config.json scaling and shift
    vae = tiny_autoencoder_kl(sizes["latent_channels"], sizes["resolution"], scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return eval_components(pipe)


__all__ = ["FLUX_DEV_SCHEDULER", "FLUX_SCHNELL_SCHEDULER", "TINY_FLUX", "build_tiny_flux"]
