"""SANA backbone on a tiny random SanaPipeline built offline (no hub, CPU, seconds): prompt encoding,
velocity, CFG, rollouts against the pipeline itself (Euler and SANA's DPM-Solver), DC-AE, LoRA,
memory knobs."""

import pytest
import torch

from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.lora import add_lora, load_adapter, load_lora, save_lora, trainable_parameters
from dgpo_lightning.models.sana import SANA_TARGET_MODULES, SanaBackbone, pipeline_complex_human_instruction
from dgpo_lightning.models.sharding import shard_units
from dgpo_lightning.models.testing.sana import SANA_VAE_SCALING_FACTOR, build_tiny_sana

RES = 32
PROMPTS = ["a photo of a cat", "a photo of two blue cars", "a photo of a cat"]


@pytest.fixture(scope="module")
def shared():
    """One untouched tiny SANA (SANA's DPM-Solver scheduler) for the read-only tests."""
    pipe = build_tiny_sana(seed=0)
    return pipe, SanaBackbone.from_pipeline(pipe, resolution=RES)


@pytest.fixture(scope="module")
def euler():
    """The same tiny SANA with a FlowMatchEulerDiscreteScheduler swapped in."""
    pipe = build_tiny_sana(seed=0, scheduler="euler")
    return pipe, SanaBackbone.from_pipeline(pipe, resolution=RES)


def _inputs(backbone, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *backbone.latent_shape(), generator=g), torch.rand(batch, generator=g)


def _randomise_lora_b(denoiser, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=g))


def _transformer(pipe, x, t, cond):
    return pipe.transformer(
        hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
        encoder_attention_mask=cond["prompt_attention_mask"], timestep=1000 * t,
    ).sample


def test_protocol_latent_shape_shift_and_vae_factor(shared):
    pipe, backbone = shared
    assert isinstance(backbone, Backbone)
    assert pipe.vae_scale_factor == 4  # tiny DC-AE: 3 stages (the released one: 6 stages, factor 32)
    assert backbone.latent_shape() == (32, RES // 4, RES // 4)
    assert backbone.shift == pipe.scheduler.config.flow_shift == 3.0
    assert backbone.default_guidance_scale == 4.5 and backbone.negative_prompt == ""
    assert pipe.vae.config.scaling_factor == SANA_VAE_SCALING_FACTOR
    with pytest.raises(ValueError, match="multiple of 4"):
        SanaBackbone.from_pipeline(pipe, resolution=30)


def test_encode_prompts_match_pipeline_with_instruction_and_cache(shared, monkeypatch):
    pipe, _ = shared
    backbone = SanaBackbone.from_pipeline(pipe, resolution=RES)
    cond = backbone.encode_prompts(PROMPTS)
    chi = pipeline_complex_human_instruction()
    assert chi and chi[-1] == "User Prompt: "
    ref_embeds, ref_mask, _, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, max_sequence_length=300, complex_human_instruction=chi
    )
    torch.testing.assert_close(cond["prompt_embeds"], ref_embeds)
    assert torch.equal(cond["prompt_attention_mask"], ref_mask)
    assert cond["prompt_embeds"].shape == (3, 300, 16) and cond["prompt_attention_mask"].shape == (3, 300)
    # the instruction matters (this is not encode_prompt's own default, which has none)
    plain, _, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert not torch.allclose(plain, ref_embeds)
    without = SanaBackbone.from_pipeline(pipe, resolution=RES, complex_human_instruction=False)
    torch.testing.assert_close(without.encode_prompts(PROMPTS)["prompt_embeds"], plain)
    assert backbone.cache_misses == 2

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **kw: calls.append(kw["prompt"]) or original(*a, **kw))
    again = backbone.encode_prompts(["a photo of two blue cars", "a red apple"])
    assert calls == [["a red apple"]] and backbone.cache_hits == 1
    torch.testing.assert_close(again["prompt_embeds"][0], ref_embeds[1])
    with torch.inference_mode():
        backbone.encode_prompts(["three purple birds"])
    assert not backbone._cache["three purple birds"]["prompt_embeds"].is_inference()


def test_negative_prompt_encoded_as_pipeline_and_cfg_formula(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    _, _, neg, neg_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True, negative_prompt="")
    uncond = backbone.encode_negative_prompts(3)
    torch.testing.assert_close(uncond["prompt_embeds"], neg)
    assert torch.equal(uncond["prompt_attention_mask"], neg_mask) and int(neg_mask[0].sum()) == 1  # <bos> only
    x, t = _inputs(backbone)
    with torch.no_grad():
        v_c = backbone.velocity(x, t, cond)
        v_u = _transformer(pipe, x, t, {"prompt_embeds": neg, "prompt_attention_mask": neg_mask})
        v_cfg = backbone.velocity(x, t, cond, guidance_scale=4.5)
    assert not torch.allclose(v_c, v_u)
    torch.testing.assert_close(v_cfg, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_velocity_is_sana_transformer_at_1000t(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        v = backbone.velocity(x, t, cond)
        torch.testing.assert_close(v, _transformer(pipe, x, t, cond))
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), backbone.velocity(x, torch.full((3,), 0.5), cond))
        # the mask reaches the cross-attention: unmasking the padding changes the output
        loose = dict(cond, prompt_attention_mask=torch.ones_like(cond["prompt_attention_mask"]))
        assert not torch.allclose(backbone.velocity(x, t, loose), v, atol=1e-4)
    assert v.shape == x.shape


def test_euler_rollout_with_cfg_matches_pipeline(euler):
    from dgpo_lightning.sampling import flow_sigmas, ode_euler

    pipe, backbone = euler
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    sigmas = flow_sigmas(3, shift=backbone.shift)
    with torch.no_grad():
        reference = pipe(
            # the scheduler shifts the sigmas it is given: pass the unshifted grid linspace(1, 1/N, N)
            prompts, height=RES, width=RES, sigmas=flow_sigmas(3, shift=1.0)[:-1].tolist(), guidance_scale=4.5,
            latents=x.clone(),
            output_type="latent", use_resolution_binning=False,
        ).images
        torch.testing.assert_close(pipe.scheduler.sigmas, sigmas)  # the pipeline ran on our schedule
        cond = backbone.encode_prompts(prompts)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=4.5), x, sigmas).sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, x, atol=1e-2)


def test_ode_dpm_matches_sanas_dpm_solver_pipeline(shared):
    """SANA's own scheduler: our DPM-Solver++ 2M equals the pipeline's on its grid once the
    pipeline's int64 timesteps (floor(1000 sigma)) are fed to our velocity too."""
    from dgpo_lightning.sampling import ode_dpm

    pipe, backbone = shared
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = pipe(
            prompts, height=RES, width=RES, num_inference_steps=4, guidance_scale=4.5, latents=x.clone(),
            output_type="latent", use_resolution_binning=False,
        ).images
        sigmas = pipe.scheduler.sigmas.clone()
        assert sigmas[0] < 1.0 and sigmas[-1] == 0.0  # diffusers' DPM grid starts at ~0.9997
        cond = backbone.encode_prompts(prompts)
        floored = lambda x_t, t: backbone.velocity(x_t, torch.floor(1000 * t) / 1000, cond, guidance_scale=4.5)  # noqa: E731
        ours = ode_dpm(floored, x, sigmas).sample
        exact = ode_dpm(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=4.5), x, sigmas).sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    # without the floor: the sub-1/1000 time offset only (1% of the latents' scale on this tiny model)
    offset = (exact - reference).abs().max()
    assert 1e-4 < offset < 0.05 * reference.abs().max()


def test_decode_encode_use_dc_ae_scaling(shared):
    pipe, backbone = shared
    vae = pipe.vae
    z = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = backbone.decode(z)
        manual = vae.decode(z / SANA_VAE_SCALING_FACTOR).sample
        torch.testing.assert_close(images, (manual / 2 + 0.5).clamp(0, 1))
        latents = backbone.encode(images)
        torch.testing.assert_close(latents, vae.encode(2 * images - 1).latent * SANA_VAE_SCALING_FACTOR)
        decoded_by_pipe = pipe.image_processor.postprocess(manual, output_type="pt")
    torch.testing.assert_close(images, decoded_by_pipe)
    assert images.shape == (2, 3, RES, RES) and latents.shape == z.shape


def test_from_pretrained_round_trip_and_loader(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "sana")
    loaded = SanaBackbone.from_pretrained(tmp_path / "sana", torch_dtype="float32", resolution=RES, device="cpu")
    x, t = _inputs(backbone)
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        torch.testing.assert_close(loaded.encode_prompts(PROMPTS)["prompt_embeds"], cond["prompt_embeds"])
        torch.testing.assert_close(loaded.velocity(x, t, cond, 4.5), backbone.velocity(x, t, cond, 4.5))
    from dgpo_lightning.models.factory import load_backbone

    via = load_backbone("sana", str(tmp_path / "sana"), resolution=RES, offload_text_encoders=True,
                        complex_human_instruction=False)
    assert isinstance(via, SanaBackbone) and via.offload_text_encoders and via.complex_human_instruction == []
    with pytest.raises(ValueError, match="model.backbone=sana needs model.model_path"):
        load_backbone("sana", None)


def test_lora_save_into_fresh_pipeline_and_load_adapter(tmp_path):
    backbone = SanaBackbone.from_pipeline(build_tiny_sana(seed=0), resolution=RES)
    config = add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)  # alpha 8: scaling 2
    assert set(config.target_modules) == set(SANA_TARGET_MODULES)
    names = {n.rsplit(".lora_", 1)[0] for n, _ in backbone.denoiser.named_parameters() if "lora_A" in n}
    assert {n.split(".")[2] for n in names} == {"attn1", "attn2"} and len(names) == 2 * 2 * 4
    _randomise_lora_b(backbone.denoiser)
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        expected = backbone.velocity(x, t, cond)
    save_lora(backbone, tmp_path / "adapter")

    pipe = build_tiny_sana(seed=0)
    with torch.no_grad():
        untouched = _transformer(pipe, x, t, cond)
        pipe.load_lora_weights(tmp_path / "adapter")
        loaded = _transformer(pipe, x, t, cond)
    assert not torch.allclose(untouched, expected, atol=1e-3)
    torch.testing.assert_close(loaded, expected)

    fresh = SanaBackbone.from_pipeline(build_tiny_sana(seed=0), resolution=RES)
    load_adapter(fresh, tmp_path / "adapter")
    resumed = SanaBackbone.from_pipeline(build_tiny_sana(seed=0), resolution=RES)
    load_lora(resumed, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, cond), expected)
        torch.testing.assert_close(resumed.velocity(x, t, cond), expected)
    assert trainable_parameters(resumed) and all("lora_" in n for n, p in resumed.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    results = []
    for checkpointing in (False, True):
        backbone = SanaBackbone.from_pipeline(build_tiny_sana(seed=0), resolution=RES)
        add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
        _randomise_lora_b(backbone.denoiser)
        if checkpointing:
            backbone.denoiser.enable_gradient_checkpointing()
        backbone.train()
        x, t = _inputs(backbone)
        loss = backbone.velocity(x, t, backbone.encode_prompts(PROMPTS), guidance_scale=4.5).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_bfloat16_base_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "sana")
    half = SanaBackbone.from_pretrained(tmp_path / "sana", torch_dtype="bfloat16", resolution=RES)
    assert half.denoiser.dtype == torch.bfloat16
    add_lora(half.denoiser, rank=4, target_modules=half.lora_targets)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(half))
    x, t = _inputs(backbone)
    v = half.velocity(x, t, half.encode_prompts(PROMPTS), guidance_scale=4.5)
    with torch.no_grad():
        v32 = backbone.velocity(x, t, backbone.encode_prompts(PROMPTS), guidance_scale=4.5)
    assert v.dtype == torch.float32 and (v - v32).abs().max() < 0.1 * v32.abs().max()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable_parameters(half))
    assert half.decode(x[:1]).dtype == torch.float32


def test_offloaded_text_encoder_visits_the_device_only_to_encode(shared):
    pipe, plain = shared
    expected = plain.encode_prompts(PROMPTS)
    backbone = SanaBackbone.from_pipeline(pipe, resolution=RES, offload_text_encoders=True)
    moves, real_to = [], backbone.text_encoders.to
    backbone.text_encoders.to = lambda device: moves.append(str(device)) or real_to(device)
    cond = backbone.encode_prompts(PROMPTS)
    assert moves == [str(backbone.device), "cpu"]
    torch.testing.assert_close(cond["prompt_embeds"], expected["prompt_embeds"])
    backbone.encode_prompts(PROMPTS[:2])  # cached: no move
    assert len(moves) == 2


def test_fsdp_shard_units_are_all_sana_blocks(shared):
    pipe, backbone = shared
    units = shard_units(backbone.denoiser)
    blocks = list(pipe.transformer.transformer_blocks)
    assert len(units) == len(blocks) == 2 and all(a is b for a, b in zip(units, blocks))


def test_unsupported_schedulers_are_refused():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    pipe = build_tiny_sana(seed=0)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="dynamic shifting"):
        SanaBackbone.from_pipeline(pipe, resolution=RES)
    pipe.scheduler = DPMSolverMultistepScheduler()  # epsilon prediction: not a flow model
    with pytest.raises(ValueError, match="not a flow-matching schedule"):
        SanaBackbone.from_pipeline(pipe, resolution=RES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_backbone_on_cuda():
    backbone = SanaBackbone.from_pipeline(build_tiny_sana(seed=0), resolution=RES).to("cuda", torch.bfloat16)
    add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
    _randomise_lora_b(backbone.denoiser)
    cond = backbone.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].device.type == "cuda"
    x = torch.randn(3, *backbone.latent_shape(), device="cuda")
    t = torch.rand(3, device="cuda")
    v = backbone.velocity(x, t, cond, guidance_scale=4.5)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    backbone.velocity(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in trainable_parameters(backbone))
    images = backbone.decode(x)
    assert images.device.type == "cuda" and images.shape == (3, 3, RES, RES)
