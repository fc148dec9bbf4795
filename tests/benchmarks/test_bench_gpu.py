"""benchmarks/bench_sd3_gpu.py: the published architectures it builds (SD3.5-M/L, FLUX.1, Qwen-Image, SANA, Z-Image; on the meta device), each --model at tiny size on the CPU; the SD3.5-Medium architecture, its refusal without CUDA, its
FLOP accounting (on a tiny config on the CPU) and a tiny end-to-end run on CUDA (``gpu`` marker)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sd3_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sd3_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_ARGS = ["--config", "tiny", "--group-size", "4", "--resolution", "64", "--repeats", "1", "--steps", "3"]


def test_refuses_to_run_without_cuda(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as error:
        bench.main([*TINY_ARGS, "--out", str(tmp_path / "r")])
    message = str(error.value)
    assert "needs a CUDA GPU" in message and "torch.cuda.is_available() is False" in message
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
    with pytest.raises(SystemExit, match="not one"):
        bench.main([*TINY_ARGS, "--device", "cpu"])


def test_the_transformer_is_what_diffusers_recognises_as_sd35_medium(bench):
    """diffusers' single-file loader tells SD3.5-M from SD3-M and SD3.5-L by tensor shapes; the
    benchmark's config must produce those shapes, and the SD3.5 blocks (dual attention, QK RMS-norm)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**bench.SD35_MEDIUM)
    blocks = transformer.transformer_blocks
    # the original checkpoint's names for the two tensors diffusers inspects
    checkpoint = {
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": blocks[0].norm1_context.linear.bias,
        "pos_embed": transformer.pos_embed.pos_embed,
    }
    assert infer_diffusers_model_type(checkpoint) == "sd35_medium"
    assert len(blocks) == 24 and transformer.inner_dim == 1536
    assert [i for i, b in enumerate(blocks) if getattr(b, "attn2", None) is not None] == list(range(13))
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm"
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
    # 512² images: 64×64 latents, 32×32 = 1024 image tokens, within the 384² positional table
    assert 512 // bench.VAE_SCALE_FACTOR // bench.SD35_MEDIUM["patch_size"] == 32 <= bench.SD35_MEDIUM["pos_embed_max_size"]
    params = sum(p.numel() for p in transformer.parameters())
    assert 2.0e9 < params < 2.5e9  # the MMDiT-X of the "2.5 B" SD3.5-Medium release


def test_random_prompt_embeddings_have_sd3_shapes_and_are_seeded_by_text(bench):
    backbone = bench.build_backbone("tiny", 64, "cpu")
    cond = backbone.encode_prompts(["a cat", "a dog", "a cat"])
    assert cond["prompt_embeds"].shape == (3, 12, bench.TINY["joint_attention_dim"])
    assert cond["pooled_prompt_embeds"].shape == (3, bench.TINY["pooled_projection_dim"])
    assert cond["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert backbone.latent_shape() == (16, 8, 8)
    # the real pipeline's SD3 sizes: 77 CLIP + 256 T5 tokens
    assert bench.CONFIGS["sd35_medium"][1] == 333


def test_model_flops_exclude_exactly_the_checkpointing_recompute(bench):
    """On a tiny config on the CPU: the model FLOPs reported with gradient checkpointing equal the
    FLOPs counted for the same step without checkpointing (an independent count)."""
    runs = {}
    for flag in ([], ["--no-gradient-checkpointing"]):
        args = bench.parse_args([*TINY_ARGS, "--micro-batch-size", "2", "--timesteps-per-sample", "2", *flag])
        runs[bool(flag)] = bench.run(args, "cpu")
    with_gc, without_gc = runs[False], runs[True]
    for r in runs.values():
        assert r["train_step"]["loss_finite"] and r["train_step"]["seconds"] > 0
        assert r["rollout"]["ode_dpm_seconds_per_group"] > 0 and r["rollout"]["sde_seconds_per_group"] > 0
        assert 0 < r["train_step"]["mfu"] <= r["train_step"]["hfu"]
        assert r["trainable_params"] > 0 and r["micro_batch_size"] == 2
    assert with_gc["train_step"]["recomputed_tflops"] > 0 and without_gc["train_step"]["recomputed_tflops"] == 0
    assert with_gc["train_step"]["executed_tflops"] > without_gc["train_step"]["executed_tflops"]
    assert math.isclose(with_gc["train_step"]["model_tflops"], without_gc["train_step"]["executed_tflops"], rel_tol=1e-9)
    # A 3-step ODE rollout with CFG makes 3 transformer calls on 2G rows. The micro-batched step makes
    # 3 forward passes over K*G rows (reference, no-grad online for the group weights, online with
    # grad) and one backward without weight gradients for the frozen base (input gradients only, none
    # for the embeddings of inputs that need no gradient): between 3 and 5 forwards.
    forward_per_row = with_gc["rollout"]["ode_rollout_tflops"] / (3 * 2 * 4)
    step_rows = 2 * 4
    ratio = without_gc["train_step"]["executed_tflops"] / (forward_per_row * step_rows)
    assert 3.0 < ratio < 5.0, ratio


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_config_runs_on_cuda(bench, tmp_path):
    result = bench.main([*TINY_ARGS, "--micro-batch-size", "2", "--out", str(tmp_path / "bench")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["train_step"]["seconds"] == pytest.approx(result["train_step"]["seconds"])
    assert (tmp_path / "bench.md").read_text().startswith("# SD3.5-Medium")
    assert result["train_step"]["loss_finite"]
    for key in ("rollout_ode_peak_gib", "rollout_sde_peak_gib", "train_step_peak_gib"):
        assert result["memory"][key] > 0
    assert 0 < result["train_step"]["mfu"] <= result["train_step"]["hfu"] < 1
    assert result["train_step"]["recomputed_tflops"] > 0


# ----------------------------------------------------------------------------- every --model

#: Published transformer sizes (billions; SD3's count the positional table, a tensor of their checkpoints).
PUBLISHED_BILLIONS = {
    "sd35_medium": (2.4, 2.6),  # "2.5 B"
    "sd35_large": (8.0, 8.2),  # "8.1 B"
    "flux_dev": (11.8, 12.0),  # "12 B"
    "flux_schnell": (11.8, 12.0),
    "qwen_image": (20.0, 20.6),  # "20 B"
    "sana": (1.55, 1.65),  # SANA-1600M
    "z_image": (6.0, 6.3),  # "6 B"
}
#: The transformer config key each random prompt embedding feeds.
TEXT_INPUT_KEYS = {
    "prompt_embeds": ("joint_attention_dim", "caption_channels", "cap_feat_dim"),
    "pooled_prompt_embeds": ("pooled_projection_dim",),
}


def test_every_model_is_covered(bench):
    assert set(bench.MODELS) == set(PUBLISHED_BILLIONS)


@pytest.mark.parametrize("model", sorted(PUBLISHED_BILLIONS))
def test_published_architecture_on_the_meta_device(bench, model):
    """Each --model's published config builds (no memory), has the released size, and its random
    prompt embeddings have the widths its transformer reads."""
    import diffusers

    spec = bench.MODELS[model]
    with torch.device("meta"):
        transformer = getattr(diffusers, spec.transformer_class)(**spec.transformer_config)
    size = sum(p.numel() for p in transformer.parameters())
    if spec.sd3_config is not None:
        size += transformer.pos_embed.pos_embed.numel()
        widths = {"prompt_embeds": 4096, "pooled_prompt_embeds": 2048}
    else:
        widths = spec.text_widths
    low, high = PUBLISHED_BILLIONS[model]
    assert low * 1e9 < size < high * 1e9, size
    config = transformer.config
    for key, width in widths.items():
        (name,) = [n for n in TEXT_INPUT_KEYS[key] if n in config]
        assert config[name] == width, (key, name)
    if spec.packed_latents:
        assert config.in_channels == 4 * 16  # 2x2 patches of the 16-channel VAE


@pytest.mark.parametrize("model", sorted(PUBLISHED_BILLIONS))
def test_each_model_runs_at_tiny_size_on_the_cpu(bench, model):
    """--model M --tiny: the family's toy through its backbone class, the DGPO step and the FLOP
    accounting; the LoRA sits on the backbone's own targets."""
    args = bench.parse_args(
        ["--model", model, "--tiny", "--group-size", "2", "--resolution", "32", "--repeats", "1", "--steps", "2",
         "--lora-rank", "2", "--out", ""]
    )
    r = bench.run(args, "cpu")
    assert r["model"] == model and r["train_step"]["loss_finite"]
    assert r["train_step"]["recomputed_tflops"] > 0 and 0 < r["train_step"]["mfu"] <= r["train_step"]["hfu"]
    assert r["trainable_params"] > 0 and r["guidance_scale"] == bench.MODELS[model].guidance_scale
    assert r["rollout"]["ode_dpm_seconds_per_group"] > 0 and r["text_tokens"] > 0


def test_random_embeddings_replace_the_tiny_encoders_widths(bench):
    """The replacement path of the non-SD3 models, on FLUX.1-schnell's toy with its transformer kept:
    the encoded keys get the requested widths, seeded by the prompt, the token counts kept."""
    backbone = bench.build_model_backbone("flux_schnell", 32, "cpu", tiny=True)
    before = backbone.encode_prompts(["a cat"])
    backbone.clear_prompt_cache()
    bench.random_text_embeddings(backbone, {"prompt_embeds": 24, "pooled_prompt_embeds": 8})
    after = backbone.encode_prompts(["a cat", "a dog", "a cat"])
    assert after["prompt_embeds"].shape == (3, before["prompt_embeds"].shape[1], 24)
    assert after["pooled_prompt_embeds"].shape == (3, 8)
    assert torch.equal(after["prompt_embeds"][0], after["prompt_embeds"][2])
    assert not torch.equal(after["prompt_embeds"][0], after["prompt_embeds"][1])


def test_config_option_is_sd3_only(bench):
    assert bench.parse_args(["--config", "sd35_large"]).model == "sd35_large"
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "flux_dev", "--config", "tiny"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", sorted(PUBLISHED_BILLIONS))
def test_each_model_tiny_on_cuda(bench, model, tmp_path):
    result = bench.main(["--model", model, "--tiny", "--group-size", "2", "--resolution", "32", "--repeats", "1",
                         "--steps", "2", "--lora-rank", "2", "--out", str(tmp_path / model)])
    assert result["train_step"]["loss_finite"] and result["memory"]["train_step_peak_gib"] > 0
    assert (tmp_path / f"{model}.md").read_text().startswith(f"# {bench.MODELS[model].title}")


#: Latents at 512 px of the real VAEs: 8x (16 channels) except SANA's DC-AE, 32x (32 channels).
LATENTS_512 = {
    "flux_dev": (16, 64, 64), "flux_schnell": (16, 64, 64), "qwen_image": (16, 64, 64), "sana": (32, 16, 16),
    "z_image": (16, 64, 64),
}


@pytest.mark.parametrize("model", sorted(LATENTS_512))
def test_published_backbones_build_on_the_meta_device(bench, model):
    """The full-size build path (transformer swapped in, real VAE factor, packed channels, random
    embeddings) on the meta device; FLUX.1-schnell and SANA also run a CFG forward there (shapes
    only; Qwen-Image's and Z-Image's forwards read mask lengths, which meta tensors do not have)."""
    backbone = bench.build_model_backbone(model, 512, "meta")
    spec = bench.MODELS[model]
    assert type(backbone.denoiser).__name__ == spec.transformer_class and backbone.device.type == "meta"
    assert backbone.denoiser.dtype == torch.bfloat16
    assert backbone.latent_shape() == LATENTS_512[model]
    if model in ("flux_schnell", "sana"):
        cond = backbone.encode_prompts(["a cat", "a dog"])
        for key, width in spec.text_widths.items():
            assert cond[key].shape[-1] == width
        x = torch.randn(2, *backbone.latent_shape(), device="meta")
        v = backbone.velocity(x, torch.rand(2, device="meta"), cond, guidance_scale=2.0)
        assert v.shape == x.shape
