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

import collections
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dgpo_lightning.models.backbone import Conditioning, concat_conditioning


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


class SD3Backbone(nn.Module):
    """A Stable Diffusion 3/3.5 pipeline as a :class:`Backbone`.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (its modules are registered as submodules here, so
            ``.to()``, ``requires_grad_`` and state dicts reach them).
        resolution: image side in pixels (the paper: 512 for SD3.5-M).
        max_sequence_length: T5 tokens (diffusers' default 256).
        prompt_cache_size: prompts whose embeddings are kept (least recently used are dropped;
            ``0`` disables the cache). Rollouts re-encode the same prompts for every group member and
            every epoch, and the empty prompt for CFG at every step.
        negative_prompt: the unconditional prompt of CFG.
        offload_text_encoders: keep the text encoders (T5-XXL alone is ~9 GB in bf16) on the CPU
            and move them to the denoiser's device only while they encode prompts that are not
            cached. With the cache, that is the first rollout of each prompt.
    """

    def __init__(
        self,
        pipe: Any,
        resolution: int = 512,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 1024,
        negative_prompt: str = "",
        offload_text_encoders: bool = False,
    ):
        super().__init__()
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleList(
            [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        )
        self._pipe = pipe  # not an nn.Module: a plain attribute
        self.resolution = int(resolution)
        self.max_sequence_length = int(max_sequence_length)
        self.prompt_cache_size = int(prompt_cache_size)
        self.negative_prompt = negative_prompt
        self.offload_text_encoders = bool(offload_text_encoders)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch_size = int(self.denoiser.config.patch_size)
        multiple = self.vae_scale_factor * self.patch_size
        if self.resolution <= 0 or self.resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} (VAE factor x patch size)")
        self._cache: collections.OrderedDict[str, tuple[Tensor, Tensor]] = collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: Any, resolution: int = 512, **kwargs: Any) -> "SD3Backbone":
        """Wrap an already loaded ``StableDiffusion3Pipeline``."""
        return cls(pipe, resolution=resolution, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | str | None = torch.float32,
        resolution: int = 512,
        device: torch.device | str | None = None,
        max_sequence_length: int = 256,
        prompt_cache_size: int = 1024,
        offload_text_encoders: bool = False,
        **pipeline_kwargs: Any,
    ) -> "SD3Backbone":
        """Load a pipeline from a local directory or a hub id (resolved from the local cache when
        ``HF_HUB_OFFLINE=1``). ``torch_dtype`` may be a string (``"bfloat16"``) as in YAML configs;
        ``pipeline_kwargs`` go to ``StableDiffusion3Pipeline.from_pretrained`` (e.g.
        ``text_encoder_3=None`` to drop T5).
        """
        from diffusers import StableDiffusion3Pipeline

        text = os.fspath(path)
        looks_local = text.startswith((".", "/", "~")) or os.sep in text.rstrip(os.sep).split(os.sep, 1)[-1]
        local = Path(text).expanduser()
        if looks_local and not local.exists():
            raise FileNotFoundError(f"SD3 pipeline directory {text!r} does not exist")
        if local.is_dir() and not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{text!r} is not a diffusers pipeline directory: model_index.json is missing")
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(
                # diffusers >= 0.36 names it ``dtype`` (``torch_dtype`` is deprecated there).
                str(local) if local.exists() else text, dtype=_as_dtype(torch_dtype), **pipeline_kwargs
            )
        except OSError as error:
            offline = " (HF_HUB_OFFLINE=1: hub ids resolve only from the local cache)" if os.environ.get(
                "HF_HUB_OFFLINE"
            ) else ""
            raise OSError(f"could not load a StableDiffusion3Pipeline from {text!r}{offline}: {error}") from error
        backbone = cls(
            pipe,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            prompt_cache_size=prompt_cache_size,
            offload_text_encoders=offload_text_encoders,
        )
        if device is not None:
            backbone.to(device)
            backbone.offload_idle()
        return backbone

    @property
    def pipeline(self):
        """The diffusers pipeline, its transformer set to the current ``denoiser`` (with adapters)."""
        if self._pipe.transformer is not self.denoiser:
            self._pipe.transformer = self.denoiser
        return self._pipe

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def train(self, mode: bool = True) -> "SD3Backbone":
        # Text encoders and VAE are frozen feature extractors: keep dropout off (T5 has 0.1) so
        # cached embeddings and decoded images do not depend on the Lightning train/eval mode.
        super().train(mode)
        self.text_encoders.eval()
        self.vae.eval()
        return self

    # ------------------------------------------------------------------ prompts

    def clear_prompt_cache(self) -> None:
        self._cache.clear()

    def offload_idle(self) -> None:
        """With ``offload_text_encoders``, put the text encoders back on the CPU (a no-op otherwise).

        The Lightning module calls it after the Trainer has moved the whole module to the GPU."""
        if self.offload_text_encoders:
            self.text_encoders.to("cpu")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        # Moved by hand rather than with accelerate's model-offload hooks: those move a model back
        # only when the next hooked model runs, which would leave T5 on the GPU through training.
        if self.offload_text_encoders:
            self.text_encoders.to(self.device)
        encoder_device = next(self.text_encoders.parameters()).device if len(self.text_encoders) else self.device
        try:
            prompt_embeds, _, pooled, _ = self._pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=encoder_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        finally:
            self.offload_idle()
        return prompt_embeds, pooled

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``{"prompt_embeds": [B, 77 + T5 tokens, D], "pooled_prompt_embeds": [B, D_pooled]}``.

        Unique prompts that are not cached are encoded in one batch by the pipeline's
        ``encode_prompt``; repeated prompts come from the cache.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self.cache_hits += sum(p in found for p in prompts)
        self.cache_misses += len(missing)
        if missing:
            embeds, pooled = self._encode_uncached(missing)
            if embeds.is_inference():
                # Encoded inside torch.inference_mode (e.g. a validation rollout): keep normal
                # tensors in the cache so later training steps may use them in autograd.
                with torch.inference_mode(False):
                    embeds, pooled = embeds.clone(), pooled.clone()
            for i, prompt in enumerate(missing):
                found[prompt] = (embeds[i], pooled[i])
                if self.prompt_cache_size > 0:
                    self._cache[prompt] = found[prompt]
            while len(self._cache) > self.prompt_cache_size:
                self._cache.popitem(last=False)
        device = self.device
        return {
            "prompt_embeds": torch.stack([found[p][0] for p in prompts]).to(device),
            "pooled_prompt_embeds": torch.stack([found[p][1] for p in prompts]).to(device),
        }

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding is never a LoRA target, so its dtype is the base model's even when
        # adapters are kept in fp32.
        embed = getattr(getattr(self.denoiser, "pos_embed", None), "proj", None)
        if embed is not None:
            return embed.weight.dtype
        return next(self.denoiser.parameters()).dtype

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

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Predicted ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``; ``t`` is ``[B]`` (or a scalar).

        ``guidance_scale != 1`` adds classifier-free guidance against :attr:`negative_prompt`, with
        the conditional and unconditional passes batched together.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t.to(x_t.device)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if guidance_scale == 1.0:
            return self._forward(x_t, t, cond)
        uncond = self.encode_prompts([self.negative_prompt] * batch)
        v = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditioning([uncond, cond]))
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), side, side)

    # ------------------------------------------------------------------ VAE

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in ``[0, 1]`` (float32)."""
        config = self.vae.config
        z = latents / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` → latents (the posterior mean; a sample when a
        ``generator`` is given), scaled as the transformer expects."""
        config = self.vae.config
        posterior = self.vae.encode((2 * images - 1).to(self.vae.dtype), return_dict=False)[0]
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return ((z - (config.shift_factor or 0.0)) * config.scaling_factor).float()
