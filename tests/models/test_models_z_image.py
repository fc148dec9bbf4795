"""Z-Image / Z-Image-Turbo backbone on a tiny random ZImagePipeline built offline (no hub, CPU).

Every number is compared against diffusers' own code: ``encode_prompt``, the transformer called as
the pipeline calls it, and the pipeline's denoising loop (``pipe(..., output_type="latent")``)."""

import math

import pytest
import torch

import backbone_checks as checks
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.lora import add_lora, trainable_parameters
from dgpo_lightning.models.testing.z_image import build_tiny_z_image
from dgpo_lightning.models.z_image import Z_IMAGE_TARGET_MODULES, ZImageBackbone
from dgpo_lightning.sampling import flow_sigmas, ode_euler

RES = 32
PROMPTS = ["a photo of a cat", "a green bench to the left of a yellow umbrella", "a photo of a cat"]
_inputs = checks.inputs


@pytest.fixture(scope="module")
def shared():
    pipe = build_tiny_z_image(seed=0)
    return pipe, ZImageBackbone.from_pipeline(pipe, resolution=RES)


def _fresh(seed=0, **kwargs):
    return ZImageBackbone.from_pipeline(build_tiny_z_image(seed=seed), resolution=RES, **kwargs)


def _direct(transformer, x, t, captions):
    """The transformer called exactly as ZImagePipeline.__call__ calls it, output as its noise_pred."""
    out = transformer(list(x.unsqueeze(2).unbind(0)), (1000 - 1000 * t) / 1000, captions, return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


def test_protocol_shapes_and_model_flags(shared, tmp_path):
    pipe, backbone = shared
    assert isinstance(backbone, Backbone)
    assert backbone.latent_shape() == (16, RES // pipe.vae_scale_factor, RES // pipe.vae_scale_factor)
    with pytest.raises(ValueError, match="multiple of 4"):  # vae_scale_factor 2 x 2, the pipeline's rule
        ZImageBackbone.from_pipeline(pipe, resolution=30)
    # Base: true CFG, the pipeline's guidance_scale 4 (= package 5); Turbo: none.
    assert (backbone.turbo, backbone.cfg_mode, backbone.default_guidance_scale) == (False, "true", 5.0)
    turbo = ZImageBackbone.from_pipeline(pipe, resolution=RES, turbo=True)
    assert (turbo.cfg_mode, turbo.default_guidance_scale) == ("none", 1.0)
    assert ZImageBackbone.cfg_mode == "true"  # per instance, the class is untouched
    # Z-Image-Turbo's scheduler: shift 3, no dynamic shifting.
    assert backbone.shift == 3.0
    pipe.save_pretrained(tmp_path / "Z-Image-Turbo")
    assert ZImageBackbone.from_pretrained(tmp_path / "Z-Image-Turbo", resolution=RES).turbo  # inferred from the name
    assert not ZImageBackbone.from_pretrained(tmp_path / "Z-Image-Turbo", resolution=RES, turbo=False).turbo


def test_encode_prompts_matches_pipeline_pads_and_caches(shared, monkeypatch):
    pipe, _ = shared
    backbone = ZImageBackbone.from_pipeline(pipe, resolution=RES)
    prompts = list(PROMPTS)
    cond = backbone.encode_prompts(prompts)
    assert prompts == PROMPTS  # encode_prompt rewrites its list in place: the backbone passes a copy
    reference, negative = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False)
    assert negative == [] and [r.shape[0] for r in reference][:2] != [reference[0].shape[0]] * 2  # lengths differ
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert lengths == [r.shape[0] for r in reference]
    assert cond["prompt_embeds"].shape == (3, max(lengths), pipe.text_encoder.config.hidden_size)
    for i, ref in enumerate(reference):
        torch.testing.assert_close(cond["prompt_embeds"][i, : lengths[i]], ref)
        assert not cond["prompt_embeds"][i, lengths[i]:].any()
    # The hidden state is the text encoder's second-to-last, of the chat-templated prompt.
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n"
    ids = pipe.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(cond["prompt_embeds"][0, : lengths[0]], hidden, rtol=1e-4, atol=1e-5)
    assert backbone.cache_misses == 2

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: calls.append(list(kw["prompt"])) or original(**kw))
    again = backbone.encode_prompts([PROMPTS[1], "a red apple"])
    assert calls == [["a red apple"]] and backbone.cache_hits == 1
    torch.testing.assert_close(again["prompt_embeds"][0, : lengths[1]], reference[1])
    checks.check_inference_mode_prompts_cached_as_normal_tensors(backbone)


def test_velocity_is_negated_transformer_at_one_minus_t_and_batch_independent(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    captions, _ = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False)
    x, t = _inputs(backbone)
    with torch.no_grad():
        v = backbone.velocity(x, t, cond)
        expected = _direct(pipe.transformer, x, t, captions)
        torch.testing.assert_close(v, expected)
        # A mixed batch (different caption lengths) equals each prompt alone.
        for i, prompt in enumerate(PROMPTS):
            alone = backbone.velocity(x[i : i + 1], t[i : i + 1], backbone.encode_prompts([prompt]))
            torch.testing.assert_close(v[i : i + 1], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), backbone.velocity(x, torch.full((3,), 0.5), cond))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_cfg_equals_the_pipeline_combination(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    captions, negatives = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=True)
    x, t = _inputs(backbone)
    with torch.no_grad():
        pos = _direct(pipe.transformer, x, t, captions)
        neg = _direct(pipe.transformer, x, t, negatives)
        v = backbone.velocity(x, t, cond, guidance_scale=4.0)  # the pipeline's guidance_scale 3
    assert not torch.allclose(pos, neg)
    torch.testing.assert_close(v, pos + 3.0 * (pos - neg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("turbo", [True, False], ids=["turbo_no_cfg", "base_cfg"])
def test_euler_rollout_equals_the_diffusers_pipeline(shared, turbo):
    pipe, _ = shared
    backbone = ZImageBackbone.from_pipeline(pipe, resolution=RES, turbo=turbo)
    prompts = PROMPTS[:2]
    steps = 3
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    pipe_scale = 0.0 if turbo else 3.0
    with torch.no_grad():
        reference = pipe(
            list(prompts), height=RES, width=RES, num_inference_steps=steps, guidance_scale=pipe_scale,
            latents=x.clone(), output_type="latent",
        ).images
        sigmas = flow_sigmas(steps, shift=backbone.shift)
        torch.testing.assert_close(sigmas, pipe.scheduler.sigmas.float())  # the same schedule, 3 passes
        cond = backbone.encode_prompts(prompts)
        scale = backbone.default_guidance_scale if turbo else pipe_scale + 1.0
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=scale), x, sigmas).sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, x)


def test_cfg_normalization_and_truncation_match_the_pipeline(shared):
    pipe, _ = shared
    backbone = ZImageBackbone.from_pipeline(pipe, resolution=RES, cfg_normalization=1.0, cfg_truncation=0.5)
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = pipe(
            list(PROMPTS[:2]), height=RES, width=RES, num_inference_steps=4, guidance_scale=3.0, cfg_normalization=1.0,
            cfg_truncation=0.5, latents=x.clone(), output_type="latent",
        ).images
        plain = pipe(PROMPTS[:2], height=RES, width=RES, num_inference_steps=4, guidance_scale=3.0,
                     latents=x.clone(), output_type="latent").images
        cond = backbone.encode_prompts(PROMPTS[:2])
        sigmas = flow_sigmas(4, shift=backbone.shift)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=4.0), x, sigmas).sample
    assert not torch.allclose(reference, plain, atol=1e-4)  # the options matter here
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_dynamic_shift_is_exp_mu_at_the_backbone_resolution():
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256,
              "base_shift": 0.5, "max_shift": 1.15}
    pipe = build_tiny_z_image(seed=0, scheduler_config=config)
    backbone = ZImageBackbone.from_pipeline(pipe, resolution=RES, turbo=True)
    assert backbone.shift == pytest.approx(math.exp(calculate_shift(64, 16, 256, 0.5, 1.15)))
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = pipe(PROMPTS[:2], height=RES, width=RES, num_inference_steps=3, guidance_scale=0.0,
                         latents=x.clone(), output_type="latent").images
        torch.testing.assert_close(flow_sigmas(3, shift=backbone.shift), pipe.scheduler.sigmas.float())
        cond = backbone.encode_prompts(PROMPTS[:2])
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond), x, flow_sigmas(3, shift=backbone.shift)).sample
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shift_terminal"):
        ZImageBackbone.from_pipeline(build_tiny_z_image(scheduler_config={"shift_terminal": 0.1}), resolution=RES)


def test_decode_encode_use_flux_vae_scaling_and_shift(shared):
    pipe, backbone = shared
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    checks.check_autoencoder_kl_decode_encode(pipe, backbone)


def test_from_pretrained_round_trip_factory_and_missing_path(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "z_image")
    loaded = checks.check_factory_loader("z_image", tmp_path / "z_image", ZImageBackbone, resolution=RES,
                                         torch_dtype="float32", offload_text_encoders=True, turbo=True)
    assert loaded.turbo
    checks.check_from_pretrained_loads_the_saved_pipeline(backbone, loaded, PROMPTS)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ZImageBackbone.from_pretrained(tmp_path / "nowhere" / "Z-Image-Turbo")


def test_offloaded_text_encoder_visits_the_device_only_to_encode(shared):
    pipe, plain = shared
    offloaded = ZImageBackbone.from_pipeline(pipe, resolution=RES, offload_text_encoders=True)
    checks.check_offloaded_text_encoders(plain, offloaded, PROMPTS, keys=("prompt_embeds", "prompt_mask"))


def test_bfloat16_base_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    checks.check_bfloat16_base_with_fp32_adapter(pipe, backbone, ZImageBackbone.from_pretrained, tmp_path / "z", PROMPTS,
                                                 guidance_scale=2.0)


def test_lora_targets_cover_every_attention_and_shard_units_every_block():
    backbone = _fresh()
    denoiser = backbone.denoiser
    config = add_lora(denoiser, rank=32, alpha=64, target_modules=backbone.lora_targets)
    assert set(config.target_modules) == set(Z_IMAGE_TARGET_MODULES) == {"to_q", "to_k", "to_v", "to_out.0"}
    blocks = [*denoiser.noise_refiner, *denoiser.context_refiner, *denoiser.layers]
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in denoiser.named_parameters() if "lora_A" in n}
    expected = {
        f"{group}.{i}.attention.{proj}"
        for group, n in (("noise_refiner", 1), ("context_refiner", 1), ("layers", 2))
        for i in range(n)
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert adapted == expected
    checks.check_shard_units(backbone, blocks, 4)


def _pipeline_forward(pipe, x, t, cond):
    """The pipeline's transformer on its own caption encoding of ``PROMPTS`` (``cond`` is the backbone's)."""
    captions, _ = pipe.encode_prompt(prompt=list(PROMPTS), do_classifier_free_guidance=False)
    return _direct(pipe.transformer, x, t, captions)


def test_lora_save_load_into_fresh_pipeline_and_load_adapter(tmp_path):
    checks.check_lora_round_trip(
        lambda: build_tiny_z_image(seed=0), lambda pipe: ZImageBackbone.from_pipeline(pipe, resolution=RES),
        _pipeline_forward, PROMPTS, tmp_path / "adapter", images={"guidance_scale": 0.0},
    )


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    checks.check_gradient_checkpointing(_fresh(seed=0), PROMPTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_backbone_on_cuda_matches_the_pipeline():
    pipe = build_tiny_z_image(seed=0).to("cuda", torch.bfloat16)
    backbone = ZImageBackbone.from_pipeline(pipe, resolution=RES)
    x = torch.randn(2, *backbone.latent_shape(), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    with torch.no_grad():
        reference = pipe(list(PROMPTS[:2]), height=RES, width=RES, num_inference_steps=2, guidance_scale=3.0,
                         latents=x.clone(), output_type="latent").images
        cond = backbone.encode_prompts(PROMPTS[:2])
        assert cond["prompt_embeds"].device.type == "cuda"
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=4.0), x,
                         flow_sigmas(2, shift=backbone.shift, device="cuda")).sample
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)
    checks.add_test_lora(backbone)
    t = torch.rand(2, device="cuda")
    v = backbone.velocity(x, t, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None for p in trainable_parameters(backbone))
    images = backbone.decode(x)
    assert images.device.type == "cuda" and images.shape == (2, 3, RES, RES)
