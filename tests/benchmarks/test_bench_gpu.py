"""benchmarks/bench_sd3_gpu.py: the SD3.5-Medium architecture it builds, its refusal without CUDA, its
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
