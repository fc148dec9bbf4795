"""SANA (diffusers ``SanaPipeline``) behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

The pipeline's parts are used as they are: its own ``encode_prompt`` (Gemma-2 hidden states, SANA's
"complex human instruction" prefix, ``max_sequence_length = 300``, the ``[0] + last 299`` token
selection of the SANA paper's section 3.1 and the attention mask), its linear-attention
``SanaTransformer2DModel`` as the denoiser, and its 32-channel DC-AE (``AutoencoderDC``, spatial factor
32 for the released models) with the VAE's ``scaling_factor`` (0.41407; DC-AE has no shift factor).

Time convention: the package's ``t`` in ``[0, 1]`` (1 = noise) is SANA's flow sigma; the transformer
is fed ``timestep = 1000 t · transformer.config.timestep_scale`` (the pipeline's
``t * timestep_scale`` with scheduler timesteps ``1000 σ``; ``timestep_scale = 1`` for SANA 1.0/1.5)
and predicts the flow velocity ``eps - x0``, which is the package's target (the schedulers'
``flow_prediction``: Euler's step is ``x + (σ' - σ) v``). Latents are ``[B, 32, H/32, W/32]``
(patch size 1, so no packing).

Sampling schedule. SANA's published scheduler is ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
prediction_type="flow_prediction", flow_shift=3.0)`` (DPM-Solver++ 2M on shifted flow sigmas, the same
solver as the package's ``ode_dpm``; NVlabs/Sana ``configs/sana_config/1024ms/Sana_1600M_img1024.yaml``:
``flow_shift: 3.0``, ``vis_sampler: flow_dpm-solver``, DC-AE ``scale_factor: 0.41407``,
``model_max_length: 300`` and the same ``chi_prompt``): :attr:`SanaBackbone.shift` is read from the
scheduler's ``flow_shift`` (``shift`` of a ``FlowMatchEulerDiscreteScheduler`` swapped in). Two details of diffusers' DPM path
that the package's samplers do not copy: its grid spaces ``linspace(1 - 1/1000, 0, N + 1)`` before
shifting (first sigma ≈ 0.9997, not 1), and it casts its timesteps to ``int64``, so the transformer sees
``floor(1000 σ)`` where this backbone feeds ``1000 σ`` exactly (a time offset below 1/1000). With those
two reproduced the pipeline's DPM rollout equals ``ode_dpm`` (tests); with a
``FlowMatchEulerDiscreteScheduler`` and explicit ``sigmas`` the pipeline equals ``ode_euler``.
Dynamic shifting (``use_dynamic_shifting``) is not part of SANA's configs and is refused.

CFG: true CFG against the negative prompt ``""`` (the pipeline's default ``guidance_scale`` is 4.5).
The pipeline encodes the negative prompt *without* the complex human instruction and without the
token selection; :meth:`SanaBackbone.velocity` does the same (cached under a private key). The
pipeline's PAG / ControlNet / Sprint variants are not covered (separate pipeline classes); the
pipeline's resolution binning (snapping ``height``/``width`` to aspect-ratio bins) does not apply:
this backbone samples at exactly ``resolution``.

Peers: NVlabs/Sana's own RL post-training (``train_scripts/train_nft_sana.py``,
``train_scripts/sol_rl/train_sana.py``; configs ``configs/nft/nft_sana.py``: SANA-1600M at 1024 px,
10 rollout steps, 40 eval steps, CFG 1.0, LoRA on the self- and cross-attention projections) encodes
prompts with ``pipeline.encode_prompt(prompt, negative_prompt="", max_sequence_length=300)``, i.e.
*without* the complex human instruction (``encode_prompt``'s own default): pass
``complex_human_instruction=False`` to do the same. yifan123/flow_grpo, X-GenGroup/Flow-Factory and
NVlabs/DiffusionNFT do not ship a SANA backbone.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.models.diffusers_backbone import DiffusersBackbone

#: LoRA targets: the attention projections of both attentions of every block (``attn1``: linear
#: self-attention, ``attn2``: cross-attention to the caption). NVlabs/Sana's RL post-training
#: (``configs/nft/nft_sana.py``, ``config.train.lora_target_modules``) adapts the native model's
#: ``attn.qkv``, ``attn.proj``, ``cross_attn.q_linear``, ``cross_attn.kv_linear``, ``cross_attn.proj``,
#: which are exactly these layers in diffusers' naming; the GLU-MBConv feed-forward convs are not adapted.
SANA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

#: Cache-key prefix of negative prompts (encoded as the pipeline encodes them: no instruction prefix).
_NEGATIVE_KEY = "\x00sana-negative\x00"


def pipeline_complex_human_instruction() -> list[str]:
    """The ``complex_human_instruction`` default of ``SanaPipeline.__call__`` (diffusers' own list)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def scheduler_shift(scheduler: Any) -> float:
    """The time shift of a SANA pipeline's flow-matching scheduler (``flow_shift`` of a
    ``DPMSolverMultistepScheduler`` with flow sigmas, ``shift`` of a ``FlowMatchEulerDiscreteScheduler``)."""
    config = scheduler.config
    if getattr(config, "use_dynamic_shifting", False):
        raise ValueError(
            f"{type(scheduler).__name__} uses dynamic shifting, which SANA's configs do not; "
            "the SANA backbone supports a fixed shift only"
        )
    if "use_flow_sigmas" in config:
        if not config.use_flow_sigmas or config.get("prediction_type") != "flow_prediction":
            raise ValueError(
                f"{type(scheduler).__name__} is not a flow-matching schedule (SANA's config has use_flow_sigmas=True, "
                "prediction_type='flow_prediction')"
            )
        return float(config.flow_shift)
    if "shift" in config:
        if config.get("shift_terminal"):
            raise ValueError("shift_terminal has no equivalent in the package's flow_sigmas")
        return float(config.shift)
    raise ValueError(f"cannot read a flow shift from {type(scheduler).__name__}")


class SanaBackbone(DiffusersBackbone):
    """A SANA text-to-image pipeline (SANA 1.0 / 1.5, 600M-4.8B: nothing here depends on the size) as
    a :class:`Backbone`.

    Args:
        pipe: a ``SanaPipeline``.
        resolution: image side in pixels (a multiple of the DC-AE factor, 32 for the released models;
            SANA-1600M's native size is 1024, its 512 px variants 512).
        max_sequence_length: Gemma tokens kept per prompt (the pipeline's default 300).
        complex_human_instruction: the instruction lines prepended to every prompt before Gemma
            encodes it; ``None`` = the pipeline's ``__call__`` default (so that rollouts equal
            ``pipe(prompt)``), ``False`` / ``[]`` = none (what NVlabs/Sana's RL scripts encode).
        **shared: ``prompt_cache_size``, ``negative_prompt``, ``offload_text_encoders`` of
            :class:`~dgpo_lightning.models.diffusers_backbone.DiffusersBackbone` (Gemma-2-2B is ~5 GB in bf16).
    """

    pipeline_class = "SanaPipeline"
    registry_name = "sana"
    example_model = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    denoiser_class = "SanaTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = SANA_TARGET_MODULES
    cfg_mode = "true"
    #: ``SanaPipeline.__call__``'s default guidance scale.
    default_guidance_scale = 4.5
    default_negative_prompt = ""

    def __init__(
        self,
        pipe: Any,
        resolution: int = 1024,
        max_sequence_length: int = 300,
        complex_human_instruction: Sequence[str] | bool | None = None,
        **shared: Any,
    ):
        self.max_sequence_length = int(max_sequence_length)
        if complex_human_instruction is None or complex_human_instruction is True:
            complex_human_instruction = pipeline_complex_human_instruction()
        elif complex_human_instruction is False:
            complex_human_instruction = []
        elif isinstance(complex_human_instruction, str):
            complex_human_instruction = [complex_human_instruction]
        self.complex_human_instruction = list(complex_human_instruction)
        config = pipe.transformer.config
        if getattr(config, "guidance_embeds", False):
            raise ValueError(
                "this SanaTransformer2DModel embeds guidance (SANA-Sprint); SanaBackbone covers SanaPipeline models"
            )
        super().__init__(pipe, resolution=resolution, **shared)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.patch_size = int(config.patch_size)
        self.timestep_scale = float(getattr(config, "timestep_scale", 1.0) or 1.0)
        #: the pipeline scheduler's fixed flow shift (SANA's published config: 3.0).
        self.shift = scheduler_shift(pipe.scheduler)

    def resolution_multiple(self) -> int:
        return int(self._pipe.vae_scale_factor) * int(self._pipe.transformer.config.patch_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "SanaBackbone":
        """See :meth:`DiffusersBackbone.from_pretrained`."""
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ prompts

    def _encode_batch(self, prompts: list[str], device: torch.device) -> Conditioning:
        """``{"prompt_embeds": [B, L, D_gemma], "prompt_attention_mask": [B, L]}`` with
        ``L = max_sequence_length``, through the pipeline's ``encode_prompt``.

        Prompts are encoded with the complex human instruction and the ``[0] + last L-1`` token
        selection; negative prompts (keys starting with the private negative prefix, see
        :meth:`velocity`) as the pipeline encodes its negative prompt: no instruction, no selection.
        """
        rows: dict[str, dict[str, Tensor]] = {}
        positives = [p for p in prompts if not p.startswith(_NEGATIVE_KEY)]
        negatives = [p for p in prompts if p.startswith(_NEGATIVE_KEY)]
        if positives:
            embeds, mask, _, _ = self._pipe.encode_prompt(
                prompt=positives,
                do_classifier_free_guidance=False,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
                complex_human_instruction=self.complex_human_instruction,
            )
            rows.update({p: {"prompt_embeds": embeds[i], "prompt_attention_mask": mask[i]} for i, p in enumerate(positives)})
        if negatives:
            texts = [p[len(_NEGATIVE_KEY):] for p in negatives]
            # The pipeline's negative branch of encode_prompt (its positive output is discarded).
            _, _, embeds, mask = self._pipe.encode_prompt(
                prompt=texts,
                do_classifier_free_guidance=True,
                negative_prompt=texts,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
                complex_human_instruction=None,
            )
            rows.update({p: {"prompt_embeds": embeds[i], "prompt_attention_mask": mask[i]} for i, p in enumerate(negatives)})
        return {key: torch.stack([rows[p][key] for p in prompts]) for key in ("prompt_embeds", "prompt_attention_mask")}

    def encode_negative_prompts(self, batch: int) -> Conditioning:
        """The unconditional conditioning of true CFG for ``batch`` samples (:attr:`negative_prompt`,
        encoded as ``SanaPipeline`` encodes its negative prompt; cached)."""
        return self.encode_prompts([_NEGATIVE_KEY + self.negative_prompt] * batch)

    # ------------------------------------------------------------------ denoiser

    def _compute_dtype(self) -> torch.dtype:
        # The patch embedding is never a LoRA target: its dtype is the base model's.
        proj = getattr(getattr(self.denoiser, "patch_embed", None), "proj", None)
        if proj is not None:
            return proj.weight.dtype
        return super()._compute_dtype()

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self._compute_dtype()
        out = self.denoiser(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=(1000.0 * self.timestep_scale * t).float(),
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: the pipeline keeps the first half
            out = out.chunk(2, dim=1)[0]
        return out.to(x_t.dtype)

    def _unconditional(self, batch: int) -> Conditioning:
        # SANA's pipeline encodes the negative prompt its own way (no instruction prefix, no token
        # selection): :meth:`encode_negative_prompts`.
        return self.encode_negative_prompts(batch)

    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), side, side)

    # ------------------------------------------------------------------ VAE

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, 32, h, w]`` → images ``[B, 3, 32 h, 32 w]`` in ``[0, 1]`` (float32):
        ``DC-AE.decode(z / scaling_factor)``."""
        z = latents / self.vae.config.scaling_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` → latents ``DC-AE.encode(2 x - 1) · scaling_factor``.

        DC-AE's encoder is deterministic (no posterior to sample), so ``generator`` is ignored."""
        z = self.vae.encode((2 * images - 1).to(self.vae.dtype), return_dict=False)[0]
        return (z * self.vae.config.scaling_factor).float()


#: The registry's loader (``model.backbone: sana``).
load_backbone = SanaBackbone.load


__all__ = ["SANA_TARGET_MODULES", "SanaBackbone", "load_backbone", "pipeline_complex_human_instruction", "scheduler_shift"]
