"""FLUX.1 (dev and schnell) behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The parts of a diffusers ``FluxPipeline`` are used as they are: its own ``encode_prompt`` (CLIP-L's
pooled output + the T5 token sequence), its ``FluxTransformer2DModel`` as the denoiser, its latent
packing and position ids, and its VAE with the VAE's scaling and shift factors.

Latents. The protocol's latents are unpacked, ``[B, 16, h, w]`` with ``h = resolution /
vae_scale_factor`` (VAE-normalised: ``(z - shift_factor) * scaling_factor``). :meth:`FluxBackbone._forward`
packs them into FLUX's 2x2 patch tokens ``[B, h w / 4, 64]`` with the pipeline's ``_pack_latents``,
passes ``img_ids`` from its ``_prepare_latent_image_ids`` (``(0, row, col)`` per token) and
``txt_ids = 0`` (what ``encode_prompt`` returns), and unpacks the output with ``_unpack_latents``. The
per-sample mean over latent elements (the DGPO loss) is invariant to this permutation.

Time. The package's ``t`` in ``[0, 1]`` (``t = 1`` noise, ``x_t = (1 - t) x0 + t eps``) is FLUX's
``sigma``. ``FluxPipeline`` feeds ``timestep / 1000`` with ``timestep = 1000 sigma``, i.e. ``sigma`` itself
(the transformer multiplies by 1000 inside), and its Euler step ``x + (sigma_next - sigma) v``
integrates the output: the transformer predicts ``v = eps - x0``, the package's velocity target, with
no sign change.

Guidance (:attr:`FluxBackbone.cfg_mode`, read from ``transformer.config.guidance_embeds``):

* FLUX.1-dev is guidance-distilled (``"distilled"``): the backbone option ``guidance`` (3.5, the
  pipeline's default ``guidance_scale``) is fed to the guidance embedding in *every* forward pass —
  rollouts, training and the frozen reference alike — in one pass.
* FLUX.1-schnell has no guidance embedding (``"none"``).

In both, ``velocity(..., guidance_scale=s > 1)`` still means true CFG against the negative prompt
(``FluxPipeline``'s ``true_cfg_scale``, default 1: off), the distilled guidance value going to both
halves as in the pipeline.

Schedule shift. ``FluxPipeline`` samples on ``sigmas = linspace(1, 1/N, N)`` (plus the final 0); with
dynamic shifting (dev) the scheduler maps them by ``exp(mu) / (exp(mu) + 1/sigma - 1)`` with ``mu =
calculate_shift(image_seq_len, ...)`` from the packed token count at the backbone's resolution, which
is :func:`~dgpo_lightning.sampling.flow_sigmas` with ``shift = exp(mu)`` (dev at 512 px: 1024 tokens,
``mu = 0.63``, shift 1.88; at 1024 px: 4096 tokens, ``mu = 1.15``, shift 3.16). Without dynamic
shifting (schnell) the shift is ``scheduler.config.shift`` (1). Scheduler options ``flow_sigmas``
cannot express (``shift_terminal``, Karras / exponential / beta sigmas, a non-exponential time shift,
``invert_sigmas``) raise a ``ValueError``: the package's samplers would silently run another schedule.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone

#: LoRA targets of FLUX.1's double-stream blocks (attention of both streams and both MLPs); the
#: ``attn.to_q/k/v`` names also match the single-stream blocks' attention. The list used by
#: Flow-GRPO (yifan123/flow_grpo, scripts/train_flux.py, rank 64 / alpha 128) and, identically,
#: Flow-Factory's FLUX.1 default (X-GenGroup/Flow-Factory, src/flow_factory/models/flux/flux1.py,
#: ``default_target_modules``).
FLUX_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

#: FLUX.1-dev's distilled guidance value (``FluxPipeline(guidance_scale=3.5)``; Flow-GRPO's and
#: Flow-Factory's FLUX.1-dev recipes use 3.5 too).
DEFAULT_GUIDANCE = 3.5


def flux_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """The :func:`~dgpo_lightning.sampling.flow_sigmas` shift equal to what ``FluxPipeline`` makes
    ``scheduler`` do at ``image_seq_len`` packed tokens: ``exp(mu)`` with FLUX's ``calculate_shift``
    under dynamic shifting, else ``config.shift``. Raises ``ValueError`` for schedules it cannot express."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    get = scheduler_config.get
    unsupported = [
        name
        for name in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
        if get(name, None)
    ]
    if get("use_dynamic_shifting", False) and get("time_shift_type", "exponential") != "exponential":
        unsupported.append(f"time_shift_type={get('time_shift_type')!r}")
    if unsupported:
        raise ValueError(
            f"the FLUX scheduler config sets {unsupported}, which the package's flow_sigmas(N, shift) "
            "schedule cannot express; use a scheduler without them"
        )
    if not get("use_dynamic_shifting", False):
        return float(get("shift", 1.0))
    mu = calculate_shift(
        image_seq_len,
        get("base_image_seq_len", 256),
        get("max_image_seq_len", 4096),
        get("base_shift", 0.5),
        get("max_shift", 1.15),
    )
    return math.exp(mu)


class FluxBackbone(DiffusersBackbone):
    """A FLUX.1-dev or FLUX.1-schnell pipeline as a :class:`Backbone` (which one is read from
    ``transformer.config.guidance_embeds``).

    Args:
        pipe: a ``FluxPipeline``.
        resolution: image side in pixels (Flow-GRPO's FLUX.1-dev recipe: 512).
        max_sequence_length: T5 tokens; ``None``: 512 for dev (``FluxPipeline``'s default), 256 for
            schnell (the limit its model card gives).
        guidance: the distilled guidance value of dev, fed to the guidance embedding in every forward
            pass; ``None``: 3.5 for dev. Schnell has no guidance embedding: a value is an error.
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone` (T5-XXL alone is
            ~9 GB in bf16, the reason to offload it).
    """

    pipeline_class = "FluxPipeline"
    registry_name = "flux"
    example_model = "black-forest-labs/FLUX.1-dev"
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_targets = FLUX_TARGET_MODULES
    cfg_mode = "distilled"  # per instance: "none" for schnell
    default_guidance_scale = 1.0  # true CFG off, as FluxPipeline's true_cfg_scale
    default_negative_prompt = ""

    def __init__(
        self,
        pipe: Any,
        resolution: int = 512,
        max_sequence_length: int | None = None,
        guidance: float | None = None,
        **shared: Any,
    ):
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        if self.guidance_embeds:
            self.cfg_mode = "distilled"
            self.guidance: float | None = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        else:
            if guidance is not None:
                raise ValueError(
                    f"guidance={guidance}: this FLUX transformer has no guidance embedding "
                    "(guidance_embeds=False, e.g. FLUX.1-schnell); leave the option unset"
                )
            self.cfg_mode = "none"
            self.guidance = None
        if max_sequence_length is None:
            max_sequence_length = 512 if self.guidance_embeds else 256
        if not 0 < int(max_sequence_length) <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (FluxPipeline's limit), got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(pipe, resolution=resolution, **shared)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.latent_channels = int(self.denoiser.config.in_channels) // 4
        side = self.resolution // self.vae_scale_factor
        #: packed tokens per image at this resolution (what FluxPipeline's ``calculate_shift`` reads).
        self.image_seq_len = (side // 2) ** 2
        #: the rollout schedule's shift (module docstring): ``exp(mu)`` for dev, ``shift`` for schnell.
        self.shift = flux_shift(pipe.scheduler.config, self.image_seq_len)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "FluxBackbone":
        """See :meth:`DiffusersBackbone.from_pretrained` (``resolution``, ``guidance``,
        ``max_sequence_length`` configure the backbone)."""
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, max_sequence_length, D_t5], "pooled_prompt_embeds": [B, D_clip]}``
        (T5 is padded to ``max_sequence_length``, so rows stack; ``text_ids`` are zeros, made in
        :meth:`_forward`)."""
        prompt_embeds, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding is never a LoRA target: its dtype is the base model's.
        embed = getattr(self.denoiser, "x_embedder", None)
        if embed is not None and hasattr(embed, "weight"):
            return embed.weight.dtype
        return super()._compute_dtype()

    def pack(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` → FLUX's 2x2 patch tokens ``[B, (h/2)(w/2), 4C]`` (the pipeline's ``_pack_latents``)."""
        batch, channels, height, width = latents.shape
        return self._pipe._pack_latents(latents, batch, channels, height, width)

    def unpack(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Inverse of :meth:`pack` for latents of ``height x width`` (the pipeline's ``_unpack_latents``,
        which takes pixel sizes)."""
        factor = self.vae_scale_factor
        return self._pipe._unpack_latents(tokens, height * factor, width * factor, factor)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """One FLUX transformer pass on packed ``x_t`` at ``timestep = t`` (FluxPipeline's
        ``(1000 sigma) / 1000``), guidance embedding fed with :attr:`guidance` when the model has one."""
        batch, _, height, width = x_t.shape
        if height % 2 or width % 2:
            raise ValueError(f"FLUX latents need even sides for 2x2 packing, got {height}x{width}")
        dtype = self._compute_dtype()
        device = x_t.device
        prompt_embeds = cond["prompt_embeds"].to(dtype)
        img_ids = self._pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = (
            torch.full((batch,), self.guidance, device=device, dtype=torch.float32) if self.guidance_embeds else None
        )
        out = self.denoiser(
            hidden_states=self.pack(x_t).to(dtype),
            timestep=t.to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, height, width).to(x_t.dtype)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)
    # VAE: the base class's AutoencoderKL decode/encode (scaling and shift factors).


#: The registry's loader (``model.backbone: flux``).
load_backbone = FluxBackbone.load


__all__ = ["DEFAULT_GUIDANCE", "FLUX_TARGET_MODULES", "FluxBackbone", "flux_shift", "load_backbone"]
