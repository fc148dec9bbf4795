"""What every diffusers text-to-image pipeline shares behind the :class:`Backbone` protocol.

A backbone for one pipeline family (SD3, FLUX.1, Qwen-Image, SANA, Z-Image) subclasses
:class:`DiffusersBackbone` and writes only what differs: its prompt encoding through the pipeline's
own ``encode_prompt`` (:meth:`_encode_batch`), its denoiser call in the package's time convention
(:meth:`_forward`), its latent layout and its VAE. Shared here, once: loading from a local directory
or a cached hub id, the LRU prompt cache, text-encoder offloading, classifier-free guidance, the
frozen-parts train/eval mode, and the LoRA file format (the pipeline class's own
``save_lora_weights`` / ``load_lora_weights``, named by :attr:`DiffusersBackbone.pipeline_class`).

CFG modes (:attr:`DiffusersBackbone.cfg_mode`), so the loss and the reference run what the model
runs:

* ``"true"`` — ``guidance_scale = s > 1`` evaluates the negative prompt and the prompt in one batch
  and combines them with :meth:`_guide` (``v_u + s (v_c - v_u)``; Qwen-Image rescales the norm).
* ``"distilled"`` — FLUX.1-dev: the guidance value is an input embedding of one forward pass (the
  backbone's ``guidance`` option, used in rollouts, training and the reference alike);
  ``guidance_scale`` still means true CFG on top, which FLUX.1-dev does not use (keep it 1).
* ``"none"`` — few-step or distilled models sampled without guidance (FLUX.1-schnell,
  Z-Image-Turbo); ``guidance_scale > 1`` still applies true CFG if asked.
"""

from __future__ import annotations

import collections
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from dgpo_lightning.models.backbone import Conditioning, concat_conditioning

def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``"bfloat16"`` / ``"bf16"`` / ``"torch.bfloat16"`` (YAML configs)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return value


class DiffusersBackbone(nn.Module):
    """A diffusers text-to-image pipeline as a :class:`~dgpo_lightning.models.backbone.Backbone`.

    Subclasses set the class attributes and implement :meth:`_encode_batch`, :meth:`_forward` and
    :meth:`latent_shape` (and :meth:`decode` / :meth:`encode` for a VAE other than an
    ``AutoencoderKL`` with scaling and shift factors).

    Args:
        pipe: the diffusers pipeline (its modules become submodules here, so ``.to()``,
            ``requires_grad_`` and state dicts reach them).
        resolution: image side in pixels.
        prompt_cache_size: prompts whose embeddings are kept (least recently used dropped; ``0``
            disables). Rollouts re-encode each prompt for every group member and every epoch, and
            the negative prompt at every CFG step.
        negative_prompt: the unconditional prompt of true CFG (``None``: the class default).
        offload_text_encoders: keep the text encoders on the CPU and move them to the denoiser's
            device only while they encode prompts that are not cached.
    """

    #: diffusers pipeline class name (loading and the LoRA format).
    pipeline_class: ClassVar[str]
    #: ``model.backbone`` name and an example hub id, for error messages.
    registry_name: ClassVar[str]
    example_model: ClassVar[str] = ""
    #: diffusers class name of the denoiser (``pipe.transformer``).
    denoiser_class: ClassVar[str]
    #: pipeline attributes holding text encoders.
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: LoRA targets used when the config names none (the peers' defaults for this model).
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: ``"true"``, ``"distilled"`` or ``"none"`` (module docstring); a backbone serving several
    #: checkpoints sets it per instance (FLUX.1 dev/schnell, Z-Image/Turbo), as it may
    #: ``default_guidance_scale``.
    cfg_mode: str = "true"
    #: the model's own default of ``guidance_scale`` (true CFG) for sampling.
    default_guidance_scale: float = 1.0
    default_negative_prompt: ClassVar[str] = ""

    def __init__(
        self,
        pipe: Any,
        resolution: int = 512,
        prompt_cache_size: int = 1024,
        negative_prompt: str | None = None,
        offload_text_encoders: bool = False,
    ):
        super().__init__()
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        encoders = [getattr(pipe, name, None) for name in self.text_encoder_names]
        self.text_encoders = nn.ModuleList([m for m in encoders if m is not None])
        self._pipe = pipe  # not an nn.Module: a plain attribute
        self.resolution = int(resolution)
        self.prompt_cache_size = int(prompt_cache_size)
        self.negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt
        self.offload_text_encoders = bool(offload_text_encoders)
        multiple = self.resolution_multiple()
        if self.resolution <= 0 or self.resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple} (VAE factor x patch size)")
        self._cache: collections.OrderedDict[str, dict[str, Tensor]] = collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.requires_grad_(False)
        self.eval()

    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling x patch size)."""
        return int(self._pipe.vae_scale_factor) * 2

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "DiffusersBackbone":
        """Wrap an already loaded pipeline."""
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | str | None = torch.float32,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "DiffusersBackbone":
        """Load from a local pipeline directory or a hub id (resolved from the local cache when
        ``HF_HUB_OFFLINE=1``; nothing is downloaded then).

        ``kwargs`` that name this class's constructor arguments (``resolution``, ...) configure the
        backbone; the rest go to the pipeline's ``from_pretrained`` (e.g. ``text_encoder_3=None``
        drops SD3's T5). ``torch_dtype`` may be a string (``"bfloat16"``) as in YAML configs.
        """
        import diffusers

        pipeline_type = getattr(diffusers, cls.pipeline_class)
        # Subclasses take their own options and pass the shared ones (**shared) on to this class.
        own = {
            name
            for klass in cls.__mro__
            if isinstance(klass, type) and issubclass(klass, DiffusersBackbone)
            for name, parameter in inspect.signature(klass.__init__).parameters.items()
            if name not in ("self", "pipe") and parameter.kind is not inspect.Parameter.VAR_KEYWORD
        }
        backbone_kwargs = {k: v for k, v in kwargs.items() if k in own}
        pipeline_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        text = os.fspath(path)
        looks_local = text.startswith((".", "/", "~")) or os.sep in text.rstrip(os.sep).split(os.sep, 1)[-1]
        local = Path(text).expanduser()
        if looks_local and not local.exists():
            raise FileNotFoundError(f"{cls.pipeline_class} directory {text!r} does not exist")
        if local.is_dir() and not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"{text!r} is not a diffusers pipeline directory: model_index.json is missing")
        try:
            pipe = pipeline_type.from_pretrained(
                # diffusers >= 0.36 names it ``dtype`` (``torch_dtype`` is deprecated there).
                str(local) if local.exists() else text, dtype=as_dtype(torch_dtype), **pipeline_kwargs
            )
        except OSError as error:
            offline = " (HF_HUB_OFFLINE=1: hub ids resolve only from the local cache)" if os.environ.get(
                "HF_HUB_OFFLINE"
            ) else ""
            raise OSError(f"could not load a {cls.pipeline_class} from {text!r}{offline}: {error}") from error
        backbone = cls(pipe, **backbone_kwargs)
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

    def train(self, mode: bool = True) -> "DiffusersBackbone":
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

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The pipeline's own prompt encoding of ``prompts`` on ``device``: batch-first tensors."""
        raise NotImplementedError

    def _collate(self, rows: list[dict[str, Tensor]]) -> Conditioning:
        """Per-prompt rows (from the cache or a fresh batch) → one batch. Stacks; backbones whose
        prompts have varying token counts pad here."""
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> Conditioning:
        # Moved by hand rather than with accelerate's model-offload hooks: those move a model back
        # only when the next hooked model runs, which would leave T5 on the GPU through training.
        if self.offload_text_encoders:
            self.text_encoders.to(self.device)
        encoder_device = next(self.text_encoders.parameters()).device if len(self.text_encoders) else self.device
        try:
            return self._encode_batch(prompts, encoder_device)
        finally:
            self.offload_idle()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning for ``len(prompts)`` samples (keys per backbone, batch first).

        Unique prompts that are not cached are encoded in one batch by the pipeline's own
        ``encode_prompt``; repeated prompts come from the cache.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        unique = list(dict.fromkeys(prompts))
        found: dict[str, dict[str, Tensor]] = {}
        for prompt in unique:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
        missing = [p for p in unique if p not in found]
        self.cache_hits += sum(p in found for p in prompts)
        self.cache_misses += len(missing)
        if missing:
            batch = self._encode_uncached(missing)
            if any(value.is_inference() for value in batch.values()):
                # Encoded inside torch.inference_mode (e.g. a validation rollout): keep normal
                # tensors in the cache so later training steps may use them in autograd.
                with torch.inference_mode(False):
                    batch = {key: value.clone() for key, value in batch.items()}
            for i, prompt in enumerate(missing):
                found[prompt] = self._row(batch, i)
                if self.prompt_cache_size > 0:
                    self._cache[prompt] = found[prompt]
            while len(self._cache) > self.prompt_cache_size:
                self._cache.popitem(last=False)
        device = self.device
        return {key: value.to(device) for key, value in self._collate([found[p] for p in prompts]).items()}

    def _concat_batches(self, conds: Sequence[Conditioning]) -> Conditioning:
        """Several conditionings as one batch (for CFG's two halves); padding backbones override it."""
        return concat_conditioning(conds)

    def _row(self, batch: Conditioning, index: int) -> dict[str, Tensor]:
        """Row ``index`` of a freshly encoded batch, as the cache keeps it."""
        return {key: value[index] for key, value in batch.items()}

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The first parameter that is not a LoRA weight: adapters may be kept in fp32 on a bf16 base.
        for name, param in self.denoiser.named_parameters():
            if ".lora_" not in name:
                return param.dtype
        return next(self.denoiser.parameters()).dtype

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """One denoiser pass: ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``, ``t`` ``[B]`` in ``[0, 1]``."""
        raise NotImplementedError

    def _unconditional(self, batch: int) -> Conditioning:
        """True CFG's unconditional conditioning for ``batch`` samples (the negative prompt)."""
        return self.encode_prompts([self.negative_prompt] * batch)

    def _guide(self, v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
        """True CFG: ``v_u + s (v_c - v_u)``."""
        return v_uncond + scale * (v_cond - v_uncond)

    def velocity(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Predicted ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``; ``t`` is ``[B]`` (or a scalar).

        ``guidance_scale != 1`` adds true classifier-free guidance against :attr:`negative_prompt`,
        the conditional and unconditional passes batched together.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t.to(x_t.device)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if guidance_scale == 1.0:
            return self._forward(x_t, t, cond)
        uncond = self._unconditional(batch)
        v = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), self._concat_batches([uncond, cond]))
        v_uncond, v_cond = v.chunk(2)
        return self._guide(v_uncond, v_cond, guidance_scale)

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE
    # An ``AutoencoderKL`` with ``scaling_factor`` and ``shift_factor`` (SD3, FLUX.1, Z-Image);
    # backbones with another VAE (Qwen-Image's video VAE, SANA's DC-AE) override both.

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in ``[0, 1]`` (float32):
        ``vae.decode(latents / scaling_factor + shift_factor)``, as the pipelines decode."""
        config = self.vae.config
        z = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` → latents ``(z - shift_factor) * scaling_factor``
        with ``z`` the posterior mean (a sample when a ``generator`` is given)."""
        config = self.vae.config
        posterior = self.vae.encode((2 * images - 1).to(self.vae.dtype), return_dict=False)[0]
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return ((z - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor).float()

    # ------------------------------------------------------------------ registry

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **options: Any) -> "DiffusersBackbone":
        """The registry's loader (``model.backbone: <registry_name>``): :meth:`from_pretrained`, with
        a clear error when ``model.model_path`` is missing."""
        if not path:
            raise ValueError(
                f"model.backbone={cls.registry_name} needs model.model_path: a local {cls.pipeline_class} "
                f"directory or a hub id already in the local cache (e.g. {cls.example_model})"
            )
        return cls.from_pretrained(path, **options)


__all__ = ["DiffusersBackbone", "as_dtype"]
