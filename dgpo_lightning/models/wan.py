"""Wan 2.1 text-to-video behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The parts of a diffusers ``WanPipeline`` are used as they are: its own ``encode_prompt`` (umT5's last
hidden state of the cleaned prompt, zeroed after the prompt's tokens and padded to
``max_sequence_length``), its ``WanTransformer3DModel`` as the denoiser and its causal video VAE
``AutoencoderKLWan`` with the per-channel ``latents_mean`` / ``latents_std`` normalisation.

The video contract (shared with the embedded video world):

* **Latents** are ``[B, C, F, h, w]``: ``C = z_dim`` (16), ``F = (num_frames - 1) / 4 + 1`` latent
  frames, ``h = H / 8``, ``w = W / 8`` (Wan's VAE factors; the tiny test VAE's are 2 and 2),
  normalised as the transformer expects, ``z_n = (z - mean) / std``. :meth:`WanBackbone.latent_shape`
  is ``(C, F, h, w)``; the samplers and the DGPO loss work per sample over all latent elements.
* ``decode(latents)`` returns videos ``[B, F_pixels, 3, H, W]`` in ``[0, 1]`` (the layout of the
  pipeline's own ``output_type="pt"``), ``encode(videos)`` the inverse; :attr:`num_frames` is the
  pixel frame count and :attr:`is_video` is ``True``. Rewards receive what ``decode`` returns (video
  rewards: :mod:`dgpo_lightning.rewards.video`).
* **Time.** The package's ``t`` in ``[0, 1]`` (``t = 1`` noise) is the scheduler's ``sigma``; the
  pipeline feeds ``timestep = 1000 sigma`` and the transformer predicts the flow velocity
  ``eps - x0`` (the Euler step ``x + (sigma_next - sigma) v``), the package's target.
* **CFG.** ``cfg_mode = "true"`` with ``WanPipeline.__call__``'s combination
  ``v_u + s (v_c - v_u)`` against the negative prompt (default ``""``: the pipeline's own default,
  and the empty negative prompt of Flow-GRPO's ``scripts/train_wan2_1.py``); guidance 5 by default
  (``WanPipeline.__call__``; Flow-Factory ``examples/grpo/*/wan21/t2v.yaml``).
* **Prompt lengths.** The pipeline pads every prompt to ``max_sequence_length`` (512 in
  ``__call__``) with zeros and the transformer attends to the padding (it takes no mask), so the
  conditioning is always that long. The prompt cache keeps each prompt's valid tokens only
  (``512 x 4096`` bf16 is 4 MB a prompt) and :meth:`WanBackbone._collate` zero-pads again: exactly
  the pipeline's embeddings.
* **Schedule shift.** Wan 2.1's published scheduler is ``UniPCMultistepScheduler`` with flow sigmas
  and ``flow_shift`` 3 (480p; 5 for 720p), a static shift: :attr:`WanBackbone.shift` is that value
  (``config.shift`` for a ``FlowMatchEulerDiscreteScheduler``), which ``flow_sigmas`` applies. The
  package's samplers run their own solvers (Euler / DPM / SDE) on that schedule; UniPC's multistep
  solver itself is not reproduced. Its flow sigmas are the same shift applied to the first ``N`` of
  ``linspace(1, 1/1000, N + 1)``, then 0 (``flow_sigmas``: ``linspace(1, 0, N + 1)``): within ``2e-3``
  of ``flow_sigmas(N, 3)`` at 10 steps (tested).
* Wan 2.2's two-expert pipelines (``transformer_2`` with ``boundary_ratio``) and its ``expand_timesteps``
  (TI2V-5B) are refused: one denoiser, one timestep per sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone

#: LoRA targets: the attention projections of Flow-GRPO's Wan 2.1 training (yifan123/flow_grpo,
#: scripts/train_wan2_1.py: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` in both the self-attention
#: ``attn1`` and the text cross-attention ``attn2`` of every block, ``LoraConfig(r=32,
#: lora_alpha=64)``; its list also names ``add_k_proj`` / ``add_v_proj`` / ..., which exist only in
#: the image-to-video model, so none match in T2V). Flow-Factory's Wan default
#: (src/flow_factory/models/wan/wan2_t2v.py) adds the FFN, ``ffn.net.0.proj`` and ``ffn.net.2``.
WAN_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class WanBackbone(DiffusersBackbone):
    """A Wan 2.1 text-to-video pipeline (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, 14B alike) as a
    video :class:`Backbone`.

    Conditioning: ``{"prompt_embeds": [B, max_sequence_length, D]}`` (zero after each prompt's tokens).

    Args:
        pipe: a ``WanPipeline``.
        resolution: video height in pixels (Flow-GRPO: 240; Flow-Factory: 256).
        width: video width in pixels (``None``: ``resolution``, square; Flow-GRPO: 416).
        num_frames: pixel frames, ``num_frames - 1`` a multiple of the VAE's temporal factor (4):
            Flow-GRPO 33, Flow-Factory 5 in training.
        max_sequence_length: umT5 tokens (``WanPipeline.__call__``'s and Flow-GRPO's 512).
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone` (umT5-XXL is ~11 GB
            in bf16, the reason to offload it).
    """

    pipeline_class = "WanPipeline"
    registry_name = "wan"
    example_model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    denoiser_class = "WanTransformer3DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = WAN_TARGET_MODULES
    cfg_mode = "true"
    #: ``WanPipeline.__call__``'s ``guidance_scale`` default (Flow-Factory's Wan 2.1 T2V uses 5; Flow-GRPO 4.5).
    default_guidance_scale = 5.0
    #: ``WanPipeline.encode_prompt``'s default negative prompt, and Flow-GRPO's.
    default_negative_prompt = ""
    #: Videos: ``decode`` returns ``[B, F, 3, H, W]``.
    is_video = True

    def __init__(
        self,
        pipe: Any,
        resolution: int = 480,
        width: int | None = None,
        num_frames: int = 81,
        max_sequence_length: int = 512,
        **shared: Any,
    ):
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError(
                "the wan backbone takes a one-transformer WanPipeline (Wan 2.1 T2V); Wan 2.2's two-expert "
                "pipelines (transformer_2, boundary_ratio) are not supported"
            )
        if getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("WanPipeline with expand_timesteps=True (Wan 2.2 TI2V) is not supported by the wan backbone")
        if int(max_sequence_length) <= 0:
            raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, resolution=resolution, **shared)
        self.height = self.resolution
        self.width = self.resolution if width is None else int(width)
        multiple = self.resolution_multiple()
        if self.width <= 0 or self.width % multiple:
            raise ValueError(f"width {width} must be a positive multiple of {multiple} (VAE factor x patch size)")
        self.temporal_factor = int(pipe.vae_scale_factor_temporal)
        self.spatial_factor = int(pipe.vae_scale_factor_spatial)
        self.num_frames = int(num_frames)
        if self.num_frames < 1 or (self.num_frames - 1) % self.temporal_factor:
            raise ValueError(
                f"num_frames {num_frames}: num_frames - 1 must be a multiple of the VAE's temporal factor "
                f"{self.temporal_factor} (e.g. {4 * self.temporal_factor + 1})"
            )
        self.latent_channels = int(self.vae.config.z_dim)
        self.shift = self._shift_from_scheduler()

    def resolution_multiple(self) -> int:
        return int(self._pipe.vae_scale_factor_spatial) * int(self._pipe.transformer.config.patch_size[1])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "WanBackbone":
        """See :meth:`DiffusersBackbone.from_pretrained`."""
        return super().from_pretrained(path, **kwargs)

    def _shift_from_scheduler(self) -> float:
        """The scheduler's static shift: UniPC's ``flow_shift`` (with ``use_flow_sigmas``) or
        ``FlowMatchEulerDiscreteScheduler``'s ``shift``."""
        config = self._pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            raise ValueError("a Wan scheduler with use_dynamic_shifting is not supported: set data.shift explicitly")
        if config.get("use_flow_sigmas", False):
            return float(config.get("flow_shift", 1.0))
        if "shift" in config:
            return float(config["shift"])
        raise ValueError(
            f"{type(self._pipe.scheduler).__name__} is not a flow-matching scheduler (no flow sigmas / shift); "
            "Wan 2.1 uses UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3)"
        )

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, L, D], "prompt_lengths": [B]}``: the pipeline's embeddings and each
        prompt's token count (its own tokenizer call), for the cache to keep the valid tokens only."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        embeds, _ = self._pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            device=device,
        )
        mask = self._pipe.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).attention_mask
        return {"prompt_embeds": embeds, "prompt_lengths": mask.gt(0).sum(dim=1).to(embeds.device)}

    def _row(self, batch: Conditioning, index: int) -> dict[str, Tensor]:
        # The valid tokens only: the rest is zeros, put back by _collate.
        length = int(batch["prompt_lengths"][index])
        return {"prompt_embeds": batch["prompt_embeds"][index, :length]}

    def _collate(self, rows: list[dict[str, Tensor]]) -> Conditioning:
        padded = [
            torch.nn.functional.pad(row["prompt_embeds"], (0, 0, 0, self.max_sequence_length - row["prompt_embeds"].shape[0]))
            for row in rows
        ]
        return {"prompt_embeds": torch.stack(padded)}

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding (a Conv3d) is never a LoRA target: the base model's dtype.
        return self.denoiser.patch_embedding.weight.dtype

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self._compute_dtype()
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            timestep=(1000.0 * t).float(),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)

    def latent_frames(self) -> int:
        """Latent frames of :attr:`num_frames` pixel frames: ``(F - 1) / temporal_factor + 1``."""
        return (self.num_frames - 1) // self.temporal_factor + 1

    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` of one video latent."""
        return (
            self.latent_channels,
            self.latent_frames(),
            self.height // self.spatial_factor,
            self.width // self.spatial_factor,
        )

    # ------------------------------------------------------------------ VAE

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, F, h, w]`` → videos ``[B, num_frames, 3, H, W]`` in ``[0, 1]`` (float32):
        ``vae.decode(z_n std + mean)`` mapped as the pipeline's ``output_type="pt"`` does."""
        if latents.ndim != 5:
            raise ValueError(f"wan decode expects latents [B, C, F, h, w], got {tuple(latents.shape)}")
        mean, std = self._stats(latents)
        z = latents.float() * std + mean
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    def encode(self, videos: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` → normalised latents ``(z - mean) / std`` with ``z``
        the posterior mean (a sample when a ``generator`` is given)."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"wan encode expects videos [B, F, 3, H, W], got {tuple(videos.shape)}")
        pixels = (2 * videos - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        posterior = self.vae.encode(pixels, return_dict=False)[0]
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).float()


#: The registry's loader (``model.backbone: wan``).
load_backbone = WanBackbone.load
