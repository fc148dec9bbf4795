"""``load_adapter``: an exported LoRA (``save_lora``) applied for inference by the library that wrote
it (diffusers for SD3, peft for the world), giving the trained model's outputs exactly."""

import pytest
import torch

from dgpo_lightning.models.lora import add_lora, has_lora, load_adapter, save_lora, trainable_parameters
from dgpo_lightning.models.sd3 import SD3Backbone
from dgpo_lightning.models.testing import build_tiny_sd3
from dgpo_lightning.world.backbone import tiny_backbone

RES = 32
PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def _randomise_lora_b(denoiser, seed=3, scale=0.5):
    # B starts at zero (adapted model == base); give it values so the adapter changes outputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=g))


def _velocity(backbone):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(PROMPTS), *backbone.latent_shape(), generator=g)
    t = torch.rand(len(PROMPTS), generator=g)
    with torch.no_grad():
        return backbone.velocity(x, t, backbone.encode_prompts(PROMPTS))


def test_sd3_adapter_loads_through_diffusers(tmp_path):
    trained = SD3Backbone.from_pipeline(build_tiny_sd3(seed=0), resolution=RES)
    add_lora(trained.denoiser, rank=4)  # alpha 8: a lost alpha would show
    _randomise_lora_b(trained.denoiser)
    expected = _velocity(trained)
    save_lora(trained, tmp_path / "adapter")

    fresh = SD3Backbone.from_pipeline(build_tiny_sd3(seed=0), resolution=RES)
    base = _velocity(fresh)
    name = load_adapter(fresh, tmp_path / "adapter")
    assert has_lora(fresh) and name in fresh.denoiser.peft_config
    assert not torch.allclose(base, expected, atol=1e-3)
    torch.testing.assert_close(_velocity(fresh), expected)
    assert not trainable_parameters(fresh)  # inference: frozen


def test_world_adapter_loads_through_peft(tmp_path):
    torch.manual_seed(0)
    trained = tiny_backbone().eval()
    fresh = tiny_backbone().eval()
    fresh.load_state_dict(trained.state_dict())
    add_lora(trained.denoiser, rank=2, target_modules=["to_q", "to_v"])
    _randomise_lora_b(trained.denoiser, scale=0.2)
    expected = _velocity(trained)
    save_lora(trained, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    base = _velocity(fresh)
    assert load_adapter(fresh, tmp_path / "adapter") == "default"
    assert not torch.allclose(base, expected, atol=1e-4)
    torch.testing.assert_close(_velocity(fresh), expected)
    assert not trainable_parameters(fresh)


def test_bad_adapter_paths_are_named(tmp_path):
    backbone = tiny_backbone()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(backbone, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter in"):
        load_adapter(backbone, tmp_path)
    # An SD3 (diffusers-format) adapter cannot go onto the world's network.
    sd3 = SD3Backbone.from_pipeline(build_tiny_sd3(seed=0), resolution=RES)
    add_lora(sd3.denoiser, rank=2)
    save_lora(sd3, tmp_path / "sd3_adapter")
    with pytest.raises(ValueError, match="not a diffusers pipeline's denoiser"):
        load_adapter(backbone, tmp_path / "sd3_adapter")
    # A world adapter whose targets the SD3 transformer lacks.
    world = tiny_backbone()
    add_lora(world.denoiser, rank=2, target_modules=["time_emb_proj"])
    save_lora(world, tmp_path / "world_adapter")
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(SD3Backbone.from_pipeline(build_tiny_sd3(seed=0), resolution=RES), tmp_path / "world_adapter")
