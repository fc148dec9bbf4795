"""Qwen-Image behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The parts of a diffusers ``QwenImagePipeline`` are used as they are: its own ``encode_prompt``
(Qwen2.5-VL's last hidden state of the prompt inside Qwen-Image's chat template, the template's
34 system-prefix tokens dropped, truncated to ``max_sequence_length``), its
``QwenImageTransformer2DModel`` as the denoiser and its video-style ``AutoencoderKLQwenImage`` with
the per-channel ``latents_mean`` / ``latents_std`` normalisation. Adapted here:

* **Latent layout.** The protocol's latents are ``[B, C, h, w]`` (``C = z_dim = 16``, ``h = H / 8``),
  normalised as the transformer expects, ``z_n = (z - mean) / std``. :meth:`QwenImageBackbone._forward`
  packs them into 2x2 patches, ``[B, h/2 * w/2, 4 C]``, with the pipeline's own ``_pack_latents``,
  and unpacks the prediction; the VAE sees ``[B, C, 1, h, w]`` (one frame).
* **Time.** The package's ``t`` in ``[0, 1]`` (``t = 1`` noise) is the scheduler's ``sigma``; the
  pipeline passes ``timestep / 1000 = sigma`` to the transformer, which predicts ``eps - x0`` (the
  scheduler's Euler step ``x + (sigma_next - sigma) v``), the package's velocity target.
* **Prompt lengths.** ``encode_prompt`` pads a batch to its longest prompt and returns
  ``prompt_embeds_mask``; the prompt cache keeps each prompt *without* padding and
  :meth:`QwenImageBackbone._collate` / :meth:`QwenImageBackbone._concat_batches` pad and mask again,
  so a batch mixing cached and new prompts is what the pipeline computes (padding is masked out of
  the joint attention and sits after the valid tokens, so it moves no RoPE position).
* **CFG.** ``cfg_mode = "true"`` with the negative prompt ``" "`` (Flow-GRPO's Qwen-Image rollouts
  pass ``negative_prompt=[" "]``), combined as ``QwenImagePipeline.__call__`` does with
  ``true_cfg_scale = s``: ``comb = v_u + s (v_c - v_u)``, then rescaled token by token to the
  conditional prediction's norm, ``comb * ||v_c|| / ||comb||``, the norms over the ``4 C`` features
  of each packed 2x2 token (:meth:`QwenImageBackbone._guide`).
* **Schedule shift.** Qwen-Image's scheduler shifts with the image token count (dynamic exponential
  shifting): ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` with ``mu = calculate_shift(tokens, ...)`` from
  the scheduler config, which is :func:`~dgpo_lightning.sampling.flow_sigmas`' ``time_shift`` with
  ``shift = e^mu``; :attr:`QwenImageBackbone.shift` is that value at the backbone's resolution
  (``~1.71`` at 512 px: 1024 tokens). The published config also has ``shift_terminal = 0.02``,
  which stretches the shifted schedule so that its last non-zero sigma is ``0.02``. No shift
  expresses that, so the backbone hands the samplers the pipeline's exact schedule
  (:meth:`QwenImageBackbone.sampling_sigmas`, taken by ``SamplerSettings.resolve`` when no
  ``shift`` is configured); an explicit ``data.shift`` runs ``flow_sigmas`` instead.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone

#: LoRA targets of Flow-GRPO's Qwen-Image training (yifan123/flow_grpo,
#: scripts/train_qwenimage_edit_plus.py, ``target_modules`` with ``LoraConfig(r=64, lora_alpha=128)``):
#: every attention projection of both streams and both streams' MLPs in each dual-stream block.
QWEN_IMAGE_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)

#: Layers that only feed the text stream's *output*: in the last block nothing reads that output (the
#: model returns the image tokens), so an adapter there gets no gradient (the text-query projection:
#: an exactly zero one; the text output projection and MLP: none, and DDP without
#: ``find_unused_parameters`` fails on parameters that never get one). Text keys and values stay.
LAST_BLOCK_UNUSED_MODULES: tuple[str, ...] = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def lora_targets_for(num_layers: int) -> tuple[str, ...]:
    """:data:`QWEN_IMAGE_TARGET_MODULES` minus the last block's unused text-stream layers
    (:data:`LAST_BLOCK_UNUSED_MODULES`), named per block so peft's suffix matching skips exactly those.

    Numerically the same training as Flow-GRPO's targets (the skipped adapters stay at ``B = 0``
    there), with every trainable parameter receiving a gradient."""
    shared = tuple(t for t in QWEN_IMAGE_TARGET_MODULES if t not in LAST_BLOCK_UNUSED_MODULES)
    per_block = tuple(f"transformer_blocks.{i}.{t}" for i in range(num_layers - 1) for t in LAST_BLOCK_UNUSED_MODULES)
    return shared + per_block


def _pad_to(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``[B, L, D]`` embeddings and ``[B, L]`` mask zero-padded to ``length`` tokens."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds, mask
    return (
        torch.nn.functional.pad(embeds, (0, 0, 0, extra)),
        torch.nn.functional.pad(mask, (0, extra)),
    )


class QwenImageBackbone(DiffusersBackbone):
    """A Qwen-Image pipeline (``Qwen/Qwen-Image``; any checkpoint of ``QwenImagePipeline``) as a
    :class:`Backbone`.

    Conditioning: ``{"prompt_embeds": [B, L, D], "prompt_embeds_mask": [B, L]}`` (long, 1 = token),
    ``L`` the longest prompt of the batch after the template drop (at most ``max_sequence_length``).

    LoRA: the class attribute :attr:`lora_targets` is Flow-GRPO's list; an instance's
    ``lora_targets`` (what the Lightning module uses) is the same minus the last block's four unused
    text-stream layers (:func:`lora_targets_for`).

    Args:
        pipe: a ``QwenImagePipeline``.
        resolution: image side in pixels (Flow-GRPO trains Qwen-Image at 512).
        max_sequence_length: prompt tokens kept after the template (the pipeline's default 512;
            at most 1024).
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone` (the Qwen2.5-VL-7B
            text encoder is ~16 GB in bf16, the reason to offload it).
    """

    pipeline_class = "QwenImagePipeline"
    registry_name = "qwen_image"
    example_model = "Qwen/Qwen-Image"
    denoiser_class = "QwenImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = QWEN_IMAGE_TARGET_MODULES
    cfg_mode = "true"
    #: ``QwenImagePipeline.__call__``'s ``true_cfg_scale`` default (Flow-GRPO's Qwen-Image configs use 4 too).
    default_guidance_scale = 4.0
    #: Flow-GRPO's Qwen-Image negative prompt (``negative_prompt=[" "] * len(prompts)``).
    default_negative_prompt = " "

    def __init__(
        self,
        pipe: Any,
        resolution: int = 512,
        max_sequence_length: int = 512,
        **shared: Any,
    ):
        if not 0 < int(max_sequence_length) <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024 (QwenImagePipeline's limit), got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, resolution=resolution, **shared)
        if getattr(self.denoiser.config, "guidance_embeds", False):
            raise ValueError(
                "this Qwen-Image transformer has guidance_embeds=True (a guidance-distilled variant), which the "
                "qwen_image backbone does not feed; use a true-CFG checkpoint such as Qwen/Qwen-Image"
            )
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.latent_channels = int(pipe.vae.config.z_dim)
        #: LoRA targets (an instance attribute: it names blocks): see :func:`lora_targets_for`.
        self.lora_targets = lora_targets_for(len(self.denoiser.transformer_blocks))
        self.mu = self._mu()
        self.shift = self._shift_from_scheduler()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "QwenImageBackbone":
        """See :meth:`DiffusersBackbone.from_pretrained`."""
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ schedule

    def image_seq_len(self) -> int:
        """Transformer image tokens at :attr:`resolution`: ``(H / vae_scale_factor / 2)^2``."""
        side = self.resolution // self.vae_scale_factor // 2
        return side * side

    def _mu(self) -> float:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self._pipe.scheduler.config
        # The same config lookups (and defaults) as QwenImagePipeline.__call__.
        return float(
            calculate_shift(
                self.image_seq_len(),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )

    def _shift_from_scheduler(self) -> float:
        """``s`` of ``flow_sigmas`` reproducing the scheduler's shift at this resolution.

        Dynamic exponential shifting ``e^mu / (e^mu + 1/t - 1)`` is ``s = e^mu``; dynamic linear
        shifting ``mu / (mu + 1/t - 1)`` is ``s = mu``; a static scheduler uses ``config.shift``.
        Parts of the config that no shift expresses (``shift_terminal``) are in
        :meth:`sampling_sigmas`, the schedule the samplers use by default.
        """
        config = self._pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            kind = config.get("time_shift_type", "exponential")
            if kind == "exponential":
                shift = math.exp(self.mu)
            elif kind == "linear":
                shift = self.mu
            else:
                raise ValueError(f"unknown scheduler time_shift_type {kind!r}")
        else:
            shift = float(config.get("shift", 1.0))
        # shift_terminal (and Karras/exponential/beta sigmas): no shift expresses them, so the samplers
        # take the pipeline's exact schedule from sampling_sigmas (SamplerSettings.resolve); an
        # explicit data.shift replaces it with flow_sigmas.
        return float(shift)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """The schedule the package's samplers use when no shift is configured: the pipeline's own
        (:meth:`pipeline_sigmas`, which equals ``flow_sigmas(N, shift)`` without ``shift_terminal``)."""
        return self.pipeline_sigmas(num_steps)

    def pipeline_sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` sigmas (last ``0``) that ``QwenImagePipeline(num_inference_steps=N)``
        integrates at :attr:`resolution`: its grid ``linspace(1, 1/N, N)`` through the scheduler's
        ``set_timesteps(sigmas=..., mu=mu)``, ``shift_terminal`` stretch included."""
        import numpy as np

        scheduler = copy.deepcopy(self._pipe.scheduler)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=self.mu)
        return scheduler.sigmas.float()

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, L, D], "prompt_embeds_mask": [B, L]}`` from the pipeline's ``encode_prompt``."""
        embeds, mask = self._pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.long()}

    def _row(self, batch: Conditioning, index: int) -> dict[str, Tensor]:
        """Prompt ``index`` without its padding: ``{"prompt_embeds": [L_i, D]}`` (the pipeline's mask
        is a prefix of ones, so its valid tokens are the first ``L_i``)."""
        length = int(batch["prompt_embeds_mask"][index].sum())
        # A view, as the base class keeps (a copy here would be an inference tensor when the prompt
        # is first seen inside torch.inference_mode: the base class un-infers the batch, not the rows).
        return {"prompt_embeds": batch["prompt_embeds"][index, :length]}

    def _collate(self, rows: list[dict[str, Tensor]]) -> Conditioning:
        """Unpadded rows → ``[B, L_max, D]`` zero-padded embeddings and their ``[B, L_max]`` mask."""
        length = max(row["prompt_embeds"].shape[0] for row in rows)
        embeds = torch.stack([torch.nn.functional.pad(r["prompt_embeds"], (0, 0, 0, length - r["prompt_embeds"].shape[0])) for r in rows])
        mask = torch.stack(
            [
                torch.arange(length, device=embeds.device) < r["prompt_embeds"].shape[0]
                for r in rows
            ]
        ).long()
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def _concat_batches(self, conds: Sequence[Conditioning]) -> Conditioning:
        """Batches with different prompt lengths padded to the longest, then concatenated."""
        length = max(c["prompt_embeds"].shape[1] for c in conds)
        padded = [_pad_to(c["prompt_embeds"], c["prompt_embeds_mask"], length) for c in conds]
        return {
            "prompt_embeds": torch.cat([e for e, _ in padded]),
            "prompt_embeds_mask": torch.cat([m for _, m in padded]),
        }

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The image input projection is never a LoRA target: its dtype is the base model's even
        # when adapters are kept in fp32.
        img_in = getattr(self.denoiser, "img_in", None)
        if img_in is not None:
            return img_in.weight.dtype
        return super()._compute_dtype()

    def pack(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` → ``[B, h/2 * w/2, 4 C]`` 2x2 patch tokens (the pipeline's ``_pack_latents``)."""
        b, c, h, w = latents.shape
        return self._pipe._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
        """Inverse of :meth:`pack`: ``[B, h/2 * w/2, 4 C]`` → ``[B, C, h, w]`` (the pipeline's
        ``_unpack_latents`` without its frame axis)."""
        b, _, features = tokens.shape
        c = features // 4
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x0`` for ``x_t`` ``[B, C, h, w]`` at ``sigma = t``: the transformer on the packed
        tokens with ``timestep = sigma`` (the pipeline's ``timestep / 1000``), ``img_shapes``
        ``[(1, h/2, w/2)]`` per sample and the prompt mask (``None`` when nothing is padded, as the
        pipeline passes it)."""
        dtype = self._compute_dtype()
        batch, _, h, w = x_t.shape
        mask = cond["prompt_embeds_mask"]
        out = self.denoiser(
            hidden_states=self.pack(x_t.to(dtype)),
            timestep=t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * batch,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w).to(x_t.dtype)

    def _guide(self, v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
        """Qwen-Image's true CFG: ``comb = v_u + s (v_c - v_u)``, rescaled per packed token to the
        conditional norm, ``comb * ||v_c|| / ||comb||`` (norms over each 2x2 token's ``4 C``
        features, exactly ``QwenImagePipeline.__call__``; no epsilon, as there)."""
        h, w = v_cond.shape[-2:]
        cond = self.pack(v_cond)
        comb = self.pack(v_uncond)
        comb = comb + scale * (cond - comb)
        comb = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return self.unpack(comb, h, w)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    # ------------------------------------------------------------------ VAE

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in ``[0, 1]`` (float32): ``z = z_n std + mean``
        on one frame ``[B, C, 1, h, w]``, as ``QwenImagePipeline.__call__`` decodes."""
        z = latents[:, :, None].to(self.vae.dtype)
        mean, std = self._latent_stats(z)
        z = z / (1.0 / std) + mean  # the pipeline's form: latents / (1 / std) + mean
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` → normalised latents ``(z - mean) / std``
        ``[B, C, h, w]`` (the posterior mode; a sample when a ``generator`` is given), as the
        Qwen-Image edit pipelines encode their input images."""
        x = (2 * images - 1)[:, :, None].to(self.vae.dtype)
        posterior = self.vae.encode(x, return_dict=False)[0]
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) * (1.0 / std))[:, :, 0].float()


#: The registry's loader (``model.backbone: qwen_image``).
load_backbone = QwenImageBackbone.load


__all__ = ["QWEN_IMAGE_TARGET_MODULES", "LAST_BLOCK_UNUSED_MODULES", "QwenImageBackbone", "load_backbone", "lora_targets_for"]
