"""SANA backbone on a tiny random SanaPipeline built offline (no hub, CPU, seconds): prompt encoding,
velocity, CFG, rollouts against the pipeline itself (Euler and SANA's DPM-Solver), DC-AE, LoRA,
memory knobs."""

import pytest
import torch

import backbone_checks as checks
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.sana import SANA_TARGET_MODULES, SanaBackbone, pipeline_complex_human_instruction
from dgpo_lightning.models.testing.sana import SANA_VAE_SCALING_FACTOR, build_tiny_sana

RES = 32
PROMPTS = ["a photo of a cat", "a photo of two blue cars", "a photo of a cat"]
_inputs = checks.inputs


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
    checks.check_inference_mode_prompts_cached_as_normal_tensors(backbone)


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
    checks.check_from_pretrained_loads_the_saved_pipeline(backbone, loaded, PROMPTS, guidance_scale=4.5)
    via = checks.check_factory_loader("sana", tmp_path / "sana", SanaBackbone, resolution=RES, offload_text_encoders=True,
                                      complex_human_instruction=False)
    assert via.complex_human_instruction == []


def _new_pipe():
    return build_tiny_sana(seed=0)


def _from_pipe(pipe):
    return SanaBackbone.from_pipeline(pipe, resolution=RES)


def test_lora_save_into_fresh_pipeline_and_load_adapter(tmp_path):
    denoiser = checks.check_lora_round_trip(_new_pipe, _from_pipe, _transformer, PROMPTS, tmp_path / "adapter")["backbone"].denoiser
    # the backbone's default targets: both attentions' projections in every block
    assert set(denoiser.peft_config["default"].target_modules) == set(SANA_TARGET_MODULES)
    names = {n.rsplit(".lora_", 1)[0] for n, _ in denoiser.named_parameters() if "lora_A" in n}
    assert {n.split(".")[2] for n in names} == {"attn1", "attn2"} and len(names) == 2 * 2 * 4


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    checks.check_gradient_checkpointing(_from_pipe(_new_pipe()), PROMPTS, guidance_scale=4.5)


def test_bfloat16_base_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    checks.check_bfloat16_base_with_fp32_adapter(pipe, backbone, SanaBackbone.from_pretrained, tmp_path / "sana", PROMPTS,
                                                 guidance_scale=4.5)


def test_offloaded_text_encoder_visits_the_device_only_to_encode(shared):
    pipe, plain = shared
    offloaded = SanaBackbone.from_pipeline(pipe, resolution=RES, offload_text_encoders=True)
    checks.check_offloaded_text_encoders(plain, offloaded, PROMPTS, keys=("prompt_embeds", "prompt_attention_mask"))


def test_fsdp_shard_units_are_all_sana_blocks(shared):
    pipe, backbone = shared
    checks.check_shard_units(backbone, list(pipe.transformer.transformer_blocks), 2)


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
    checks.check_bfloat16_on_cuda(backbone, PROMPTS, guidance_scale=4.5)
