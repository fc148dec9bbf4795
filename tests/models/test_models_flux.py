"""FLUX.1 backbone (dev: guidance-distilled, schnell: no guidance) on tiny random FluxPipelines built
offline, checked against the diffusers pipeline and transformer themselves (no hub, CPU, seconds)."""

import math

import numpy as np
import pytest
import torch

from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.flux import FLUX_TARGET_MODULES, FluxBackbone, flux_shift
import backbone_checks as checks
from dgpo_lightning.models.lora import add_lora
from dgpo_lightning.models.testing.flux import build_tiny_flux
from dgpo_lightning.sampling import flow_sigmas, ode_euler

RES = 32
PROMPTS = ["a photo of a cat", "a photo of two blue cars", "a photo of a cat"]
_inputs = checks.inputs


@pytest.fixture(scope="module")
def dev():
    """One untouched tiny FLUX.1-dev for the read-only tests."""
    pipe = build_tiny_flux(seed=0, guidance_embeds=True)
    return pipe, FluxBackbone.from_pipeline(pipe, resolution=RES)


@pytest.fixture(scope="module")
def schnell():
    pipe = build_tiny_flux(seed=0, guidance_embeds=False)
    return pipe, FluxBackbone.from_pipeline(pipe, resolution=RES)


def _transformer(pipe, x, t, cond, guidance):
    """FLUX's transformer called by hand as FluxPipeline calls it, on packed latents."""
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    out = pipe.transformer(
        hidden_states=packed,
        timestep=t,
        guidance=None if guidance is None else torch.full((b,), guidance),
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=cond["prompt_embeds"],
        txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
        img_ids=img_ids,
    ).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_protocol_latent_shape_and_guidance_mode_from_the_transformer(dev, schnell):
    pipe, backbone = dev
    assert isinstance(backbone, Backbone)
    assert backbone.latent_shape() == (16, RES // pipe.vae_scale_factor, RES // pipe.vae_scale_factor)
    assert backbone.cfg_mode == "distilled" and backbone.guidance == 3.5 and backbone.max_sequence_length == 512
    assert backbone.default_guidance_scale == 1.0  # true CFG off, as FluxPipeline's true_cfg_scale
    _, fast = schnell
    assert fast.cfg_mode == "none" and fast.guidance is None and fast.max_sequence_length == 256
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxBackbone.from_pipeline(schnell[0], resolution=RES, guidance=3.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        FluxBackbone.from_pipeline(pipe, resolution=30)
    with pytest.raises(ValueError, match="max_sequence_length"):
        FluxBackbone.from_pipeline(pipe, resolution=RES, max_sequence_length=513)


def test_encode_prompts_matches_pipeline_and_uses_cache(dev, monkeypatch):
    pipe, _ = dev
    backbone = FluxBackbone.from_pipeline(pipe, resolution=RES)
    cond = backbone.encode_prompts(PROMPTS)
    ref_embeds, ref_pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=512)
    torch.testing.assert_close(cond["prompt_embeds"], ref_embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], ref_pooled)
    assert cond["prompt_embeds"].shape == (3, 512, pipe.transformer.config.joint_attention_dim)
    assert cond["pooled_prompt_embeds"].shape == (3, pipe.transformer.config.pooled_projection_dim)
    assert torch.equal(text_ids, torch.zeros(512, 3))  # what _forward builds itself
    assert backbone.cache_misses == 2

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: calls.append(kw["prompt"]) or original(**kw))
    again = backbone.encode_prompts(["a photo of two blue cars", "a red apple"])
    assert calls == [["a red apple"]]
    assert backbone.cache_hits == 1
    torch.testing.assert_close(again["prompt_embeds"][0], ref_embeds[1])

    short = FluxBackbone.from_pipeline(pipe, resolution=RES, max_sequence_length=64)
    assert short.encode_prompts(PROMPTS[:1])["prompt_embeds"].shape[1] == 64


def test_offloaded_text_encoders_visit_the_device_only_to_encode(dev):
    pipe, plain = dev
    backbone = FluxBackbone.from_pipeline(pipe, resolution=RES, offload_text_encoders=True)
    assert len(backbone.text_encoders) == 2  # CLIP-L and T5
    checks.check_offloaded_text_encoders(plain, backbone, PROMPTS, keys=("prompt_embeds", "pooled_prompt_embeds"))


def test_velocity_is_the_packed_transformer_at_t_with_guidance_embedding(dev, schnell):
    pipe, backbone = dev
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        v = backbone.velocity(x, t, cond)
        expected = _transformer(pipe, x, t, cond, guidance=3.5)
        other = _transformer(pipe, x, t, cond, guidance=1.0)
        strong = FluxBackbone.from_pipeline(pipe, resolution=RES, guidance=1.0).velocity(x, t, cond)
        scalar = backbone.velocity(x, 0.5, cond)
        batch = backbone.velocity(x, torch.full((3,), 0.5), cond)
    assert v.shape == x.shape
    torch.testing.assert_close(v, expected)
    assert not torch.allclose(expected, other, atol=1e-4)  # the guidance value matters
    torch.testing.assert_close(strong, other)
    torch.testing.assert_close(scalar, batch)
    # Packing round trip is the pipeline's own.
    torch.testing.assert_close(backbone.unpack(backbone.pack(x), *x.shape[2:]), x)

    pipe_s, fast = schnell
    cond_s = fast.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fast.velocity(x, t, cond_s), _transformer(pipe_s, x, t, cond_s, guidance=None))


def test_velocity_is_eps_minus_x0(dev):
    """Sign and time convention: one Euler step of the pipeline's scheduler from sigma to 0 with our
    velocity lands on x_t - t v, i.e. the scheduler integrates dx/dsigma = v = eps - x0."""
    pipe, backbone = dev
    cond = backbone.encode_prompts(PROMPTS[:2])
    x, _ = _inputs(backbone, batch=2)
    with torch.no_grad():
        v = backbone.velocity(x, torch.full((2,), 0.7), cond)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[0.7], mu=0.0)  # exp(0) = 1: no shift
    assert scheduler.sigmas.tolist() == pytest.approx([0.7, 0.0])
    x0 = scheduler.step(backbone.pack(v), scheduler.timesteps[0], backbone.pack(x)).prev_sample
    torch.testing.assert_close(backbone.unpack(x0, 16, 16), x - 0.7 * v)


def _pipeline_sigmas(pipe, steps, image_seq_len):
    """The sigmas FluxPipeline.__call__ sets: linspace(1, 1/N, N) and mu, through retrieve_timesteps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    c = scheduler.config
    mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("resolution", [RES, 512, 1024])
def test_shift_reproduces_the_pipelines_dynamic_schedule(dev, resolution):
    pipe, _ = dev
    backbone = FluxBackbone.from_pipeline(pipe, resolution=resolution)
    tokens = (resolution // pipe.vae_scale_factor // 2) ** 2
    assert backbone.image_seq_len == tokens
    for steps in (2, 6, 28):
        torch.testing.assert_close(flow_sigmas(steps, shift=backbone.shift), _pipeline_sigmas(pipe, steps, tokens))
    if resolution == 1024:  # 1024 px on real FLUX (vae factor 8) is 4096 tokens: mu = max_shift
        assert flux_shift(pipe.scheduler.config, 4096) == pytest.approx(math.exp(1.15))


def test_schnell_shift_is_the_scheduler_shift_and_unsupported_schedules_raise(schnell):
    pipe, backbone = schnell
    assert backbone.shift == pipe.scheduler.config.shift == 1.0
    torch.testing.assert_close(flow_sigmas(4, shift=backbone.shift), _pipeline_sigmas(pipe, 4, backbone.image_seq_len))
    with pytest.raises(ValueError, match="shift_terminal"):
        flux_shift({**pipe.scheduler.config, "shift_terminal": 0.1}, 64)
    with pytest.raises(ValueError, match="time_shift_type"):
        flux_shift({**pipe.scheduler.config, "use_dynamic_shifting": True, "time_shift_type": "linear"}, 64)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_euler_rollout_matches_flux_pipeline(variant, dev, schnell):
    pipe, backbone = dev if variant == "dev" else schnell
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    steps = 3
    kwargs = {"guidance_scale": 3.5} if variant == "dev" else {}
    with torch.no_grad():
        reference = pipe(
            prompts, height=RES, width=RES, num_inference_steps=steps, latents=backbone.pack(x),
            output_type="latent", max_sequence_length=backbone.max_sequence_length, **kwargs,
        ).images
        cond = backbone.encode_prompts(prompts)
        sigmas = flow_sigmas(steps, shift=backbone.shift)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond), x, sigmas).sample
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas)
    torch.testing.assert_close(ours, backbone.unpack(reference, *x.shape[2:]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, x, atol=1e-2)


def test_true_cfg_rollout_matches_flux_pipeline_true_cfg_scale(dev):
    pipe, backbone = dev
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = pipe(
            prompts, negative_prompt="", true_cfg_scale=2.5, guidance_scale=3.5, height=RES, width=RES,
            num_inference_steps=2, latents=backbone.pack(x), output_type="latent",
        ).images
        cond = backbone.encode_prompts(prompts)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=2.5), x, flow_sigmas(2, shift=backbone.shift)).sample
        plain = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond), x, flow_sigmas(2, shift=backbone.shift)).sample
        uncond = backbone.encode_prompts(["", ""])
        xt, t = _inputs(backbone, batch=2)
        v_c, v_u = backbone.velocity(xt, t, cond), backbone.velocity(xt, t, uncond)
        v_cfg = backbone.velocity(xt, t, cond, guidance_scale=2.5)
    torch.testing.assert_close(ours, backbone.unpack(reference, *x.shape[2:]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)
    torch.testing.assert_close(v_cfg, v_u + 2.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_decode_encode_use_flux_vae_scaling_and_shift(dev):
    pipe, backbone = dev
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    checks.check_autoencoder_kl_decode_encode(pipe, backbone)


def test_from_pretrained_round_trip_factory_and_missing_path(dev, tmp_path):
    pipe, backbone = dev
    pipe.save_pretrained(tmp_path / "flux")
    loaded = FluxBackbone.from_pretrained(tmp_path / "flux", torch_dtype="float32", resolution=RES, guidance=2.0)
    assert loaded.guidance == 2.0 and loaded.shift == pytest.approx(backbone.shift)
    checks.check_from_pretrained_loads_the_saved_pipeline(
        backbone, loaded, PROMPTS, expected=lambda x, t, cond: _transformer(pipe, x, t, cond, guidance=2.0)
    )
    via = checks.check_factory_loader("flux", tmp_path / "flux", FluxBackbone, resolution=RES, offload_text_encoders=True,
                                      max_sequence_length=128)
    assert via.max_sequence_length == 128
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FluxBackbone.from_pretrained(tmp_path / "nowhere" / "FLUX.1-dev")


def test_bfloat16_base_with_fp32_adapter(dev, tmp_path):
    pipe, backbone = dev
    checks.check_bfloat16_base_with_fp32_adapter(pipe, backbone, FluxBackbone.from_pretrained, tmp_path / "flux", PROMPTS)


def test_default_lora_targets_cover_both_block_kinds():
    backbone = FluxBackbone.from_pipeline(build_tiny_flux(seed=0), resolution=RES)
    config = add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
    assert set(config.target_modules) == set(FLUX_TARGET_MODULES)  # every name exists in FLUX
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in backbone.denoiser.named_parameters() if "lora_A" in n}
    assert "transformer_blocks.0.ff_context.net.2" in adapted and "transformer_blocks.1.attn.to_add_out" in adapted
    assert "single_transformer_blocks.0.attn.to_q" in adapted  # attn.to_q also names the single blocks'
    assert not any(".proj_mlp" in n or n.startswith(("x_embedder", "context_embedder", "proj_out")) for n in adapted)


def _new_dev():
    return build_tiny_flux(seed=0)


def _from_pipe(pipe):
    return FluxBackbone.from_pipeline(pipe, resolution=RES)


def test_lora_save_load_into_fresh_pipeline_gives_identical_outputs(tmp_path):
    checks.check_lora_round_trip(
        _new_dev, _from_pipe, lambda pipe, x, t, cond: _transformer(pipe, x, t, cond, guidance=3.5), PROMPTS,
        tmp_path / "adapter", images={},
    )


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    checks.check_gradient_checkpointing(_from_pipe(_new_dev()), PROMPTS)


def test_fsdp_shard_units_are_all_flux_blocks(dev):
    pipe, backbone = dev
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    checks.check_shard_units(backbone, blocks, 4)
