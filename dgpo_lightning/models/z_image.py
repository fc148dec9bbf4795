"""Z-Image and Z-Image-Turbo behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The parts of a diffusers ``ZImagePipeline`` are used as they are: its own ``encode_prompt`` (the
Qwen3 chat template with ``enable_thinking=True``, i.e. ``<|im_start|>user\\n{prompt}<|im_end|>\\n
<|im_start|>assistant\\n``, tokens padded to ``max_sequence_length``, the second-to-last hidden
state of the text encoder, the padding dropped so each prompt has its own length ``L_i``), its
``ZImageTransformer2DModel`` (single-stream DiT, 2x2 patches) as the denoiser and its FLUX-style VAE
(16 channels, ``scaling_factor`` 0.3611 / ``shift_factor`` 0.1159 in the published config).

Conditioning. The transformer takes Python lists per sample: latents ``[C, 1, H, W]`` and caption
features ``[L_i, D]``. Here a batch is ``{"prompt_embeds": [B, L_max, D], "prompt_mask": [B, L_max]}``
(zero padded, ``True`` on real tokens), so the package's batch-first tools (indexing, repeating,
concatenating) apply; :meth:`ZImageBackbone._forward` cuts each row back to its ``L_i`` tokens.
The transformer pads each caption to a multiple of 32 with its own pad token and masks batch padding
itself, so a sample's output does not depend on what else is in the batch (up to float rounding).

Time convention. The pipeline's scheduler works with ``sigma`` (``x_sigma = (1 - sigma) x0 +
sigma eps``, the package's ``t``) and timesteps ``1000 sigma``; the pipeline feeds the transformer
``timestep = (1000 - 1000 sigma) / 1000 = 1 - sigma`` (the model's own time runs from 0 = noise to
1 = data; it multiplies by ``t_scale`` = 1000 inside) and negates its output before the Euler step
``x + (sigma_next - sigma) * noise_pred``. So the transformer predicts ``x0 - eps`` and the package's
``v = eps - x0`` is ``-transformer(x_t, 1 - t)``.

CFG. The pipeline combines ``pos + s (pos - neg)`` with its ``guidance_scale = s`` and runs CFG
when ``s > 0``; that is the package's true CFG ``v_u + g (v_c - v_u)`` with ``g = s + 1``. So:

* Z-Image (base, ``turbo=False``): ``cfg_mode = "true"``; ``default_guidance_scale = 5.0`` is the
  pipeline's ``guidance_scale = 4`` (the model card's example; it recommends 3-5).
* Z-Image-Turbo (``turbo=True``): ``cfg_mode = "none"``, ``default_guidance_scale = 1.0`` (the
  pipeline's ``guidance_scale = 0``, as the model card and TDM-R1 sample it).

The pipeline's CFG options: ``cfg_normalization`` (default off) caps the norm of each guided sample
at ``cfg_normalization * ||pos||``; ``cfg_truncation`` (default 1.0: never) switches CFG off for
samples whose model time ``1 - t`` exceeds it. Both are backbone options here, applied exactly as
the pipeline does (per sample, over the whole latent).

Schedule shift. ``shift`` comes from the scheduler config: Z-Image-Turbo's is
``FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)``, so ``shift = 3``. With
``use_dynamic_shifting`` the pipeline's ``mu = calculate_shift((h/2)(w/2), ...)`` at the backbone's
resolution gives ``shift = exp(mu)`` (``time_shift_type="exponential"``) or ``mu`` (``"linear"``),
which :func:`~dgpo_lightning.sampling.flow_sigmas` reproduces exactly. ``shift_terminal``, Karras /
exponential / beta sigmas and inverted sigmas cannot be expressed by ``flow_sigmas``: a ``ValueError``.

Steps. diffusers >= 0.37 (PR 13730) samples ``num_inference_steps = N`` with sigmas
``linspace(1, 1/N, N)`` (shifted) and a final 0: ``N`` transformer passes, exactly
``flow_sigmas(N, shift)`` here. Older releases (and the Z-Image-Turbo / TDM-R1 model cards:
``num_inference_steps=9`` "results in 8 DiT forwards", ``5`` in 4) counted one more; the package's
``num_steps`` is always the number of transformer passes (TDM-R1's 4 NFEs: ``num_steps: 4``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone

#: TDM-R1's LoRA targets for Z-Image-Turbo (Luo-Yihong/TDM-R1 README: ``LoraConfig(r=32,
#: lora_alpha=64, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0",
#: "add_k_proj", "add_v_proj"])``). Z-Image's single-stream attention has no ``add_*_proj`` (peft
#: skips them there too), so these four are what TDM-R1 trains: every attention projection of
#: ``noise_refiner``, ``context_refiner`` and ``layers``.
Z_IMAGE_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: TDM-R1's LoRA rank / alpha on Z-Image-Turbo (same source).
TDM_R1_LORA_RANK, TDM_R1_LORA_ALPHA = 32, 64


def _pad_rows(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[L_i, D]`` rows → ``([B, L_max, D]`` zero padded, ``[B, L_max]`` bool mask)."""
    longest = max(int(row.shape[0]) for row in rows)
    first = rows[0]
    embeds = first.new_zeros((len(rows), longest, first.shape[-1]))
    mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=first.device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return embeds, mask


def _unpad(cond: Conditioning) -> list[Tensor]:
    """``[L_i, D]`` per sample from a padded conditioning (real tokens are a prefix)."""
    lengths = cond["prompt_mask"].sum(dim=1).tolist()
    return [cond["prompt_embeds"][i, : int(n)] for i, n in enumerate(lengths)]


class ZImageBackbone(DiffusersBackbone):
    """A Z-Image or Z-Image-Turbo pipeline as a :class:`Backbone` (module docstring for the
    conventions).

    Args:
        pipe: a ``ZImagePipeline``.
        resolution: image side in pixels (a multiple of ``vae_scale_factor * 2``, as the pipeline
            requires: 16 for the real VAE).
        turbo: ``True`` for Z-Image-Turbo (no CFG), ``False`` for the base model (true CFG);
            ``None`` infers it from the pipeline's name or path (``"turbo"`` in it, case
            insensitive), else ``False``.
        max_sequence_length: text tokens before padding is dropped (the pipeline's default 512).
        cfg_normalization: the pipeline's option (``0``/``False``: off, its default).
        cfg_truncation: the pipeline's option (``1.0``: CFG at every step, its default).
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone`.
    """

    pipeline_class = "ZImagePipeline"
    registry_name = "z_image"
    example_model = "Tongyi-MAI/Z-Image-Turbo, with backbone_options turbo: true"
    denoiser_class = "ZImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = Z_IMAGE_TARGET_MODULES
    cfg_mode = "true"  # per instance: "none" with turbo
    default_guidance_scale = 5.0  # per instance: 1.0 with turbo
    default_negative_prompt = ""  # the pipeline's default negative prompt

    def __init__(
        self,
        pipe: Any,
        resolution: int = 1024,
        turbo: bool | None = None,
        max_sequence_length: int = 512,
        cfg_normalization: float = 0.0,
        cfg_truncation: float = 1.0,
        **shared: Any,
    ):
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, resolution=resolution, **shared)
        if turbo is None:
            name = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
            turbo = "turbo" in name.lower()
        self.turbo = bool(turbo)
        self.cfg_mode = "none" if self.turbo else "true"
        self.default_guidance_scale = 1.0 if self.turbo else 5.0
        self.cfg_normalization = float(cfg_normalization or 0.0)
        self.cfg_truncation = float(cfg_truncation)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.patch_size = 2  # the pipeline calls the transformer with its default patch_size=2
        if self.patch_size not in tuple(self.denoiser.config.all_patch_size):
            raise ValueError(f"ZImageTransformer2DModel has patch sizes {self.denoiser.config.all_patch_size}, needs 2")
        self.shift = self._scheduler_shift()

    def resolution_multiple(self) -> int:
        # The pipeline's own check: height and width divisible by vae_scale_factor * 2.
        return int(self._pipe.vae_scale_factor) * 2

    def _scheduler_shift(self) -> float:
        """``flow_sigmas``' shift equal to the scheduler's schedule at :attr:`resolution`."""
        config = self._pipe.scheduler.config
        unsupported = [
            key
            for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
            if config.get(key)
        ]
        if unsupported:
            raise ValueError(
                f"the Z-Image scheduler config sets {unsupported}, which the package's flow_sigmas "
                "(s t / (1 + (s - 1) t)) cannot reproduce; use a scheduler without them"
            )
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        side = self.resolution // self.vae_scale_factor
        mu = calculate_shift(
            (side // 2) * (side // 2),  # the pipeline's image_seq_len
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        kind = config.get("time_shift_type", "exponential")
        if kind == "exponential":
            return math.exp(mu)
        if kind == "linear":
            return float(mu)
        raise ValueError(f"unknown time_shift_type {kind!r} in the Z-Image scheduler config")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "ZImageBackbone":
        """See :meth:`DiffusersBackbone.from_pretrained` (``turbo``, ``resolution``, ... configure
        the backbone)."""
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, L_max, D], "prompt_mask": [B, L_max]}`` from ``encode_prompt``."""
        # encode_prompt writes the chat-templated text into the list it is given: pass a copy.
        embeds, _ = self._pipe.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        padded, mask = _pad_rows(embeds)
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def _row(self, batch: Conditioning, index: int) -> dict[str, Tensor]:
        # The cache keeps each prompt unpadded: {"prompt_embeds": [L_i, D]}.
        length = int(batch["prompt_mask"][index].sum())
        return {"prompt_embeds": batch["prompt_embeds"][index, :length]}

    def _collate(self, rows: list[dict[str, Tensor]]) -> Conditioning:
        padded, mask = _pad_rows([row["prompt_embeds"] for row in rows])
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def _concat_batches(self, conds: Sequence[Conditioning]) -> Conditioning:
        # Batches padded to different lengths (the negative prompt and the prompts): re-pad.
        rows = [row for cond in conds for row in _unpad(cond)]
        padded, mask = _pad_rows(rows)
        return {"prompt_embeds": padded, "prompt_mask": mask}

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding is never a LoRA target: its dtype is the base model's.
        embedder = self.denoiser.all_x_embedder[f"{self.patch_size}-1"]
        return getattr(embedder, "base_layer", embedder).weight.dtype

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``v = -transformer([x_t[i, :, None]], 1 - t, [cap_i])`` (module docstring), ``[B, C, h, w]``."""
        dtype = self._compute_dtype()
        latents = list(x_t.to(dtype).unsqueeze(2).unbind(dim=0))  # [C, 1, h, w] each
        captions = [row.to(dtype) for row in _unpad(cond)]
        # The pipeline's arithmetic: timestep 1000 sigma, then (1000 - timestep) / 1000.
        timestep = (1000.0 - 1000.0 * t.float()) / 1000.0
        out = self.denoiser(latents, timestep, captions, patch_size=self.patch_size, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2).to(x_t.dtype)

    def _guide(self, v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
        """The pipeline's CFG, ``pos + (g - 1)(pos - neg)`` (= ``v_u + g (v_c - v_u)``), with its
        optional per-sample norm cap ``||pred|| <= cfg_normalization * ||pos||``."""
        pred = v_cond + (scale - 1.0) * (v_cond - v_uncond)
        if self.cfg_normalization > 0.0:
            pos_norm = v_cond.flatten(1).norm(dim=1).view(-1, *([1] * (pred.ndim - 1)))
            new_norm = pred.flatten(1).norm(dim=1).view(-1, *([1] * (pred.ndim - 1)))
            cap = pos_norm * self.cfg_normalization
            pred = torch.where(new_norm > cap, pred * (cap / new_norm), pred)
        return pred

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """See :meth:`DiffusersBackbone.velocity`; with ``cfg_truncation < 1`` samples whose model
        time ``1 - t`` exceeds it get the conditional velocity only (the pipeline's rule)."""
        v = super().velocity(x_t, t, cond, guidance_scale)
        if guidance_scale == 1.0 or self.cfg_truncation >= 1.0:
            return v
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t.to(x_t.device)
        late = (1.0 - t) > self.cfg_truncation
        if not bool(late.any()):
            return v
        v_cond = self._forward(x_t, t, cond)
        return torch.where(late.view(-1, *([1] * (v.ndim - 1))), v_cond, v)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), side, side)
    # VAE: the base class's AutoencoderKL decode/encode (scaling and shift factors).


#: The registry's loader (``model.backbone: z_image``).
load_backbone = ZImageBackbone.load


__all__ = ["TDM_R1_LORA_ALPHA", "TDM_R1_LORA_RANK", "Z_IMAGE_TARGET_MODULES", "ZImageBackbone", "load_backbone"]
