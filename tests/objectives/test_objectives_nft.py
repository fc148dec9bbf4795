"""DiffusionNFT through the plug-in interface: its step against a hand computation on the tiny world
(online, old-policy and reference velocities recomputed here), exact micro-batches, its options and
errors, and two optimizer steps through Lightning."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from dgpo_lightning import objectives
from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.objectives.base import noisy_copies
from helpers import random_group_batch


def flat(tensors):
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def make_module(tiny_world_path, perturb=0.02, old_shift=0.03, **kwargs):
    kwargs = {"algorithm": "diffusion_nft", "old_policy": True, "finetune": "lora", "lora_rank": 4, **kwargs}
    torch.manual_seed(0)  # the LoRA initialisation draws from the global generator
    module = DGPOModule(model_path=str(tiny_world_path), grad_clip=None, **kwargs)
    module.configure_model()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # online, old and reference weights all differ
        for p in module.trainable_parameters():
            p.add_(perturb * torch.randn(p.shape, generator=generator))
        if module.old_policy is not None:
            for old in module.old_policy.averaged:
                old.add_(old_shift * torch.randn(old.shape, generator=generator))
    return module


def gradient(module, batch):
    for p in module.trainable_parameters():
        p.grad = None
    loss, stats = module.backward_step(batch)
    return loss, flat(p.grad for p in module.trainable_parameters()), stats


def hand_loss(module, batch, *, beta, c, kl_beta):
    """The DiffusionNFT loss recomputed from the step's seeded draws, in x0 space as the official script."""
    hp = module.hparams
    k = hp.timesteps_per_sample
    group_ids, groups = batch.group_index.unique(return_inverse=True)
    x_t, t, target = noisy_copies(batch.latents, groups, group_ids, module.train_context(), k=k, t_min=hp.t_min, t_max=hp.t_max)
    x0 = batch.latents.repeat(k, 1, 1, 1)
    torch.testing.assert_close(x_t - x0, t.view(-1, 1, 1, 1) * target)  # the identity the loss uses
    cond = module.backbone.encode_prompts(batch.prompts * k)
    v = module.backbone.velocity(x_t, t, cond)
    with torch.no_grad(), module.old_policy.weights():
        v_old = module.backbone.velocity(x_t, t, cond)
    with torch.no_grad(), module.reference.weights():
        v_ref = module.backbone.velocity(x_t, t, cond)
    advantages = batch.advantages.repeat(k)
    r = torch.clamp(torch.clamp(advantages, -c, c) / c / 2 + 0.5, 0, 1)
    te = t.view(-1, 1, 1, 1)
    total = 0
    for sign, r_branch in ((1, r), (-1, 1 - r)):
        v_branch = v_old + sign * beta * (v - v_old)  # v⁺ = βv + (1−β)v_old ; v⁻ = (1+β)v_old − βv
        x0_pred = x_t - te * v_branch
        weight = (x0_pred.detach() - x0).abs().mean(dim=(1, 2, 3)).clamp(min=1e-5)
        total = total + r_branch * ((x0_pred - x0) ** 2).mean(dim=(1, 2, 3)) / weight
    kl = ((v - v_ref) ** 2).mean()
    return c * (total / beta).mean() + kl_beta * kl, v.detach(), v_old


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_step_matches_a_hand_computation(tiny_world_path, beta):
    options = {"beta": beta, "advantage_max": 2.0}
    module = make_module(tiny_world_path, timesteps_per_sample=2, kl_beta=0.1, algorithm_options=options)
    batch = random_group_batch(module.backbone.latent_shape())
    loss, grad, stats = gradient(module, batch)
    expected, v, v_old = hand_loss(module, batch, beta=beta, c=2.0, kl_beta=0.1)
    assert not torch.allclose(v, v_old)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["old_deviation"], ((v - v_old) ** 2).mean(), rtol=1e-5, atol=1e-8)
    assert stats["kl"] > 0 and set(stats) == {"nft_positive_loss", "nft_negative_loss", "old_deviation", "kl"}
    module.zero_grad()
    expected.backward()
    torch.testing.assert_close(grad, flat(p.grad for p in module.trainable_parameters()), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("micro_batch_size", [1, 5])
def test_micro_batches_give_the_single_pass_loss_and_gradient(tiny_world_path, micro_batch_size):
    kwargs = dict(timesteps_per_sample=2, kl_beta=0.1, algorithm_options={"beta": 0.5})
    batch = random_group_batch(make_module(tiny_world_path).backbone.latent_shape())
    loss, grad, stats = gradient(make_module(tiny_world_path, **kwargs), batch)
    loss_micro, grad_micro, stats_micro = gradient(make_module(tiny_world_path, micro_batch_size=micro_batch_size, **kwargs), batch)
    torch.testing.assert_close(loss_micro, loss, rtol=1e-5, atol=1e-6)
    scale = grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grad_micro, grad, rtol=1e-4, atol=1e-5 * scale)
    for key in stats:
        torch.testing.assert_close(stats_micro[key], stats[key], rtol=1e-5, atol=1e-7)


def test_registered_cfg_free_and_any_solver():
    assert "diffusion_nft" in objectives.BUILTIN and "diffusion_nft" in objectives.available()
    cls = objectives.get("diffusion_nft")
    assert cls.needs.sampler == "any" and not cls.needs.trajectory and cls.uses_old_policy


def test_without_the_old_policy_the_step_names_the_key(tiny_world_path):
    module = make_module(tiny_world_path, old_policy=False)
    with pytest.raises(ValueError, match=r"model\.old_policy=true"):
        module.backward_step(random_group_batch(module.backbone.latent_shape()))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(algorithm_options={"beta": 0.0}), r"model\.algorithm_options\.beta"),
        (dict(algorithm_options={"advantage_max": -1.0}), r"model\.algorithm_options\.advantage_max"),
        (dict(algorithm_options={"adaptive_weighting": "yes"}), r"model\.algorithm_options\.adaptive_weighting"),
        (dict(clip_range=1e-3), r"model\.clip_range"),
    ],
)
def test_bad_options_name_the_key(tiny_world_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DGPOModule(model_path=str(tiny_world_path), algorithm="diffusion_nft", old_policy=True, **kwargs)


def test_unknown_options_are_refused(tiny_world_path):
    with pytest.raises(ValueError, match="takes no options"):
        DGPOModule(model_path=str(tiny_world_path), algorithm="diffusion_nft", algorithm_options={"clip": 1.0})


def test_two_optimizer_steps_through_lightning(tmp_path, tiny_world_path):
    """ODE rollouts, two optimizer steps: the LoRA weights move and the old policy follows them."""
    module = DGPOModule(model_path=str(tiny_world_path), algorithm="diffusion_nft", finetune="lora", lora_rank=4, lr=1e-3,
                        old_policy=True, old_policy_decay_max=0.5, old_policy_decay_rate=0.001, kl_beta=1e-4)
    module.configure_model()
    before = flat(module.trainable_parameters())
    old_before = flat(module.old_policy.averaged)
    data = RolloutDataModule(group_size=4, prompts_per_rank=2, num_steps=3, sampler="ode_dpm", advantage_std="global",
                             rewards={"test_brightness": 1.0}, eval_prompts=None, progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    after = flat(module.trainable_parameters())
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    old_after = flat(module.old_policy.averaged)
    assert not torch.equal(old_before, old_after)
    for key in ("train/loss", "train/nft_positive_loss", "train/old_deviation"):
        assert torch.isfinite(trainer.callback_metrics[key])
