"""Text-to-image backbones at their published size on one GPU (default SD3.5-Medium; ``--model`` picks
sd35_medium, sd35_large, flux_dev, flux_schnell, qwen_image, sana, z_image): rollout seconds per
group (10-step ODE vs 10-step SDE), DGPO LoRA training step time, peak memory and model FLOP
utilisation (MFU) of the training step.

Other models (``MODELS``, each with its published ``transformer/config.json`` values and source): the
package's backbone class for the family (``FluxBackbone``, ``QwenImageBackbone``, ``SanaBackbone``,
``ZImageBackbone``) around the family's tiny offline pipeline (``dgpo_lightning.models.testing``:
tokenizers, tiny text encoders, tiny VAE, the model's scheduler) whose transformer is replaced by one of
the published architecture with random bf16 weights, and whose prompt embeddings are replaced by
seeded random ones of the real widths (the pipeline's own token counts and masks kept; the real VAE's
downsampling factor set); the LoRA targets are the backbone's (the peers' defaults). Adding a model
is one ``MODELS`` entry. The SD3.5 details follow.

The transformer is diffusers' ``SD3Transformer2DModel`` with the SD3.5-Medium architecture (values
below, from ``stabilityai/stable-diffusion-3.5-medium``'s ``transformer/config.json``; diffusers'
own source agrees where it encodes them: ``dual_attention_layers`` 0..12 "for sd3.5", and its
single-file loader recognises SD3.5-M by a 384² positional embedding and 6·1536 adaLN outputs) with
random weights in bf16. No weights are downloaded: text encoders are replaced by seeded random
prompt embeddings of SD3's shapes (``[B, 77 + 256, 4096]`` and pooled ``[B, 2048]``) and the VAE by a
tiny random 16-channel ``AutoencoderKL`` with SD3's 8× downsampling (never run in the timings).
Everything else is the package's real code path: ``SD3Backbone`` (CFG, time convention),
``data.rollout.sample_latents`` with the ``ode_dpm`` and ``sde`` samplers, ``models.lora.add_lora``
(rank 64, alpha 128, SD3's attention projections, fp32 adapters on a bf16 base) and
``DGPOModule.backward_step`` with the DGPO objective (reference pass without grad through the
adapter-disabled base, online pass with grad, exact micro-batching), diffusers' gradient
checkpointing, AdamW.

* Rollout: one group of G images at 512² (64×64 latents), CFG 4.5 (the batch doubles to 2G), 10
  steps, shift 3; the SDE keeps its trajectory and log-probs as Flow-GRPO needs.
* Training: one DGPO optimizer step on that group (G samples, K timesteps each, micro-batches of
  ``--micro-batch-size``), no CFG in the loss (as the paper trains).
* Peak memory: ``torch.cuda.max_memory_allocated`` per phase (after a reset).
* MFU: FLOPs of one training step counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention), divided by the measured step time and by the device's dense bf16
  peak (``--peak-tflops``, default 989 = H100 SXM). *Model* FLOPs exclude the forward passes that
  gradient checkpointing recomputes (counted separately as a no-grad forward of the checkpointed
  blocks over the same rows); *hardware* FLOPs (HFU) include them.

Needs CUDA; refuses to run without it. Writes ``--out``.md/.json (default
``benchmarks/results/bench_sd3_gpu``).

    HF_HUB_OFFLINE=1 python benchmarks/bench_sd3_gpu.py [--group-size 16] [--micro-batch-size 8] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import re
import shlex
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if TYPE_CHECKING:
    from dgpo_lightning.objectives import GroupBatch

RESULTS = Path(__file__).resolve().parent / "results"

#: SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json).
SD35_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
#: SD3.5-Large's transformer (stabilityai/stable-diffusion-3.5-large, transformer/config.json): plain
#: MMDiT blocks (no ``dual_attention_layers``), QK RMS-norm, 38 blocks of 38 heads x 64 (inner width
#: 2432), a 192² positional table for sample size 128. diffusers' single-file loader recognises it by
#: its 38th joint block (``joint_blocks.37``).
SD35_LARGE: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
    "qk_norm": "rms_norm",
}
#: Text tokens SD3 feeds the transformer: 77 CLIP tokens + 256 T5 tokens (diffusers' default).
SD3_TEXT_TOKENS = 77 + 256

#: A structurally identical toy (dual attention, QK RMS-norm) for smoke tests.
TINY: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 32,
    "out_channels": 16,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
#: A toy with SD3.5-Large's traits: no dual attention, positional table 1.5x the sample size.
TINY_LARGE: dict[str, Any] = {**TINY, "dual_attention_layers": (), "pos_embed_max_size": 12}
CONFIGS = {
    "sd35_medium": (SD35_MEDIUM, SD3_TEXT_TOKENS),
    "sd35_large": (SD35_LARGE, SD3_TEXT_TOKENS),
    "tiny": (TINY, 12),
    "tiny_large": (TINY_LARGE, 12),
}
#: The toy config of each SD3 model (``--tiny``).
SD3_TINY = {"sd35_medium": "tiny", "sd35_large": "tiny_large"}
VAE_SCALE_FACTOR = 8  # SD3's VAE: 4 levels, 3 downsamplings


class ModelSpec(NamedTuple):
    """One ``--model``: a backbone class at its published transformer architecture.

    The SD3.5 models run through :class:`RandomTextPipeline` (``sd3_config`` names their
    :data:`CONFIGS` entry). The others start from the package's tiny offline pipeline of their family
    (``tiny_builder``: real tokenizers, tiny text encoders, tiny VAE, the model's scheduler), whose
    transformer is replaced by ``transformer_class(**transformer_config)`` with random weights and
    whose prompt embeddings are replaced, key by key, by seeded random ones of the real widths
    (``text_widths``); token counts and masks stay the pipeline's own. ``vae_scale_factor`` is the real
    VAE's (the tiny VAE never runs in the timings). ``tiny`` builds the tiny pipeline unchanged (CPU tests).
    """

    title: str
    backbone: str  # "module:Class" under dgpo_lightning.models
    transformer_class: str = "SD3Transformer2DModel"
    transformer_config: dict[str, Any] = {}
    source: str = ""
    sd3_config: str | None = None
    tiny_builder: str | None = None  # "module:function" under dgpo_lightning.models.testing
    tiny_kwargs: dict[str, Any] = {}
    backbone_kwargs: dict[str, Any] = {}
    text_widths: dict[str, int] = {}
    vae_scale_factor: int = 8
    packed_latents: bool = False  # 2x2 patches packed into channels (in_channels = 4 x VAE channels)
    guidance_scale: float = 4.5  # true CFG of the rollouts


#: FLUX.1's MMDiT (black-forest-labs/FLUX.1-dev and FLUX.1-schnell, transformer/config.json): 19 double
#: + 38 single blocks of 24 heads x 128, T5-XXL text (4096 wide), CLIP-L pooled (768), 2x2-packed
#: 16-channel latents (in_channels 64); dev embeds the distilled guidance, schnell does not.
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embeds": False}
#: Qwen-Image's MMDiT (Qwen/Qwen-Image, transformer/config.json): 60 blocks of 24 heads x 128,
#: Qwen2.5-VL-7B text (3584 wide), 2x2-packed 16-channel latents.
QWEN_IMAGE: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
#: SANA-1600M (Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json): 20 linear-
#: attention blocks of width 2240 (70 x 32), cross-attention 20 x 112, Gemma-2-2B text (2304 wide),
#: 32-channel DC-AE latents at 32x downsampling.
SANA_1600M: dict[str, Any] = {
    "in_channels": 32,
    "out_channels": 32,
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
    "cross_attention_dim": 2240,
    "caption_channels": 2304,
    "mlp_ratio": 2.5,
    "sample_size": 32,
    "patch_size": 1,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}
#: Z-Image (Tongyi-MAI/Z-Image-Turbo, transformer/config.json): a single-stream DiT of 30 layers of
#: width 3840 (30 heads), 2 noise and 2 context refiner layers, Qwen3-4B text (2560 wide), 16-channel
#: FLUX-VAE latents.
Z_IMAGE: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1536, 512, 512),
}

MODELS: dict[str, ModelSpec] = {
    "sd35_medium": ModelSpec(
        "SD3.5-Medium", "sd3:SD3Backbone", transformer_config=SD35_MEDIUM,
        source="stabilityai/stable-diffusion-3.5-medium transformer/config.json", sd3_config="sd35_medium",
    ),
    "sd35_large": ModelSpec(
        "SD3.5-Large", "sd3:SD3Backbone", transformer_config=SD35_LARGE,
        source="stabilityai/stable-diffusion-3.5-large transformer/config.json", sd3_config="sd35_large",
    ),
    "flux_dev": ModelSpec(
        "FLUX.1-dev", "flux:FluxBackbone", "FluxTransformer2DModel", FLUX_DEV,
        "black-forest-labs/FLUX.1-dev transformer/config.json",
        tiny_builder="flux:build_tiny_flux", tiny_kwargs={"guidance_embeds": True},
        text_widths={"prompt_embeds": 4096, "pooled_prompt_embeds": 768}, packed_latents=True, guidance_scale=1.0,
    ),
    "flux_schnell": ModelSpec(
        "FLUX.1-schnell", "flux:FluxBackbone", "FluxTransformer2DModel", FLUX_SCHNELL,
        "black-forest-labs/FLUX.1-schnell transformer/config.json",
        tiny_builder="flux:build_tiny_flux", tiny_kwargs={"guidance_embeds": False},
        text_widths={"prompt_embeds": 4096, "pooled_prompt_embeds": 768}, packed_latents=True, guidance_scale=1.0,
    ),
    "qwen_image": ModelSpec(
        "Qwen-Image", "qwen_image:QwenImageBackbone", "QwenImageTransformer2DModel", QWEN_IMAGE,
        "Qwen/Qwen-Image transformer/config.json",
        tiny_builder="qwen_image:build_tiny_qwen_image", text_widths={"prompt_embeds": 3584}, packed_latents=True,
        guidance_scale=4.0,
    ),
    "sana": ModelSpec(
        "SANA-1600M", "sana:SanaBackbone", "SanaTransformer2DModel", SANA_1600M,
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json",
        tiny_builder="sana:build_tiny_sana", text_widths={"prompt_embeds": 2304}, vae_scale_factor=32,
        guidance_scale=4.5,
    ),
    "z_image": ModelSpec(
        "Z-Image-Turbo", "z_image:ZImageBackbone", "ZImageTransformer2DModel", Z_IMAGE,
        "Tongyi-MAI/Z-Image-Turbo transformer/config.json",
        tiny_builder="z_image:build_tiny_z_image", backbone_kwargs={"turbo": True}, text_widths={"prompt_embeds": 2560},
        guidance_scale=1.0,
    ),
}
PROMPT = "a photo of a red apple to the left of a blue cup"


def write_results(result: dict[str, Any], text: str, out: str | Path | None) -> None:
    """Print the Markdown report and, with ``out``, write ``out.md`` and ``out.json``."""
    print(text)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def require_cuda(device: str) -> None:
    """Exit with a clear message unless ``device`` is a usable CUDA device."""
    if not device.startswith("cuda"):
        raise SystemExit(f"bench_sd3_gpu.py measures a CUDA GPU; --device {device!r} is not one")
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_sd3_gpu.py needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run it on a GPU machine with a "
            "CUDA build of torch plus diffusers and peft; the CPU benchmark is benchmarks/bench_training.py."
        )


# ----------------------------------------------------------------------------------- model pieces


class RandomTextPipeline:
    """Stands in for a ``StableDiffusion3Pipeline`` inside :class:`SD3Backbone`: the transformer and a
    VAE, no text encoders; ``encode_prompt`` returns random embeddings of SD3's shapes, seeded by the
    prompt text (the same prompt always gets the same embedding). A plain object, not an nn.Module,
    like the real pipeline."""

    def __init__(self, transformer, vae, text_tokens: int):
        self.transformer, self.vae = transformer, vae
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        self.text_tokens = text_tokens

    def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, device=None, **_: Any):
        config = self.transformer.config
        dtype = self.transformer.dtype
        embeds, pooled = [], []
        for text in prompt:
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
            embeds.append(torch.randn(self.text_tokens, config.joint_attention_dim, generator=generator))
            pooled.append(torch.randn(config.pooled_projection_dim, generator=generator))
        return torch.stack(embeds).to(device, dtype), None, torch.stack(pooled).to(device, dtype), None


def tiny_vae():
    """A random 16-channel ``AutoencoderKL`` with SD3's 8× downsampling, scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_backbone(
    config: str,
    resolution: int,
    device: str,
    dtype: torch.dtype = torch.bfloat16,
    text_tokens: int | None = None,
    overrides: dict[str, Any] | None = None,
):
    """An ``SD3Backbone`` around a random transformer of ``CONFIGS[config]`` in ``dtype`` on ``device``.

    ``text_tokens`` replaces the config's prompt length, ``overrides`` some of its transformer values
    (e.g. ``{"num_layers": 2}`` for a shallow model of the real widths)."""
    from diffusers import SD3Transformer2DModel

    from dgpo_lightning.models.sd3 import SD3Backbone

    transformer_config, default_tokens = CONFIGS[config]
    transformer_config = {**transformer_config, **(overrides or {})}
    if "num_layers" in (overrides or {}):  # dual-attention indices past the new depth do not exist
        depth = transformer_config["num_layers"]
        transformer_config["dual_attention_layers"] = tuple(i for i in transformer_config["dual_attention_layers"] if i < depth)
    text_tokens = default_tokens if text_tokens is None else int(text_tokens)
    latent = resolution // VAE_SCALE_FACTOR
    if resolution % (VAE_SCALE_FACTOR * transformer_config["patch_size"]):
        raise SystemExit(f"--resolution {resolution} must be a multiple of {VAE_SCALE_FACTOR * transformer_config['patch_size']}")
    if latent // transformer_config["patch_size"] > transformer_config["pos_embed_max_size"]:
        raise SystemExit(f"--resolution {resolution} is too large for pos_embed_max_size {transformer_config['pos_embed_max_size']}")
    from diffusers.utils import logging as diffusers_logging

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype``: no transient float32 copy (10 GB for SD3.5-M)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**transformer_config)
    finally:
        torch.set_default_dtype(default_dtype)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(bf16) warns about keep-in-fp32 modules; SD3 has none
    try:
        transformer = transformer.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe = RandomTextPipeline(transformer, tiny_vae().to(device), text_tokens)
    return SD3Backbone(pipe, resolution=resolution)


def _import(path: str, package: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(f"{package}.{module}"), name)


def random_text_embeddings(backbone, widths: dict[str, int]) -> None:
    """Replace the prompt embeddings ``backbone`` encodes, for each key of ``widths``, by seeded random
    ones of that width (the same prompt always gets the same rows; the pipeline's own token counts,
    masks and other keys are kept)."""
    encode = backbone._encode_batch

    def _encode_batch(prompts, device):
        cond = dict(encode(prompts, device))
        dtype = backbone._compute_dtype()
        for key, width in widths.items():
            rows = []
            for i, text in enumerate(prompts):
                generator = torch.Generator().manual_seed(zlib.crc32(f"{key}:{text}".encode("utf-8")))
                rows.append(torch.randn(*cond[key].shape[1:-1], width, generator=generator))
            cond[key] = torch.stack(rows).to(device=cond[key].device, dtype=dtype)
        return cond

    backbone._encode_batch = _encode_batch


def build_model_backbone(model: str, resolution: int, device: str, dtype: torch.dtype = torch.bfloat16, tiny: bool = False):
    """The backbone of ``MODELS[model]`` at its published architecture (random weights, random prompt
    embeddings of the real widths), or with ``tiny`` its family's tiny offline pipeline unchanged."""
    spec = MODELS[model]
    if spec.sd3_config is not None:
        return build_backbone(SD3_TINY[model] if tiny else spec.sd3_config, resolution, device, dtype)
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    pipe = _import(spec.tiny_builder, "dgpo_lightning.models.testing")(**spec.tiny_kwargs)
    if not tiny:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in ``dtype``: no transient float32 copy
        try:
            with torch.device(device):
                transformer = getattr(diffusers, spec.transformer_class)(**spec.transformer_config)
        finally:
            torch.set_default_dtype(default_dtype)
        pipe.transformer = transformer.eval()
        pipe.vae_scale_factor = spec.vae_scale_factor
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(bf16) warns about keep-in-fp32 modules
    try:
        pipe.transformer.to(device=device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device)
    backbone = _import(spec.backbone, "dgpo_lightning.models")(pipe, resolution=resolution, **spec.backbone_kwargs)
    if not tiny:
        if spec.packed_latents and hasattr(backbone, "latent_channels"):
            backbone.latent_channels = int(backbone.denoiser.config.in_channels) // 4  # the real VAE's channels
        random_text_embeddings(backbone, spec.text_widths)
    return backbone


class _Strategy:
    """One process: no ``block_backward_sync``."""


class _Trainer:
    """What ``DGPOModule.backward_step`` reads from ``self.trainer`` outside ``Trainer.fit``."""

    def __init__(self):
        self.strategy = _Strategy()
        self.global_step = 0
        self.current_epoch = 0


def build_module(backbone, args):
    """``DGPOModule`` (LoRA, reference = adapter-disabled base) around ``backbone``, with its optimizer."""
    from dgpo_lightning.models.lora import add_lora
    from dgpo_lightning.models.reference import Reference
    from dgpo_lightning.module import DGPOModule

    module = DGPOModule(
        backbone="sd3",  # recorded only: the backbone below is built already
        model_path=f"random {getattr(args, 'model', None) or args.config} weights (built in code)",
        finetune="lora",
        lora_rank=args.lora_rank,
        beta=30.0,
        t_min=0.0,
        timesteps_per_sample=args.timesteps_per_sample,
        train_guidance_scale=1.0,
        micro_batch_size=args.micro_batch_size,
        lr=1e-4,
    )
    backbone.requires_grad_(False)
    # alpha 2·rank, fp32 adapters, on the backbone's own targets (SD3: its 8 attention projections)
    add_lora(backbone.denoiser, rank=args.lora_rank, target_modules=list(backbone.lora_targets) or None)
    if args.gradient_checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    module.reference = Reference(backbone, lora=True)  # the adapter-disabled base, nothing copied
    module.backbone = backbone  # configure_model() now sees a built model and returns
    module.to(backbone.device)
    module._trainer = _Trainer()
    module.manual_backward = lambda loss: loss.backward()  # what Strategy.backward does in one process
    return module, module.configure_optimizers()


def training_step(module, optimizer, batch: GroupBatch) -> torch.Tensor:
    """``DGPOModule.training_step`` without Lightning's logging: the DGPO step, grad clip, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = module.backward_step(batch)
    torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), module.hparams.grad_clip)
    optimizer.step()
    module._trainer.global_step += 1
    return loss


# --------------------------------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[float | None, Any]:
    """``(peak GiB allocated while fn ran, fn())``; ``None`` off CUDA."""
    if not device.startswith("cuda"):
        return None, fn()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30, out


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int], Any]:
    """``(total FLOPs, FLOPs per module name, fn())`` under ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module, out


def block_flops(per_module: dict[str, int], lists: tuple[str, ...] = ("transformer_blocks",)) -> int:
    """FLOPs inside the repeated blocks, the elements of the denoiser's top-level ModuleLists ``lists``
    (what diffusers' gradient checkpointing recomputes)."""
    pattern = re.compile(r"(.*\.)?(" + "|".join(map(re.escape, lists)) + r")\.\d+")
    return sum(v for name, v in per_module.items() if pattern.fullmatch(name))


def block_lists(denoiser) -> tuple[str, ...]:
    """Names of the denoiser's top-level ``nn.ModuleList``s (its repeated blocks)."""
    return tuple(name for name, child in denoiser.named_children() if isinstance(child, torch.nn.ModuleList))


def run(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The measurements on ``device`` (any device works here; :func:`main` insists on CUDA)."""
    from dgpo_lightning.algo import group_advantages
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.backbone import concat_conditioning
    from dgpo_lightning.objectives import GroupBatch
    from dgpo_lightning.objectives.base import chunked
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings

    torch.manual_seed(args.seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    spec = MODELS[args.model]
    if spec.sd3_config is not None and args.config is not None:
        backbone = build_backbone(args.config, args.resolution, device)
    else:
        backbone = build_model_backbone(args.model, args.resolution, device, tiny=args.tiny)
    guidance_scale = spec.guidance_scale if args.guidance_scale is None else args.guidance_scale
    module, optimizer = build_module(backbone, args)
    denoiser = backbone.denoiser
    params = sum(p.numel() for p in denoiser.parameters())
    trainable = sum(p.numel() for p in module.trainable_parameters())
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    G = args.group_size
    prompts = [PROMPT] * G
    seeds = member_seeds(args.seed, [0], G)
    backbone.encode_prompts([PROMPT, backbone.negative_prompt])  # warm the prompt cache (the real code caches too)

    def rollout(sampler: str):
        module.eval()
        settings = SamplerSettings(sampler, num_steps=args.steps, shift=backbone.shift, guidance_scale=guidance_scale, noise_level=0.7)
        return sample_latents(backbone, prompts, seeds, settings, batch_size=G, return_trajectory=settings.stochastic)

    samplers = {"ode": "ode_dpm", "sde": "sde"}
    memory: dict[str, float | None] = {"allocated_after_training_gib": None}
    for name, sampler in samplers.items():  # warm-up, peak memory
        memory[f"rollout_{name}_peak_gib"], out = peak_memory(lambda: rollout(sampler), device)
    x0 = rollout("ode_dpm").sample
    assert x0.shape == (G, *backbone.latent_shape())
    rollout_seconds: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.repeats):
        for name, sampler in samplers.items():  # interleaved
            rollout_seconds[name].append(timed(lambda: rollout(sampler), device)[0])

    # one batch = one whole group
    generator = torch.Generator().manual_seed(args.seed)
    rewards = torch.rand(G, generator=generator)
    group_index = torch.zeros(G, dtype=torch.long)
    batch = GroupBatch(
        latents=x0.float(),
        prompts=prompts,
        advantages=group_advantages(rewards, group_index),
        rewards=rewards,
        group_index=group_index,
    )

    def step():
        module.train()
        return training_step(module, optimizer, batch)

    memory["train_step_peak_gib"], loss = peak_memory(step, device)
    for _ in range(max(args.warmup - 1, 0)):
        step()
    step_seconds, losses = [], []
    for _ in range(args.repeats):
        seconds, loss = timed(step, device)
        step_seconds.append(seconds)
        losses.append(float(loss))
    if cuda:
        memory["allocated_after_training_gib"] = torch.cuda.memory_allocated(device) / 2**30

    # FLOPs: one counted training step; the checkpointed blocks' recomputation counted separately
    executed, _, _ = count_flops(step)
    k = args.timesteps_per_sample
    recompute = 0
    if args.gradient_checkpointing:
        x_t = torch.randn(k * G, *backbone.latent_shape(), device=device)
        t = torch.rand(k * G, device=device)
        cond = backbone.encode_prompts(prompts)
        cond = concat_conditioning([cond] * k) if k > 1 else cond
        with torch.no_grad():
            online = lambda x, t, c, s: backbone.velocity(x, t, c, guidance_scale=s)  # noqa: E731
            _, per_module, _ = count_flops(lambda: chunked(online, x_t, t, cond, 1.0, args.micro_batch_size))
        recompute = block_flops(per_module, block_lists(denoiser))
    model_flops = executed - recompute
    rollout_flops, _, _ = count_flops(lambda: rollout("ode_dpm"))

    peak = args.peak_tflops * 1e12
    step_median = statistics.median(step_seconds)
    ode, sde = statistics.median(rollout_seconds["ode"]), statistics.median(rollout_seconds["sde"])
    return {
        "model": args.model,
        "title": spec.title,
        "source": spec.source,
        "config": args.config or ("tiny" if args.tiny else spec.sd3_config or args.model),
        "device": torch.cuda.get_device_name(device) if cuda else device,
        "dtype": "bfloat16 base, float32 LoRA",
        "transformer_class": type(denoiser).__name__,
        "transformer_config": {
            k2: list(v) if isinstance(v, tuple) else v for k2, v in dict(denoiser.config).items() if not k2.startswith("_")
        },
        "transformer_params": params,
        "lora_rank": args.lora_rank,
        "trainable_params": trainable,
        "resolution": args.resolution,
        "latent_shape": list(backbone.latent_shape()),
        "text_tokens": int(backbone.encode_prompts([PROMPT])["prompt_embeds"].shape[1]),
        "group_size": G,
        "micro_batch_size": args.micro_batch_size or G,
        "timesteps_per_sample": k,
        "gradient_checkpointing": args.gradient_checkpointing,
        "guidance_scale": guidance_scale,
        "sampler_steps": args.steps,
        "repeats": args.repeats,
        "rollout": {
            "ode_dpm_seconds_per_group": ode,
            "sde_seconds_per_group": sde,
            "sde_over_ode": sde / ode,
            "ode_dpm_images_per_s": G / ode,
            "sde_images_per_s": G / sde,
            "ode_rollout_tflops": rollout_flops / 1e12,
            "ode_rollout_mfu": rollout_flops / ode / peak,
            "all_seconds": rollout_seconds,
        },
        "train_step": {
            "seconds": step_median,
            "samples_per_s": G / step_median,
            "all_seconds": step_seconds,
            "losses": losses,
            "loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "executed_tflops": executed / 1e12,
            "recomputed_tflops": recompute / 1e12,
            "model_tflops": model_flops / 1e12,
            "mfu": model_flops / step_median / peak,
            "hfu": executed / step_median / peak,
            "achieved_model_tflops_per_s": model_flops / step_median / 1e12,
        },
        "memory": memory,
        "weights_gib_before_training": weights_gib,
        "peak_tflops": args.peak_tflops,
    }


def markdown(r: dict[str, Any], command: str) -> str:
    ro, tr, mem = r["rollout"], r["train_step"], r["memory"]

    def gib(value):
        return "n/a" if value is None else f"{value:.1f} GiB"

    return "\n".join([
        f"# {r['title']} architecture on one GPU: rollouts and a DGPO LoRA step",
        "",
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on **{r['device']}** with `{command}`.",
        "",
        f"- transformer: `{r['transformer_class']}` ({r['config']}; {r['source'] or 'toy'}), {r['transformer_params'] / 1e9:.3f} B params, random "
        f"weights, {r['dtype']}; LoRA rank {r['lora_rank']} ({r['trainable_params'] / 1e6:.1f} M trainable)",
        f"- {r['resolution']}² images → latents {'×'.join(map(str, r['latent_shape']))}, {r['text_tokens']} text tokens "
        "(random embeddings)",
        f"- one group G = {r['group_size']}; rollouts: {r['sampler_steps']} steps, "
        + (f"CFG {r['guidance_scale']} (batch {2 * r['group_size']})" if r["guidance_scale"] != 1.0 else "no CFG")
        + f"; training: micro-batch {r['micro_batch_size']}, K = {r['timesteps_per_sample']}, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}; medians of {r['repeats']} after warm-up",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| rollout, 10-step ODE (DPM-Solver++ 2M), s / group | {ro['ode_dpm_seconds_per_group']:.2f} s "
        f"({ro['ode_dpm_images_per_s']:.2f} images/s) |",
        f"| rollout, 10-step SDE (trajectory + log-probs kept), s / group | {ro['sde_seconds_per_group']:.2f} s "
        f"({ro['sde_images_per_s']:.2f} images/s) |",
        f"| SDE / ODE rollout time | {ro['sde_over_ode']:.3f}× |",
        f"| DGPO training step (one group) | {tr['seconds']:.2f} s ({tr['samples_per_s']:.2f} samples/s) |",
        f"| peak memory: rollout ODE / SDE / training step | {gib(mem['rollout_ode_peak_gib'])} / "
        f"{gib(mem['rollout_sde_peak_gib'])} / {gib(mem['train_step_peak_gib'])} |",
        f"| training step FLOPs: model / executed (incl. recompute) | {tr['model_tflops']:.1f} / "
        f"{tr['executed_tflops']:.1f} TFLOP |",
        f"| **MFU of the training step** (peak {r['peak_tflops']:.0f} TFLOP/s bf16 dense) | **{100 * tr['mfu']:.1f} %** "
        f"(HFU {100 * tr['hfu']:.1f} %, {tr['achieved_model_tflops_per_s']:.0f} TFLOP/s) |",
        f"| MFU of the ODE rollout | {100 * ro['ode_rollout_mfu']:.1f} % ({ro['ode_rollout_tflops']:.1f} TFLOP per group) |",
        f"| training loss finite | {tr['loss_finite']} |",
        "",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd35_medium", help="published architecture to build")
    parser.add_argument("--tiny", action="store_true", help="the model family's tiny toy instead (CPU tests)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="SD3 only: a CONFIGS entry (overrides --model)")
    parser.add_argument("--group-size", type=int, default=16, help="G: images per group = batch of one group")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="samples per backward pass (default: G)")
    parser.add_argument("--timesteps-per-sample", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="rollout CFG (default: the model's)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--out", default=None, help="writes OUT.md and OUT.json ('' = don't; default results/bench_sd3_gpu for sd35_medium, "
        "results/bench_gpu_MODEL otherwise)"
    )
    args = parser.parse_args(argv)
    if args.group_size < 2:
        parser.error("--group-size must be >= 2")
    if args.config is not None:
        if MODELS[args.model].sd3_config is None:
            parser.error(f"--config names an SD3 config; --model {args.model} is not SD3")
        if args.config in MODELS:
            args.model = args.config
    if args.out is None:
        args.out = str(RESULTS / ("bench_sd3_gpu" if args.model == "sd35_medium" else f"bench_gpu_{args.model}"))
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        parser.error("--micro-batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    require_cuda(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    result = run(args, args.device)
    command = "python benchmarks/bench_sd3_gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_results(result, markdown(result, command.strip()), args.out)
    return result


if __name__ == "__main__":
    main()
