"""SD3Backbone on SD3.5-Large's architecture: a tiny random pipeline with Large's traits (no dual
attention, QK RMS-norm, Large's positional-table ratio) against diffusers' own transformer, pipeline
and LoRA loader; and Large's / Medium's published transformer configs on the meta device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import backbone_checks as checks
from dgpo_lightning.models.sd3 import SD3Backbone
from dgpo_lightning.models.sharding import shard_units
from dgpo_lightning.models.testing import build_tiny_sd3
from dgpo_lightning.models.testing.sd3_variants import SD35_LARGE_POS_EMBED_RATIO, build_tiny_sd35_large

RES = 32
PROMPTS = ["a photo of a cat", "a photo of two blue cars", "a photo of a cat"]
_inputs = checks.inputs
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sd3_gpu.py"


@pytest.fixture(scope="module")
def shared():
    pipe = build_tiny_sd35_large(seed=0)
    return pipe, SD3Backbone.from_pipeline(pipe, resolution=RES)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sd3_gpu_for_large", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _transformer(pipe, x, t, cond):
    return pipe.transformer(
        hidden_states=x,
        timestep=1000 * t,
        encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"],
    ).sample


def test_tiny_large_has_large_traits_and_differs_from_tiny_medium(shared):
    pipe, backbone = shared
    config = pipe.transformer.config
    blocks = pipe.transformer.transformer_blocks
    assert not any(getattr(b, "attn2", None) is not None for b in blocks)  # Large: no dual attention
    assert list(config.dual_attention_layers) == []
    assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in blocks)
    assert config.pos_embed_max_size / config.sample_size == SD35_LARGE_POS_EMBED_RATIO == 192 / 128
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    medium = build_tiny_sd3(seed=0).transformer
    assert getattr(medium.transformer_blocks[0], "attn2", None) is not None  # the Medium toy has one
    # Everything but the transformer is the tiny SD3's own.
    assert backbone.vae.config.scaling_factor == 1.5305 and backbone.vae.config.shift_factor == 0.0609
    assert pipe.scheduler.config.shift == 3.0 and backbone.shift == 3.0
    assert backbone.latent_shape() == (16, RES // 2, RES // 2)
    assert shard_units(backbone.denoiser) == list(blocks)


def test_velocity_is_the_transformer_at_1000t(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=256
    )
    torch.testing.assert_close(cond["prompt_embeds"], ref_embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], ref_pooled)
    x, t = _inputs(backbone)
    with torch.no_grad():
        expected = _transformer(pipe, x, t, cond)
        v = backbone.velocity(x, t, cond)
    assert v.shape == x.shape and not torch.allclose(v, torch.zeros_like(v))
    torch.testing.assert_close(v, expected)


def test_two_step_euler_rollout_with_cfg_equals_the_pipeline(shared):
    pipe, backbone = shared
    checks.check_sd3_euler_rollout_matches_pipeline(pipe, backbone, PROMPTS[:2], guidance_scale=4.5)


def test_lora_save_then_fresh_pipeline_load_gives_identical_outputs(tmp_path):
    # diffusers' loader into a fresh pipeline (the backbone's own loaders: test_models_sd3, same code)
    checks.check_lora_round_trip(
        lambda: build_tiny_sd35_large(seed=0), lambda pipe: SD3Backbone.from_pipeline(pipe, resolution=RES),
        _transformer, PROMPTS, tmp_path / "adapter", via_load_adapter=False, via_load_lora=False,
    )


# ----------------------------------------------------------------- published configs on the meta device


def _meta_transformer(config):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**config)


def _released_size(transformer) -> int:
    # The positional table is a buffer in diffusers but a tensor of the released checkpoint
    # (``pos_embed``), counted in the published sizes.
    return sum(p.numel() for p in transformer.parameters()) + transformer.pos_embed.pos_embed.numel()


def test_published_large_config_is_what_diffusers_recognises_and_has_8_1b(bench):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    transformer = _meta_transformer(bench.SD35_LARGE)
    blocks = transformer.transformer_blocks
    assert all(p.device.type == "meta" for p in transformer.parameters())  # no memory
    checkpoint = {  # the original checkpoint's names for the tensors diffusers inspects
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": blocks[0].norm1_context.linear.bias,
        "joint_blocks.37.x_block.mlp.fc1.weight": blocks[37].ff.net[0].proj.weight,
        "pos_embed": transformer.pos_embed.pos_embed,
    }
    assert infer_diffusers_model_type(checkpoint) == "sd35_large"
    assert len(blocks) == 38 and transformer.inner_dim == 2432
    assert not any(getattr(b, "attn2", None) is not None for b in blocks)
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm"
    assert transformer.pos_embed.pos_embed.shape == (1, 192 * 192, 2432)
    # 1024² images: 128x128 latents, 64x64 patches, within the 192² table
    assert 1024 // bench.VAE_SCALE_FACTOR // 2 == 64 <= bench.SD35_LARGE["pos_embed_max_size"]
    size = _released_size(transformer)
    assert 8.0e9 < size < 8.2e9, size  # the "8.1 B" SD3.5-Large release


def test_published_medium_config_has_2_5b(bench):
    transformer = _meta_transformer(bench.SD35_MEDIUM)
    size = _released_size(transformer)
    assert 2.4e9 < size < 2.6e9, size  # the "2.5 B" SD3.5-Medium release
    assert transformer.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
