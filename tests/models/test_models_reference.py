"""models/reference.py tested directly: the adapter-disabled and frozen-copy references, the EMA
reference, reference switching (also through the ReferenceSchedule callback) and offloading."""

from __future__ import annotations

import pytest
import torch

from dgpo_lightning.callbacks import ReferenceSchedule
from dgpo_lightning.models.lora import add_lora
from dgpo_lightning.models.reference import Reference
from dgpo_lightning.world.backbone import load_backbone

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


def flat(tensors):
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def inputs(backbone):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *backbone.latent_shape(), generator=generator)
    return x, torch.tensor([0.4, 0.9]), backbone.encode_prompts(PROMPTS)


def perturb(parameters, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn(p.shape, generator=generator))


def lora_backbone(path):
    backbone = load_backbone(path)
    backbone.requires_grad_(False)
    add_lora(backbone.denoiser, rank=4)
    return backbone


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_is_the_starting_model_and_reset_moves_it_to_the_online_one(tiny_world_path, finetune):
    base = load_backbone(tiny_world_path)
    if finetune == "lora":
        backbone = lora_backbone(tiny_world_path)
        reference = Reference(backbone, lora=True)
        trained = [p for n, p in backbone.denoiser.named_parameters() if "lora_B" in n]
    else:
        backbone = load_backbone(tiny_world_path)
        reference = Reference(backbone, lora=False)
        trained = list(backbone.denoiser.parameters())
    x, t, cond = inputs(backbone)
    perturb(trained)
    v_base = base.velocity(x, t, cond)
    v_online = backbone.velocity(x, t, cond)
    assert not torch.allclose(v_online, v_base)
    torch.testing.assert_close(reference.velocity(x, t, cond), v_base)
    torch.testing.assert_close(backbone.velocity(x, t, cond), v_online)  # the online model is back after the block

    reference.reset()
    assert reference.frozen_weights_changed
    torch.testing.assert_close(backbone.velocity(x, t, cond), v_online, rtol=1e-5, atol=1e-6)  # online unchanged
    torch.testing.assert_close(reference.velocity(x, t, cond), v_online, rtol=1e-5, atol=1e-6)  # reference = online now


def test_ema_reference_follows_the_online_weights(tiny_world_path):
    backbone = load_backbone(tiny_world_path)
    reference = Reference(backbone, lora=False, kind="ema", decay=0.75)
    before = flat(reference.frozen.parameters())
    perturb(backbone.denoiser.parameters())
    reference.update()
    expected = 0.75 * before + 0.25 * flat(backbone.denoiser.parameters())
    torch.testing.assert_close(flat(reference.frozen.parameters()), expected)
    assert reference.moves


def test_initial_reference_does_not_move(tiny_world_path):
    backbone = load_backbone(tiny_world_path)
    reference = Reference(backbone, lora=False)
    before = flat(reference.frozen.parameters())
    perturb(backbone.denoiser.parameters())
    reference.update()
    assert torch.equal(flat(reference.frozen.parameters()), before) and not reference.moves


def test_offloaded_copy_visits_the_device_only_to_compute(tiny_world_path):
    backbone = load_backbone(tiny_world_path)
    reference = Reference(backbone, lora=False, offload=True)
    moves, real_to = [], reference.frozen.to
    reference.frozen.to = lambda device: moves.append(str(device)) or real_to(device)
    x, t, cond = inputs(backbone)
    reference.velocity(x, t, cond)
    assert moves == ["cpu", "cpu"]  # to the denoiser's device (the CPU here) and back


@pytest.mark.parametrize(
    "options, message",
    [({"lora": True, "kind": "ema"}, "needs finetune=full"), ({"lora": True, "offload": True}, "needs finetune=full"),
     ({"lora": False, "decay": 1.0}, "reference_decay")],
)
def test_bad_reference_settings_are_refused(tiny_world_path, options, message):
    backbone = lora_backbone(tiny_world_path)
    with pytest.raises(ValueError, match=message):
        Reference(backbone, **options)


def test_reference_schedule_resets_every_n_epochs():
    calls = []
    module = type("M", (), {"reset_reference": lambda self: calls.append(trainer.current_epoch)})()
    trainer = type("T", (), {"current_epoch": 0})()
    schedule = ReferenceSchedule(every_n_epochs=3)
    for epoch in range(9):
        trainer.current_epoch = epoch
        schedule.on_train_epoch_end(trainer, module)
    assert calls == [2, 5, 8]
    with pytest.raises(ValueError):
        ReferenceSchedule(every_n_epochs=0)
