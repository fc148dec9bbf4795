"""SD3 backbone and LoRA helpers on a tiny random SD3 built offline (no hub, CPU, seconds)."""

import pytest
import torch
from torch import nn

import backbone_checks as checks
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.models.lora import (
    SD3_TARGET_MODULES,
    add_lora,
    fold_lora,
    load_lora,
    reference_mode,
    save_lora,
    trainable_parameters,
)
from dgpo_lightning.models.sd3 import SD3Backbone
from dgpo_lightning.models.testing import build_tiny_sd3

RES = 32
PROMPTS = ["a photo of a cat", "a photo of two blue cars", "a photo of a cat"]
_inputs = checks.inputs
_randomise_lora_b = checks.randomise_lora_b


@pytest.fixture(scope="module")
def shared():
    """One untouched tiny SD3 for the read-only tests."""
    pipe = build_tiny_sd3(seed=0)
    return pipe, SD3Backbone.from_pipeline(pipe, resolution=RES)


def _fresh(seed=0):
    return SD3Backbone.from_pipeline(build_tiny_sd3(seed=seed), resolution=RES)


def _transformer(pipe, x, t, cond):
    """SD3's transformer called by hand as StableDiffusion3Pipeline calls it (timestep 1000 t)."""
    return pipe.transformer(
        hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["prompt_embeds"],
        pooled_projections=cond["pooled_prompt_embeds"],
    ).sample


def test_backbone_protocol_and_latent_shape(shared):
    pipe, backbone = shared
    assert isinstance(backbone, Backbone)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert backbone.latent_shape() == (pipe.transformer.config.in_channels, RES // factor, RES // factor)
    with pytest.raises(ValueError, match="multiple of 4"):
        SD3Backbone.from_pipeline(pipe, resolution=30)


def test_encode_prompts_matches_pipeline_and_uses_cache(shared, monkeypatch):
    pipe, _ = shared
    backbone = SD3Backbone.from_pipeline(pipe, resolution=RES)
    cond = backbone.encode_prompts(PROMPTS)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=256
    )
    torch.testing.assert_close(cond["prompt_embeds"], ref_embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], ref_pooled)
    assert cond["prompt_embeds"].shape == (3, 77 + 256, pipe.transformer.config.joint_attention_dim)
    assert backbone.cache_misses == 2  # the repeated prompt is encoded once

    calls = []
    original = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: calls.append(kw["prompt"]) or original(**kw))
    again = backbone.encode_prompts(["a photo of two blue cars", "a red apple"])
    assert calls == [["a red apple"]]  # only the new prompt reaches the text encoders
    assert backbone.cache_hits == 1
    torch.testing.assert_close(again["prompt_embeds"][0], ref_embeds[1])

    small = SD3Backbone.from_pipeline(pipe, resolution=RES, prompt_cache_size=1)
    small.encode_prompts(["a", "b"])
    assert list(small._cache) == ["b"]  # least recently used dropped

    checks.check_inference_mode_prompts_cached_as_normal_tensors(backbone)


def test_offloaded_text_encoders_visit_the_device_only_to_encode(shared):
    pipe, plain = shared
    backbone = SD3Backbone.from_pipeline(pipe, resolution=RES, offload_text_encoders=True)
    moves = checks.check_offloaded_text_encoders(plain, backbone, PROMPTS, keys=("prompt_embeds", "pooled_prompt_embeds"))
    backbone.offload_idle()
    assert moves[-1] == "cpu" and {p.device.type for p in backbone.text_encoders.parameters()} == {"cpu"}


def test_velocity_is_sd3_transformer_at_1000t(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        expected = _transformer(pipe, x, t, cond)
        v = backbone.velocity(x, t, cond)
    assert v.shape == x.shape
    torch.testing.assert_close(v, expected)
    # A scalar t broadcasts over the batch.
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(x, 0.5, cond), backbone.velocity(x, torch.full((3,), 0.5), cond))


def test_cfg_formula_against_manual_unconditional_pass(shared):
    pipe, backbone = shared
    cond = backbone.encode_prompts(PROMPTS)
    _, neg_embeds, _, neg_pooled = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True, negative_prompt=""
    )
    uncond = {"prompt_embeds": neg_embeds, "pooled_prompt_embeds": neg_pooled}
    x, t = _inputs(backbone)
    with torch.no_grad():
        v_c = backbone.velocity(x, t, cond)
        v_u = backbone.velocity(x, t, uncond)
        v_cfg = backbone.velocity(x, t, cond, guidance_scale=4.5)
    assert not torch.allclose(v_c, v_u)
    torch.testing.assert_close(v_cfg, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_two_step_euler_rollout_matches_diffusers_pipeline(shared):
    pipe, backbone = shared
    prompts = PROMPTS[:2]
    x = torch.randn(2, *backbone.latent_shape(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = pipe(
            prompts, height=RES, width=RES, num_inference_steps=2, guidance_scale=4.5, latents=x.clone(), output_type="latent"
        ).images
        pipe.scheduler.set_timesteps(2)
        sigmas = pipe.scheduler.sigmas.tolist()  # SD3's shifted schedule, ending at 0
        cond = backbone.encode_prompts(prompts)
        latents = x
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = backbone.velocity(latents, torch.full((2,), sigma), cond, guidance_scale=4.5)
            latents = latents + (sigma_next - sigma) * v
        images = backbone.decode(latents)
    assert len(sigmas) == 3 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-5)
    assert images.shape == (2, 3, RES, RES)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_package_samplers_drive_the_sd3_backbone(shared):
    from dgpo_lightning.sampling import flow_sigmas, ode_dpm

    pipe, backbone = shared
    run = checks.check_sd3_euler_rollout_matches_pipeline(pipe, backbone, PROMPTS[:2], guidance_scale=4.5)
    x, cond = run["x"], run["cond"]
    with torch.no_grad():  # the paper's rollout sampler
        dpm = ode_dpm(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale=4.5), x, flow_sigmas(2, shift=3.0)).sample
    assert dpm.shape == x.shape and torch.isfinite(dpm).all()
    assert backbone.decode(dpm).shape == (2, 3, RES, RES)


def test_decode_encode_use_vae_scaling_and_shift(shared):
    pipe, backbone = shared
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    checks.check_autoencoder_kl_decode_encode(pipe, backbone)


def test_from_pretrained_round_trip_and_missing_path(shared, tmp_path):
    pipe, backbone = shared
    pipe.save_pretrained(tmp_path / "sd3")
    loaded = SD3Backbone.from_pretrained(tmp_path / "sd3", torch_dtype="float32", resolution=RES, device="cpu")
    checks.check_from_pretrained_loads_the_saved_pipeline(backbone, loaded, PROMPTS)
    # the YAML options (model.backbone_options) reach the backbone
    via = checks.check_factory_loader("sd3", tmp_path / "sd3", SD3Backbone, resolution=RES, torch_dtype="float32",
                                      offload_text_encoders=True)
    assert via.latent_shape() == backbone.latent_shape()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SD3Backbone.from_pretrained(tmp_path / "nowhere" / "sd3.5-medium")


def test_bfloat16_weights_with_fp32_adapter(shared, tmp_path):
    pipe, backbone = shared
    checks.check_bfloat16_base_with_fp32_adapter(pipe, backbone, SD3Backbone.from_pretrained, tmp_path / "sd3", PROMPTS)


def test_pipeline_property_follows_swapped_denoiser():
    import copy

    backbone = _fresh()
    online = backbone.denoiser
    backbone.denoiser = copy.deepcopy(online)  # what full fine-tuning's reference swap does
    assert backbone.pipeline.transformer is backbone.denoiser
    backbone.denoiser = online
    assert backbone.pipeline.transformer is online
    with torch.no_grad():
        images = backbone.pipeline(PROMPTS[:1], height=RES, width=RES, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, RES, RES)


def test_train_mode_keeps_frozen_parts_in_eval(shared):
    _, backbone = shared
    backbone.train()
    try:
        assert backbone.denoiser.training
        assert not any(m.training for m in backbone.text_encoders.modules())
        assert not backbone.vae.training
    finally:
        backbone.eval()


def test_lora_targets_trainable_params_and_reference_mode():
    backbone = _fresh()
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        base = backbone.velocity(x, t, cond)
    config = add_lora(backbone.denoiser)
    assert config.r == 64 and config.lora_alpha == 128
    assert set(config.target_modules) == set(SD3_TARGET_MODULES)
    params = trainable_parameters(backbone)
    lora_names = {n for n, p in backbone.denoiser.named_parameters() if "lora_" in n}
    assert len(params) == len(lora_names) > 0
    assert all(p.requires_grad for n, p in backbone.denoiser.named_parameters() if n in lora_names)
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(backbone.velocity(x, t, cond), base)  # B = 0 at init
    _randomise_lora_b(backbone.denoiser)
    with torch.no_grad():
        online = backbone.velocity(x, t, cond)
        with reference_mode(backbone.denoiser):
            reference = backbone.velocity(x, t, cond)
        after = backbone.velocity(x, t, cond)
    assert not torch.allclose(online, base, atol=1e-3)
    torch.testing.assert_close(reference, base)
    torch.testing.assert_close(after, online)
    assert all(p.requires_grad for p in params)  # flags restored after reference_mode

    # Gradients reach only the adapter.
    loss = backbone.velocity(x, t, cond).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in backbone.named_parameters() if "lora_" not in n)


def test_lora_targets_are_configurable_and_missing_ones_skipped():
    backbone = _fresh()
    config = add_lora(backbone.denoiser, rank=2, alpha=3.0, target_modules=["to_q", "not_a_layer"])
    assert list(config.target_modules) == ["to_q"] and config.lora_alpha == 3.0
    names = [n for n, _ in backbone.denoiser.named_parameters() if "lora_A" in n]
    assert names and all(".to_q." in n for n in names)
    with pytest.raises(ValueError, match="none of the LoRA targets"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), rank=2)


def test_lora_save_load_into_fresh_pipeline_gives_identical_outputs(tmp_path):
    assert SD3Backbone.lora_targets == SD3_TARGET_MODULES  # add_lora's default: what the Lightning module passes
    checks.check_lora_round_trip(
        lambda: build_tiny_sd3(seed=0), lambda pipe: SD3Backbone.from_pipeline(pipe, resolution=RES),
        _transformer, PROMPTS, tmp_path / "adapter", images={},
    )
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        load_lora(_fresh(), tmp_path)


def test_fold_lora_moves_reference_to_online_model():
    backbone = _fresh()
    add_lora(backbone.denoiser, rank=4)
    _randomise_lora_b(backbone.denoiser)
    cond = backbone.encode_prompts(PROMPTS)
    x, t = _inputs(backbone)
    with torch.no_grad():
        online = backbone.velocity(x, t, cond)
        fold_lora(backbone.denoiser)
        folded = backbone.velocity(x, t, cond)
        with reference_mode(backbone.denoiser):
            reference = backbone.velocity(x, t, cond)
    torch.testing.assert_close(folded, online, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reference, online, rtol=1e-4, atol=1e-5)


class _TinyAttentionNet(nn.Module):
    """A non-diffusers denoiser with attention-style layer names (as a world network might have)."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(6, 6)
        self.to_k = nn.Linear(6, 6)
        self.mlp = nn.Linear(6, 6)

    def forward(self, x):
        return self.mlp(self.to_q(x) * torch.sigmoid(self.to_k(x)))


def test_generic_lora_save_load_in_peft_format(tmp_path):
    torch.manual_seed(0)
    net = _TinyAttentionNet()
    fresh = _TinyAttentionNet()
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(4, 6)
    config = add_lora(net, rank=2)
    assert sorted(config.target_modules) == ["to_k", "to_q"]
    _randomise_lora_b(net)
    with torch.no_grad():
        expected = net(x)
        with reference_mode(net):
            torch.testing.assert_close(net(x), fresh(x))
    save_lora(net, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    load_lora(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(_TinyAttentionNet(), tmp_path / "other")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_backbone_on_cuda():
    backbone = SD3Backbone.from_pipeline(build_tiny_sd3(seed=0), resolution=RES).to("cuda", torch.bfloat16)
    checks.check_bfloat16_on_cuda(backbone, PROMPTS, guidance_scale=4.5)
