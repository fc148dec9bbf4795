"""Wan 2.1 text-to-video backbone on a tiny random WanPipeline built offline (no hub, CPU, seconds).

Numbers are compared against the diffusers pipeline and transformer themselves: the pipeline's
``encode_prompt``, its ``__call__`` (true CFG against a negative prompt, its scheduler's sigmas, its
own initial latents), its VAE decode with ``latents_mean`` / ``latents_std`` and its video
postprocessing, and ``load_lora_weights`` of a fresh pipeline.
"""

import pytest
import torch

import backbone_checks as checks
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.lora import add_lora, reference_mode, trainable_parameters
from dgpo_lightning.models.testing.wan import TINY_WAN, build_tiny_wan
from dgpo_lightning.models.wan import WAN_TARGET_MODULES, WanBackbone
from dgpo_lightning.sampling import flow_sigmas, ode_euler
from dgpo_lightning.sampling.settings import SamplerSettings

RES = TINY_WAN["resolution"]
FRAMES = TINY_WAN["num_frames"]
# Different token counts, one repeated.
PROMPTS = ["a photo of a cat", 'a sign that says "hello world" in bold letters', "a photo of a cat"]
_inputs = checks.inputs


def _backbone(pipe, **kwargs):
    kwargs = {"resolution": RES, "num_frames": FRAMES, **kwargs}
    return WanBackbone.from_pipeline(pipe, **kwargs)


@pytest.fixture(scope="module")
def shared():
    pipe = build_tiny_wan(seed=0, scheduler="euler")
    return pipe, _backbone(pipe)


def _fresh(seed=0):
    return _backbone(build_tiny_wan(seed=seed))


def _transformer(pipe, x, t, cond):
    """Wan's transformer called by hand as WanPipeline calls it (timestep 1000 sigma, no mask)."""
    return pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["prompt_embeds"],
                            return_dict=False)[0]


def test_video_protocol_latent_shape_and_options(shared):
    pipe, backbone = shared
    assert isinstance(backbone, Backbone) and backbone.is_video and backbone.num_frames == FRAMES
    s, f = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    assert backbone.latent_shape() == (pipe.vae.config.z_dim, (FRAMES - 1) // f + 1, RES // s, RES // s) == (4, 3, 16, 16)
    wide = _backbone(pipe, width=48, num_frames=9)
    assert wide.latent_shape() == (4, 5, 16, 24)
    with pytest.raises(ValueError, match="multiple of 4"):
        _backbone(pipe, resolution=30)
    with pytest.raises(ValueError, match="width 30"):
        _backbone(pipe, width=30)
    with pytest.raises(ValueError, match="num_frames 4"):
        _backbone(pipe, num_frames=4)
    # The published scheduler (UniPC, flow sigmas, flow_shift 3) and FlowMatchEuler(shift=3): shift 3.
    assert backbone.shift == 3.0 and _fresh().shift == 3.0
    assert SamplerSettings().resolve(backbone).shift == 3.0
    # The published UniPC scheduler's flow sigmas are (nearly) the samplers' shifted schedule.
    unipc = build_tiny_wan(seed=0).scheduler
    unipc.set_timesteps(10)
    torch.testing.assert_close(unipc.sigmas.float(), flow_sigmas(10, shift=3.0).float(), rtol=0, atol=2e-3)


def test_two_expert_and_expand_timesteps_pipelines_are_refused():
    pipe = build_tiny_wan(seed=0)
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match="expand_timesteps"):
        _backbone(pipe)
    pipe = build_tiny_wan(seed=0)
    pipe.transformer_2 = pipe.transformer
    with pytest.raises(ValueError, match="transformer_2"):
        _backbone(pipe)


def test_encode_prompts_matches_pipeline_cache_keeps_valid_tokens(shared, monkeypatch):
    pipe, _ = shared
    backbone = _backbone(pipe)
    cond = backbone.encode_prompts(PROMPTS)
    ref, _ = pipe.encode_prompt(prompt=PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    assert cond["prompt_embeds"].shape == (3, 512, TINY_WAN["text_width"])
    torch.testing.assert_close(cond["prompt_embeds"], ref)
    assert backbone.cache_misses == 2
    lengths = pipe.tokenizer(PROMPTS[:2]).attention_mask
    cached = [backbone._cache[p]["prompt_embeds"].shape[0] for p in PROMPTS[:2]]
    assert cached == [len(m) for m in lengths] and cached[0] != cached[1]  # no padding kept
    assert (ref[0, cached[0]:] == 0).all() and (ref[0, : cached[0]].abs().sum(-1) > 0).all()

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: calls.append(kw["prompt"]) or original(**kw))
    mixed = ["a red apple", PROMPTS[1], PROMPTS[0]]
    again = backbone.encode_prompts(mixed)
    assert calls == [["a red apple"]]  # only the new prompt reaches the text encoder
    monkeypatch.setattr(pipe, "encode_prompt", original)
    expected, _ = pipe.encode_prompt(prompt=mixed, do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(again["prompt_embeds"], expected)

    short = _backbone(pipe, max_sequence_length=8)
    short_ref, _ = pipe.encode_prompt(prompt=PROMPTS[:2], do_classifier_free_guidance=False, max_sequence_length=8)
    torch.testing.assert_close(short.encode_prompts(PROMPTS[:2])["prompt_embeds"], short_ref)
    checks.check_inference_mode_prompts_cached_as_normal_tensors(backbone)


def test_velocity_is_the_transformer_at_1000_sigma(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    assert x.ndim == 5
    with torch.no_grad():
        v = backbone.velocity(x, t, cond)
        torch.testing.assert_close(v, _transformer(pipe, x, t, cond))
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), backbone.velocity(x, torch.full((3,), 0.5), cond))
    assert v.shape == x.shape


@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_euler_rollout_with_cfg_matches_the_diffusers_pipeline(negative_prompt):
    """WanPipeline's own loop (FlowMatchEuler with Wan's shift 3, CFG 5, a negative prompt) from the same
    latents equals ode_euler on the backbone's guided velocity over the pipeline's sigmas."""
    pipe = build_tiny_wan(seed=0, scheduler="euler")
    backbone = _backbone(pipe, negative_prompt=negative_prompt)
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = pipe(prompts, negative_prompt=negative_prompt, height=RES, width=RES, num_frames=FRAMES,
                         num_inference_steps=3, guidance_scale=5.0, latents=x.clone(), output_type="latent").frames
        sigmas = pipe.scheduler.sigmas.float()
        cond = backbone.encode_prompts(prompts)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=5.0), x, sigmas).sample
        unguided = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond), x, sigmas).sample
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    assert not torch.allclose(reference, x, atol=1e-2) and not torch.allclose(unguided, reference, atol=1e-3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_flow_sigmas_with_the_backbone_shift_is_the_scheduler_shift(shared):
    _, backbone = shared
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    base = torch.linspace(1, 0, 11)[:-1]
    scheduler.set_timesteps(sigmas=base.tolist())  # unshifted sigmas
    shifted = FlowMatchEulerDiscreteScheduler(shift=backbone.shift)
    shifted.set_timesteps(sigmas=base.tolist())
    torch.testing.assert_close(shifted.sigmas[:-1].float(), flow_sigmas(10, shift=backbone.shift)[:-1].float())


def test_decode_encode_use_latents_mean_std_and_the_video_layout(shared):
    pipe, backbone = shared
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(std, torch.ones_like(std))
    z = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        videos = backbone.decode(z)
        # The pipeline's own decode path: latents / (1 / std) + mean, vae.decode, postprocess_video("pt").
        manual = pipe.video_processor.postprocess_video(vae.decode(z / (1.0 / std) + mean).sample, output_type="pt")
        latents = backbone.encode(videos)
        posterior = vae.encode((2 * videos - 1).permute(0, 2, 1, 3, 4)).latent_dist.mode()
        sampled = backbone.encode(videos, generator=torch.Generator().manual_seed(0))
    assert videos.shape == (2, FRAMES, 3, RES, RES) and videos.dtype == torch.float32
    assert videos.min() >= 0 and videos.max() <= 1
    torch.testing.assert_close(videos, manual, rtol=1e-5, atol=1e-5)
    assert latents.shape == z.shape
    torch.testing.assert_close(latents, (posterior - mean) / std, rtol=1e-5, atol=1e-5)
    assert sampled.shape == z.shape and not torch.allclose(sampled, latents)
    with pytest.raises(ValueError, match="B, C, F, h, w"):
        backbone.decode(z[:, :, 0])


def test_decode_of_the_pipeline_latents_is_the_pipelines_pt_video(shared):
    pipe, backbone = shared
    x = torch.randn(1, *backbone.latent_shape(), generator=torch.Generator().manual_seed(3))
    kwargs = dict(height=RES, width=RES, num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0)
    with torch.no_grad():
        video = pipe(PROMPTS[:1], latents=x.clone(), output_type="pt", **kwargs).frames
        latents = pipe(PROMPTS[:1], latents=x.clone(), output_type="latent", **kwargs).frames
        torch.testing.assert_close(backbone.decode(latents), video, rtol=1e-5, atol=1e-5)


def test_from_pretrained_round_trip_loader_and_missing_path(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "wan")
    loaded = WanBackbone.from_pretrained(tmp_path / "wan", torch_dtype="float32", resolution=RES, num_frames=FRAMES,
                                         device="cpu")
    checks.check_from_pretrained_loads_the_saved_pipeline(backbone, loaded, PROMPTS, guidance_scale=5.0)
    via = checks.check_factory_loader("wan", tmp_path / "wan", WanBackbone, resolution=RES, width=48, num_frames=9,
                                      max_sequence_length=64, offload_text_encoders=True)
    assert via.max_sequence_length == 64 and via.latent_shape() == (4, 5, 16, 24)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WanBackbone.from_pretrained(tmp_path / "nowhere" / "Wan2.1")


def test_offloaded_text_encoder_visits_the_device_only_to_encode(shared):
    pipe, plain = shared
    checks.check_offloaded_text_encoders(plain, _backbone(pipe, offload_text_encoders=True), PROMPTS)


def test_bfloat16_base_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    checks.check_bfloat16_base_with_fp32_adapter(
        pipe, backbone, lambda path, **kw: WanBackbone.from_pretrained(path, num_frames=FRAMES, **kw),
        tmp_path / "wan", PROMPTS, guidance_scale=5.0,
    )


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    checks.check_gradient_checkpointing(_fresh(), PROMPTS, guidance_scale=5.0, lora_scale=0.3)


def test_fsdp_shard_units_are_all_transformer_blocks(shared):
    pipe, backbone = shared
    checks.check_shard_units(backbone, list(pipe.transformer.blocks), 2)


def test_lora_targets_are_both_attentions_projections_and_get_gradients():
    backbone = _fresh()
    assert backbone.lora_targets == WAN_TARGET_MODULES
    add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
    adapted = {n.split(".lora_")[0] for n, _ in backbone.denoiser.named_parameters() if ".lora_A" in n}
    expected = {f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("attn1", "attn2") for p in WAN_TARGET_MODULES}
    assert adapted == expected  # self- and cross-attention projections of every block, nothing else
    checks.randomise_lora_b(backbone.denoiser, scale=0.3)
    backbone.train()
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    backbone.velocity(x, t, cond, guidance_scale=5.0).square().mean().backward()
    backbone.eval()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_parameters(backbone))
    with torch.no_grad(), reference_mode(backbone.denoiser):
        base = backbone.velocity(x, t, cond)
        untouched = _transformer(build_tiny_wan(seed=0), x, t, cond)
    torch.testing.assert_close(base, untouched)  # the adapter off is the base model


def test_lora_save_into_fresh_pipeline_and_load_adapter_round_trip(tmp_path):
    run = checks.check_lora_round_trip(
        lambda: build_tiny_wan(seed=0), _backbone, _transformer, PROMPTS, tmp_path / "adapter", lora_scale=0.3,
        tolerance={"rtol": 1e-4, "atol": 1e-5},
    )
    # The adapted pipeline also generates a video.
    pipe = build_tiny_wan(seed=0)
    pipe.load_lora_weights(tmp_path / "adapter")
    with torch.no_grad():
        video = pipe(PROMPTS[:1], height=RES, width=RES, num_frames=FRAMES, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, FRAMES, 3, RES, RES) and torch.isfinite(video).all()
    assert run["backbone"].is_video


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_backbone_on_cuda():
    backbone = _fresh().to("cuda", torch.bfloat16)
    checks.add_test_lora(backbone, scale=0.3)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(3, *backbone.latent_shape(), device="cuda")
    t = torch.rand(3, device="cuda")
    v = backbone.velocity(x, t, cond, guidance_scale=5.0)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    backbone.velocity(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in trainable_parameters(backbone))
    videos = backbone.decode(x)
    assert videos.device.type == "cuda" and videos.shape == (3, FRAMES, 3, RES, RES)


# --------------------------------------------------------------------------- 5-D latents through the package


@pytest.mark.parametrize("sampler", ["ode_euler", "ode_dpm", "sde"])
def test_samplers_on_video_latents_equal_the_same_elements_laid_out_as_images(shared, sampler):
    """The samplers, their seeded noise and the SDE log-probs work per sample over all latent
    elements: a 5-D video latent gives exactly what the same elements laid out 4-D give."""
    from dgpo_lightning.sampling import get_sampler, initial_noise
    from dgpo_lightning.sampling.seeds import sde_noise_seeds

    _, backbone = shared
    cond = backbone.encode_prompts(PROMPTS[:2])
    shape = backbone.latent_shape()
    flat = (shape[0] * shape[1], *shape[2:])
    seeds = [11, 12]

    def video_fn(x, t):
        return backbone.velocity(x, t, cond, guidance_scale=5.0)

    def image_fn(x, t):
        return video_fn(x.view(-1, *shape), t).view(-1, *flat)

    sigmas = flow_sigmas(3, shift=backbone.shift)
    kwargs = {"noise_level": 0.7, "noise_seeds": sde_noise_seeds(seeds)} if sampler == "sde" else {}
    with torch.no_grad():
        video = get_sampler(sampler)(video_fn, initial_noise(shape, seeds), sigmas, return_trajectory=True, **kwargs)
        image = get_sampler(sampler)(image_fn, initial_noise(flat, seeds), sigmas, return_trajectory=True, **kwargs)
    assert video.sample.shape == (2, *shape) and video.trajectory.shape == (4, 2, *shape)
    torch.testing.assert_close(video.sample.view(2, *flat), image.sample, rtol=1e-5, atol=1e-6)
    if sampler == "sde":
        torch.testing.assert_close(video.log_probs, image.log_probs, rtol=1e-5, atol=1e-4)
        from dgpo_lightning.sampling import sde_step_log_prob

        with torch.no_grad():
            v = video_fn(video.trajectory[0], torch.full((2,), float(sigmas[0])))
        recomputed = sde_step_log_prob(v, video.trajectory[0], video.trajectory[1], sigmas[0], sigmas[1], noise_level=0.7)
        torch.testing.assert_close(recomputed, video.log_probs[0], rtol=1e-5, atol=1e-3)


def test_dgpo_noisy_copies_on_video_latents_match_the_image_layout():
    from dgpo_lightning.objectives.base import TrainContext, noisy_copies

    ctx = TrainContext(type("B", (), {"denoiser": torch.nn.Linear(1, 1)})(), None, device="cpu", seed=3, step=1)
    x0 = torch.randn(4, 4, 3, 8, 8)
    groups, ids = torch.tensor([0, 0, 1, 1]), torch.tensor([5, 9])
    x_t, t, target = noisy_copies(x0, groups, ids, ctx, k=2, t_min=0.5, t_max=1.0)
    flat_x_t, flat_t, flat_target = noisy_copies(x0.view(4, 12, 8, 8), groups, ids, ctx, k=2, t_min=0.5, t_max=1.0)
    assert x_t.shape == (8, 4, 3, 8, 8)
    torch.testing.assert_close(t, flat_t)
    torch.testing.assert_close(x_t.view(8, 12, 8, 8), flat_x_t)
    torch.testing.assert_close(target.view(8, 12, 8, 8), flat_target)
    # x_t = (1 - t) x0 + t eps with v* = eps - x0, per sample over all video elements.
    eps = target + x0.repeat(2, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1, 1)) * x0.repeat(2, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1) * eps)
