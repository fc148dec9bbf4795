"""Stable Diffusion 3 / 3.5 behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The parts of a diffusers ``StableDiffusion3Pipeline`` are used as they are: its own ``encode_prompt``
(CLIP-L, CLIP-G and T5, concatenated as SD3 expects), its ``SD3Transformer2DModel`` as the denoiser
and its VAE with the VAE's scaling and shift factors. Only the time convention is adapted: the
package's ``t`` in ``[0, 1]`` (``t = 1`` noise) is SD3's ``sigma``, the transformer is fed
``timestep = 1000 * t`` and predicts ``eps - x0``, which is the package's velocity target (the
scheduler's Euler step ``x + (sigma_next - sigma) * v`` integrates exactly that).

CFG: ``velocity(..., guidance_scale=s)`` evaluates the empty prompt and the prompt in one batch and
returns ``v_u + s (v_c - v_u)``. The paper's default mode (CFG in rollouts, none in training) and
the CFG-free mode with a CFG reference (``kl_cfg``) are both choices of ``guidance_scale`` by the
caller.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone
from dgpo_lightning.models.lora import SD3_TARGET_MODULES

class SD3Backbone(DiffusersBackbone):
    """A Stable Diffusion 3/3.5 pipeline (Medium or Large: nothing here depends on the size) as a
    :class:`Backbone`.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        resolution: image side in pixels (the paper: 512 for SD3.5-M).
        max_sequence_length: T5 tokens (diffusers' default 256).
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone` (T5-XXL alone is
            ~9 GB in bf16, the reason to offload it).
    """

    pipeline_class = "StableDiffusion3Pipeline"
    registry_name = "sd3"
    example_model = "stabilityai/stable-diffusion-3.5-medium"
    denoiser_class = "SD3Transformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_targets = SD3_TARGET_MODULES
    cfg_mode = "true"
    #: SD3's sampling schedule shift (its scheduler config; the paper's rollouts use 3 as well).
    shift = 3.0

    def __init__(
        self,
        pipe: Any,
        resolution: int = 512,
        max_sequence_length: int = 256,
        **shared: Any,
    ):
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, resolution=resolution, **shared)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = int(self.denoiser.config.patch_size)

    def resolution_multiple(self) -> int:
        return 2 ** (len(self._pipe.vae.config.block_out_channels) - 1) * int(self._pipe.transformer.config.patch_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "SD3Backbone":
        """See :meth:`DiffusersBackbone.from_pretrained` (e.g. ``text_encoder_3=None`` drops T5)."""
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, 77 + T5 tokens, D], "pooled_prompt_embeds": [B, D_pooled]}``."""
        prompt_embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding is never a LoRA target, so its dtype is the base model's even when
        # adapters are kept in fp32.
        embed = getattr(getattr(self.denoiser, "pos_embed", None), "proj", None)
        if embed is not None:
            return embed.weight.dtype
        return super()._compute_dtype()

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self._compute_dtype()
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=(1000.0 * t).float(),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), side, side)
    # VAE: the base class's AutoencoderKL decode/encode (scaling and shift factors).


#: The registry's loader (``model.backbone: sd3``).
load_backbone = SD3Backbone.load
