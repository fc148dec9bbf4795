"""A tiny random Wan 2.1 text-to-video pipeline, built offline in code (tests, notebooks, CI).

Every part has the architecture of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` with tiny widths: a
``UMT5EncoderModel`` text encoder (2 layers, width 32) with a ``T5Tokenizer`` learnt here from a few
sentences (:func:`~dgpo_lightning.models.testing.build_t5_tokenizer`; Wan's own tokenizer is umT5's
SentencePiece vocabulary, loaded by the pipeline as ``AutoTokenizer``), a ``WanTransformer3DModel``
(2 blocks, patch ``(1, 2, 2)``, QK RMS-norm across heads, cross-attention norm, as Wan 2.1), an
``AutoencoderKLWan`` (causal 3-D convolutions; one spatial stage that also halves time, so the
scale factors are 2 and 2 instead of Wan's 8 and 4; per-channel ``latents_mean`` / ``latents_std``
set away from 0 / 1 so tests see where the normalisation applies) and the scheduler of the
published pipeline, ``UniPCMultistepScheduler`` with flow sigmas and ``flow_shift`` 3 (Wan 2.1's
480p value; the ``WanPipeline`` docstring: 3.0 for 480p, 5.0 for 720p).

Defaults: 32 px, 5 pixel frames, hence latents ``[4, 3, 16, 16]`` (channels, latent frames
``(5 - 1) / 2 + 1``, height, width) and ``3 * 8 * 8 = 192`` transformer tokens.
"""

from __future__ import annotations

import torch

from dgpo_lightning.models.testing import build_t5_tokenizer, eval_components

#: Widths of the tiny Wan 2.1 (``latent_channels`` is the VAE's ``z_dim``: 16 in the real model).
TINY_WAN = {
    "text_width": 32,
    "latent_channels": 4,
    "resolution": 32,
    "num_frames": 5,
}

#: The scheduler of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (``scheduler/scheduler_config.json``):
#: UniPC in flow-matching mode, ``flow_shift`` 3.
WAN_SCHEDULER_CONFIG: dict = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "num_train_timesteps": 1000,
}


def tiny_umt5_encoder(tokenizer, width: int):
    """A tiny random ``UMT5EncoderModel`` (2 layers, 4 heads of 8, gated GELU) matched to ``tokenizer``;
    seeded by the caller."""
    from transformers import UMT5Config, UMT5EncoderModel

    from dgpo_lightning.models.testing import tiny_t5_config

    return UMT5EncoderModel(UMT5Config(**tiny_t5_config(tokenizer, width)))


def tiny_wan_vae(latent_channels: int, seed: int = 0):
    """A tiny random ``AutoencoderKLWan``: one down stage (x2 in space and time), ``z_dim`` channels."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[-0.3, 0.2, 0.5, -0.1][:latent_channels],
        latents_std=[1.5, 0.8, 2.0, 1.2][:latent_channels],
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    )


def build_tiny_wan(seed: int = 0, scheduler: str = "unipc"):
    """A ``WanPipeline`` with tiny random components, built offline (no hub).

    ``scheduler``: ``"unipc"`` (the published pipeline's) or ``"euler"`` (``FlowMatchEulerDiscreteScheduler``
    with the same shift, the scheduler whose steps are the package's ``ode_euler``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    sizes = TINY_WAN
    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_umt5_encoder(tokenizer, sizes["text_width"])
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE splits head_dim into time / height / width parts (4, 4, 4)
        in_channels=sizes["latent_channels"],
        out_channels=sizes["latent_channels"],
        text_dim=sizes["text_width"],
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = tiny_wan_vae(sizes["latent_channels"], seed=seed + 2)
    if scheduler == "unipc":
        schedule = UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG)
    elif scheduler == "euler":
        schedule = FlowMatchEulerDiscreteScheduler(shift=WAN_SCHEDULER_CONFIG["flow_shift"])
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'euler', got {scheduler!r}")
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=schedule)
    return eval_components(pipe, quiet=True)


__all__ = ["TINY_WAN", "WAN_SCHEDULER_CONFIG", "build_tiny_wan", "tiny_umt5_encoder", "tiny_wan_vae"]
