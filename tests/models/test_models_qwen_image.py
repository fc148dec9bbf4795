"""Qwen-Image backbone on a tiny random QwenImagePipeline built offline (no hub, CPU, seconds).

Numbers are compared against the diffusers pipeline and transformer themselves: the pipeline's
``encode_prompt``, its ``_pack_latents`` / ``_unpack_latents``, its ``__call__`` (true CFG with the
norm rescale, its scheduler's sigmas) and its VAE decode.
"""

import math
import warnings

import numpy as np
import pytest
import torch

import backbone_checks as checks
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.lora import add_lora, reference_mode, trainable_parameters
from dgpo_lightning.models.qwen_image import QWEN_IMAGE_TARGET_MODULES, LAST_BLOCK_UNUSED_MODULES, QwenImageBackbone
from dgpo_lightning.models.testing.qwen_image import (
    QWEN_IMAGE_PROMPT_TEMPLATE,
    QWEN_IMAGE_SCHEDULER_CONFIG,
    build_tiny_qwen_image,
)
from dgpo_lightning.sampling import flow_sigmas, ode_euler
from dgpo_lightning.sampling.settings import SamplerSettings

RES = 32
# Different token counts (so batches pad), one repeated.
PROMPTS = ["a photo of a cat", 'a sign that says "hello world" in bold letters', "a photo of a cat"]
_inputs = checks.inputs


def _backbone(pipe, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shift_terminal: tested on its own below
        return QwenImageBackbone.from_pipeline(pipe, resolution=RES, **kwargs)


@pytest.fixture(scope="module")
def shared():
    pipe = build_tiny_qwen_image(seed=0)
    return pipe, _backbone(pipe)


def _fresh(seed=0):
    return _backbone(build_tiny_qwen_image(seed=seed))


def _randomise_lora_b(denoiser):
    checks.randomise_lora_b(denoiser, scale=0.3)


def _transformer(pipe, x, t, embeds, mask):
    """The pipeline's own denoiser call on unpacked latents ``x`` (packed and unpacked by the pipeline's helpers)."""
    b, c, h, w = x.shape
    out = pipe.transformer(
        hidden_states=pipe._pack_latents(x, b, c, h, w),
        timestep=t,
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
    )[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)[:, :, 0]


def test_protocol_latent_shape_and_tokenizer_template(shared):
    pipe, backbone = shared
    assert isinstance(backbone, Backbone)
    assert backbone.latent_shape() == (pipe.vae.config.z_dim, RES // pipe.vae_scale_factor, RES // pipe.vae_scale_factor)
    assert pipe.transformer.config.in_channels == 4 * backbone.latent_shape()[0]  # 2x2 packed tokens
    with pytest.raises(ValueError, match="multiple of 4"):
        QwenImageBackbone.from_pipeline(pipe, resolution=30)
    # The tiny byte-level BPE vocabulary tokenizes the template's system prefix into the 34 tokens
    # Qwen2's vocabulary gives, so the pipeline's drop index lands where it does for the real model.
    assert pipe.prompt_template_encode == QWEN_IMAGE_PROMPT_TEMPLATE  # the text the vocabulary was learnt on
    prefix = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(prefix).input_ids
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "user", "Ċ"]
    assert pipe.tokenizer.decode(pipe.tokenizer("a ünïcode prompt 42").input_ids) == "a ünïcode prompt 42"


def test_encode_prompts_matches_pipeline_cache_and_padding(shared, monkeypatch):
    pipe, _ = shared
    backbone = _backbone(pipe)
    cond = backbone.encode_prompts(PROMPTS)
    ref_embeds, ref_mask = pipe.encode_prompt(prompt=PROMPTS, max_sequence_length=512)
    assert ref_mask is not None and not ref_mask.all()  # the batch is padded
    torch.testing.assert_close(cond["prompt_embeds"], ref_embeds)
    torch.testing.assert_close(cond["prompt_embeds_mask"], ref_mask.long())
    assert backbone.cache_misses == 2
    # The cache keeps each prompt without padding.
    assert backbone._cache[PROMPTS[0]]["prompt_embeds"].shape[0] == int(ref_mask[0].sum())

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: calls.append(kw["prompt"]) or original(**kw))
    mixed = ["a red apple", PROMPTS[1], PROMPTS[0]]
    again = backbone.encode_prompts(mixed)
    assert calls == [["a red apple"]]  # only the new prompt reaches the text encoder
    monkeypatch.setattr(pipe, "encode_prompt", original)
    expected_embeds, expected_mask = pipe.encode_prompt(prompt=mixed, max_sequence_length=512)
    torch.testing.assert_close(again["prompt_embeds"], expected_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again["prompt_embeds_mask"], expected_mask.long())

    short = _backbone(pipe, max_sequence_length=4)
    short_embeds, _ = pipe.encode_prompt(prompt=PROMPTS[:2], max_sequence_length=4)
    torch.testing.assert_close(short.encode_prompts(PROMPTS[:2])["prompt_embeds"], short_embeds)
    with pytest.raises(ValueError, match="max_sequence_length"):
        _backbone(pipe, max_sequence_length=2048)

    checks.check_inference_mode_prompts_cached_as_normal_tensors(backbone)


def test_velocity_is_the_transformer_on_packed_tokens_at_sigma(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        expected = _transformer(pipe, x, t, cond["prompt_embeds"], cond["prompt_embeds_mask"])
        v = backbone.velocity(x, t, cond)
    assert v.shape == x.shape
    torch.testing.assert_close(v, expected)
    packed = backbone.pack(x)
    assert packed.shape == (3, (RES // 4) ** 2, 16)
    torch.testing.assert_close(backbone.unpack(packed, *x.shape[-2:]), x)
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), backbone.velocity(x, torch.full((3,), 0.5), cond))


def test_mixed_batch_velocity_equals_each_prompt_alone(shared):
    pipe, backbone = shared
    prompts = ["a photo of a cat", 'a poster with the text "open" written on it', "a dog"]
    backbone.encode_prompts(prompts[:1])  # one cached, two new
    cond = backbone.encode_prompts(prompts)
    assert not cond["prompt_embeds_mask"].all()
    x, t = _inputs(backbone)
    with torch.no_grad():
        batched = backbone.velocity(x, t, cond)
        for i, prompt in enumerate(prompts):
            embeds, mask = pipe.encode_prompt(prompt=[prompt], max_sequence_length=512)
            assert mask is None  # alone: no padding
            alone = _transformer(pipe, x[i : i + 1], t[i : i + 1], embeds, None)
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_qwen_cfg_rescales_to_the_conditional_norm_per_packed_token(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    neg_embeds, neg_mask = pipe.encode_prompt(prompt=[" "] * 3, max_sequence_length=512)
    x, t = _inputs(backbone)
    scale = 4.0
    with torch.no_grad():
        b, c, h, w = x.shape
        kwargs = dict(hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=t, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)
        noise_pred = pipe.transformer(encoder_hidden_states=cond["prompt_embeds"], encoder_hidden_states_mask=cond["prompt_embeds_mask"], **kwargs)[0]
        neg = pipe.transformer(encoder_hidden_states=neg_embeds, encoder_hidden_states_mask=neg_mask, **kwargs)[0]
        comb = neg + scale * (noise_pred - neg)
        expected = comb * (torch.norm(noise_pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        expected = pipe._unpack_latents(expected, RES, RES, pipe.vae_scale_factor)[:, :, 0]
        v = backbone.velocity(x, t, cond, guidance_scale=scale)
        v_c = backbone.velocity(x, t, cond)
    assert backbone.negative_prompt == " " and backbone.default_guidance_scale == 4.0
    torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-5)
    plain = backbone._guide(backbone.velocity(x, t, backbone.encode_prompts([" "] * 3)), v_c, 1.0)
    torch.testing.assert_close(plain, v_c)  # s = 1: the conditional prediction
    # The rescale is per 2x2 token over 4C features, not per pixel or per sample.
    norms = torch.norm(backbone.pack(v), dim=-1)
    torch.testing.assert_close(norms, torch.norm(backbone.pack(v_c), dim=-1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v, v_c, atol=1e-3)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_euler_rollout_matches_the_diffusers_pipeline(shared, true_cfg_scale):
    pipe, backbone = shared
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    b, c, h, w = x.shape
    with torch.no_grad():
        reference = pipe(
            prompts,
            negative_prompt=" " if true_cfg_scale > 1 else None,
            true_cfg_scale=true_cfg_scale,
            height=RES,
            width=RES,
            num_inference_steps=3,
            latents=pipe._pack_latents(x.clone(), b, c, h, w),
            output_type="latent",
        ).images
        sigmas = pipe.scheduler.sigmas.float()  # the schedule the pipeline integrated
        # ... is what the package's samplers use by default (shift_terminal included).
        torch.testing.assert_close(SamplerSettings("ode_euler", 3).resolve(backbone).sigmas(), sigmas)
        cond = backbone.encode_prompts(prompts)
        ours = ode_euler(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=true_cfg_scale), x, sigmas).sample
    reference = pipe._unpack_latents(reference, RES, RES, pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(sigmas, backbone.pipeline_sigmas(3))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    if true_cfg_scale > 1:  # and the pipeline's decoded images are our decode of those latents
        with torch.no_grad():
            images = pipe(prompts, negative_prompt=" ", true_cfg_scale=true_cfg_scale, height=RES, width=RES,
                          num_inference_steps=3, latents=pipe._pack_latents(x.clone(), b, c, h, w), output_type="pt").images
            torch.testing.assert_close(backbone.decode(ours), images, rtol=1e-4, atol=1e-4)


def test_shift_is_exp_mu_and_the_samplers_take_the_pipelines_terminal_stretch(shared):
    pipe, backbone = shared
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = QWEN_IMAGE_SCHEDULER_CONFIG
    mu = calculate_shift((RES // 4) ** 2, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"])
    assert backbone.shift == pytest.approx(math.exp(mu))
    # Without the terminal stretch, flow_sigmas(N, e^mu) is the scheduler's dynamic schedule exactly.
    plain = FlowMatchEulerDiscreteScheduler(**{**config, "shift_terminal": None})
    plain.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    torch.testing.assert_close(flow_sigmas(10, shift=backbone.shift), plain.sigmas.float())
    # With it (the published config) the pipeline's last non-zero sigma is 0.02; pipeline_sigmas has it.
    exact = backbone.pipeline_sigmas(10)
    assert exact[-2].item() == pytest.approx(0.02) and exact[0].item() == pytest.approx(1.0) and exact[-1] == 0
    assert not torch.allclose(exact, flow_sigmas(10, shift=backbone.shift))  # the stretch matters
    torch.testing.assert_close(SamplerSettings("ode_dpm", 10).resolve(backbone).sigmas(), exact)
    # An explicit shift (data.shift) replaces the pipeline's schedule with flow_sigmas.
    torch.testing.assert_close(SamplerSettings("ode_dpm", 10, shift=2.0).resolve(backbone).sigmas(), flow_sigmas(10, shift=2.0))
    # 512 px (1024 tokens): the value the YAML's rollouts use.
    big = backbone.__class__.__new__(backbone.__class__)
    big._pipe, big.resolution, big.vae_scale_factor = pipe, 512, 8
    assert math.exp(big._mu()) == pytest.approx(math.exp(0.5 + (1024 - 256) * 0.4 / (8192 - 256)))

    other = build_tiny_qwen_image(seed=0)
    other.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # static, nothing unsupported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QwenImageBackbone.from_pipeline(other, resolution=RES).shift == 3.0


def test_decode_encode_use_latents_mean_and_std(shared):
    pipe, backbone = shared
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(std, torch.ones_like(std))
    z = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        images = backbone.decode(z)
        manual = vae.decode(z[:, :, None] * std + mean).sample[:, :, 0]
        torch.testing.assert_close(images, (manual / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
        latents = backbone.encode(images)
        posterior = vae.encode((2 * images - 1)[:, :, None]).latent_dist.mode()
        sampled = backbone.encode(images, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, RES, RES) and latents.shape == z.shape
    torch.testing.assert_close(latents, ((posterior - mean) / std)[:, :, 0], rtol=1e-5, atol=1e-5)
    assert sampled.shape == z.shape and not torch.allclose(sampled, latents)


def test_from_pretrained_round_trip_loader_and_missing_path(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "qwen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = QwenImageBackbone.from_pretrained(tmp_path / "qwen", torch_dtype="float32", resolution=RES, device="cpu")
        via = checks.check_factory_loader("qwen_image", tmp_path / "qwen", QwenImageBackbone, resolution=RES,
                                          max_sequence_length=64, offload_text_encoders=True)
    checks.check_from_pretrained_loads_the_saved_pipeline(backbone, loaded, PROMPTS, guidance_scale=4.0)
    assert via.max_sequence_length == 64
    with pytest.raises(FileNotFoundError, match="nowhere"):
        QwenImageBackbone.from_pretrained(tmp_path / "nowhere" / "Qwen-Image")


def test_offloaded_text_encoder_visits_the_device_only_to_encode(shared):
    pipe, plain = shared
    checks.check_offloaded_text_encoders(plain, _backbone(pipe, offload_text_encoders=True), PROMPTS,
                                         keys=("prompt_embeds", "prompt_embeds_mask"))


def _from_pretrained(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QwenImageBackbone.from_pretrained(path, **kwargs)


def test_bfloat16_base_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    checks.check_bfloat16_base_with_fp32_adapter(pipe, backbone, _from_pretrained, tmp_path / "qwen", PROMPTS, guidance_scale=4.0)


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads():
    checks.check_gradient_checkpointing(_fresh(), PROMPTS, guidance_scale=4.0, lora_scale=0.3)


def test_fsdp_shard_units_are_all_dual_stream_blocks(shared):
    pipe, backbone = shared
    checks.check_shard_units(backbone, list(pipe.transformer.transformer_blocks), 2)


def test_train_mode_keeps_frozen_parts_in_eval(shared):
    _, backbone = shared
    backbone.train()
    try:
        assert backbone.denoiser.training
        assert not any(m.training for m in backbone.text_encoders.modules()) and not backbone.vae.training
    finally:
        backbone.eval()


def test_lora_targets_are_flow_grpo_modules_that_get_gradients():
    backbone = _fresh()
    add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in backbone.denoiser.named_parameters() if ".lora_A" in n}
    # Flow-GRPO's 12 layers in every block, except the last block's 4 unused text-stream layers.
    last = len(backbone.denoiser.transformer_blocks) - 1
    expected = {
        f"transformer_blocks.{i}.{name}"
        for i in range(last + 1)
        for name in QWEN_IMAGE_TARGET_MODULES
        if not (i == last and name in LAST_BLOCK_UNUSED_MODULES)
    }
    assert adapted == expected
    _randomise_lora_b(backbone.denoiser)
    x, t = _inputs(backbone)
    backbone.velocity(x, t, backbone.encode_prompts(PROMPTS), guidance_scale=4.0).square().mean().backward()
    params = trainable_parameters(backbone)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # DDP-safe: none unused


def test_lora_reference_mode_is_the_base_model():
    backbone = _fresh()
    add_lora(backbone.denoiser, rank=4, target_modules=backbone.lora_targets)
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        base = backbone.velocity(x, t, cond)
    _randomise_lora_b(backbone.denoiser)
    with torch.no_grad():
        online = backbone.velocity(x, t, cond)
        with reference_mode(backbone.denoiser):
            reference = backbone.velocity(x, t, cond)
    assert not torch.allclose(online, base, atol=1e-3)
    torch.testing.assert_close(reference, base)


def test_lora_save_into_fresh_pipeline_and_load_adapter_round_trip(tmp_path):
    checks.check_lora_round_trip(
        lambda: build_tiny_qwen_image(seed=0), _backbone,
        lambda pipe, x, t, cond: _transformer(pipe, x, t, cond["prompt_embeds"], cond["prompt_embeds_mask"]),
        PROMPTS, tmp_path / "adapter", lora_scale=0.3, tolerance={"rtol": 1e-4, "atol": 1e-5},
    )


def test_guidance_distilled_checkpoints_are_refused():
    pipe = build_tiny_qwen_image(seed=0)
    pipe.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds"):
        _backbone(pipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_backbone_on_cuda():
    backbone = _fresh().to("cuda", torch.bfloat16)
    cond = checks.check_bfloat16_on_cuda(backbone, PROMPTS, guidance_scale=4.0, lora_scale=0.3)
    assert not cond["prompt_embeds_mask"].all()
