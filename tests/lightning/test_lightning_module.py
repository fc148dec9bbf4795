"""DGPOModule + RolloutDataModule on a tiny random world model: one-batch fits, reference handling,
exact micro-batched gradients, resume."""

from __future__ import annotations


import lightning as L
import pytest
import torch

from dgpo_lightning.algo import dgpo_loss
from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.objectives.base import noisy_copies
from helpers import random_group_batch


def make_trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def make_data(**kwargs):
    defaults = dict(
        group_size=4, prompts_per_rank=2, num_steps=3, rewards={"test_brightness": 1.0}, eval_prompts=None, progress=False
    )
    defaults.update(kwargs)
    return RolloutDataModule(**defaults)


def flat(parameters):
    return torch.cat([p.detach().flatten().clone() for p in parameters])


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fast_dev_run_trains_online_weights_and_keeps_the_reference(tmp_path, tiny_world_path, finetune):
    module = DGPOModule(model_path=str(tiny_world_path), finetune=finetune, lr=1e-3, lora_rank=4)
    module.configure_model()
    trainable = [n for n, p in module.backbone.denoiser.named_parameters() if p.requires_grad]
    before_trainable = flat(p for p in module.backbone.denoiser.parameters() if p.requires_grad)
    frozen = [p for p in module.backbone.denoiser.parameters() if not p.requires_grad]
    before_frozen = flat(frozen) if frozen else None
    reference = module.reference.frozen
    before_reference = flat(reference.parameters()) if reference is not None else None
    make_trainer(tmp_path, fast_dev_run=True).fit(module, make_data())

    after_trainable = flat(p for p in module.backbone.denoiser.parameters() if p.requires_grad)
    assert trainable and not torch.equal(before_trainable, after_trainable)
    if finetune == "full":
        assert torch.equal(before_reference, flat(reference.parameters()))
    else:
        assert all("lora" in n for n in trainable)
        assert torch.equal(before_frozen, flat(frozen))  # the base (= reference) is untouched


def test_reference_velocity_is_the_initial_model(tiny_world_path):
    """After training steps the reference still reproduces the untouched base model."""
    module = DGPOModule(model_path=str(tiny_world_path), finetune="lora", lora_rank=4)
    module.configure_model()
    base = DGPOModule(model_path=str(tiny_world_path))
    base.configure_model()
    with torch.no_grad():
        for name, p in module.backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(2, *module.backbone.latent_shape())
    t = torch.tensor([0.3, 0.9])
    cond = module.backbone.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    with module.reference.weights():
        v_reference = module.backbone.velocity(x, t, cond)
    v_online = module.backbone.velocity(x, t, cond)
    v_base = base.backbone.velocity(x, t, base.backbone.encode_prompts(["a photo of a red circle", "a photo of two squares"]))
    torch.testing.assert_close(v_reference, v_base)
    assert not torch.allclose(v_online, v_base)


def _batch(module, **kwargs):
    return random_group_batch(module.backbone.latent_shape(), **kwargs)


def _noisy(module, batch):
    """The step's noisy copies, recomputed from the module's own seeded draws."""
    group_ids, groups = batch.group_index.unique(return_inverse=True)
    hp = module.hparams
    x_t, t, target = noisy_copies(
        batch.latents, groups, group_ids, module.train_context(), k=hp.timesteps_per_sample, t_min=hp.t_min, t_max=hp.t_max
    )
    return x_t, t, target, groups, group_ids


def _gradient(tiny_world_path, batch_fn, algorithm="dgpo", **kwargs):
    module = DGPOModule(model_path=str(tiny_world_path), algorithm=algorithm, grad_clip=None, **kwargs)
    module.configure_model()
    with torch.no_grad():  # move away from the reference so the group sigmoid is not exactly 1/2
        generator = torch.Generator().manual_seed(7)
        for p in module.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    batch = batch_fn(module)
    loss, _ = module.backward_step(batch)  # without a Trainer: plain backward, step 0
    return loss, flat(p.grad for p in module.trainable_parameters()), module, batch


@pytest.mark.parametrize("algorithm, options", [("dgpo", {}), ("diffusion_dpo", {}), ("diffusion_dpo", {"pairs": "all"})])
@pytest.mark.parametrize("micro_batch_size", [1, 5])
def test_micro_batched_gradients_equal_the_single_pass(tiny_world_path, algorithm, options, micro_batch_size):
    kwargs = dict(timesteps_per_sample=2, kl_beta=0.1, beta=40.0, algorithm_options=options)
    loss_full, grad_full, _, _ = _gradient(tiny_world_path, _batch, algorithm, **kwargs)
    loss_micro, grad_micro, _, _ = _gradient(tiny_world_path, _batch, algorithm, micro_batch_size=micro_batch_size, **kwargs)
    torch.testing.assert_close(loss_micro, loss_full, rtol=1e-5, atol=1e-6)
    scale = grad_full.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grad_micro, grad_full, rtol=1e-4, atol=1e-5 * scale)


def test_diffusion_dpo_over_all_pairs_is_best_vs_worst_for_pairs_and_more_for_larger_groups(tiny_world_path):
    kwargs = dict(timesteps_per_sample=2, kl_beta=0.0, beta=40.0)
    for group_size, same in ((2, True), (4, False)):
        batch_fn = lambda module: _batch(module, group_size=group_size)  # noqa: E731
        best_worst = _gradient(tiny_world_path, batch_fn, "diffusion_dpo", **kwargs)
        every_pair = _gradient(tiny_world_path, batch_fn, "diffusion_dpo", algorithm_options={"pairs": "all"}, **kwargs)
        # a group of two has exactly one pair: the same loss and gradient
        assert torch.allclose(best_worst[0], every_pair[0]) is same
        assert torch.allclose(best_worst[1], every_pair[1]) is same
    with pytest.raises(ValueError, match="algorithm_options.pairs: 'some' is not one of best_worst, all"):
        DGPOModule(model_path=str(tiny_world_path), algorithm="diffusion_dpo", algorithm_options={"pairs": "some"}).configure_model()


def test_dgpo_step_loss_matches_an_independent_computation(tiny_world_path):
    """The module's loss equals dgpo_loss on errors recomputed here from the same t and noise."""
    loss, _, module, batch = _gradient(tiny_world_path, _batch, beta=25.0)
    x_t, t, target, groups, group_ids = _noisy(module, batch)
    cond = module.backbone.encode_prompts(batch.prompts)
    with torch.no_grad():
        dsm_online = ((module.backbone.velocity(x_t, t, cond) - target) ** 2).mean(dim=(1, 2, 3))
        with module.reference.weights():
            dsm_reference = ((module.backbone.velocity(x_t, t, cond) - target) ** 2).mean(dim=(1, 2, 3))
    expected, _ = dgpo_loss(dsm_online, dsm_reference, batch.advantages, batch.group_index, beta=25.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # timesteps shared inside each group and drawn from [t_min, 1]
    for g in range(group_ids.numel()):
        assert t[groups == g].unique().numel() == 1


def test_guided_reference_mode_uses_cfg_for_the_reference_only(tiny_world_path):
    """``reference_guidance_scale`` (the official kl_cfg mode): online velocities without CFG, the
    reference's with CFG, in both the implicit reward and the KL term."""
    kwargs = dict(beta=25.0, kl_beta=0.5, reference_guidance_scale=3.0)
    loss, _, module, batch = _gradient(tiny_world_path, _batch, **kwargs)
    x_t, t, target, groups, group_ids = _noisy(module, batch)
    cond = module.backbone.encode_prompts(batch.prompts)
    with torch.no_grad():
        v_online = module.backbone.velocity(x_t, t, cond)
        with module.reference.weights():
            v_guided = module.backbone.velocity(x_t, t, cond, guidance_scale=3.0)
            v_plain = module.backbone.velocity(x_t, t, cond)
    assert not torch.allclose(v_guided, v_plain)  # CFG really changes the reference here
    dsm_online = ((v_online - target) ** 2).mean(dim=(1, 2, 3))
    dsm_reference = ((v_guided - target) ** 2).mean(dim=(1, 2, 3))
    expected, _ = dgpo_loss(dsm_online, dsm_reference, batch.advantages, batch.group_index, beta=25.0)
    expected = expected + 0.5 * ((v_online - v_guided) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def _record_moves(model):
    """Replace ``model.to`` by a wrapper that records the target devices."""
    moves, real_to = [], model.to
    model.to = lambda device: moves.append(str(device)) or real_to(device)
    return moves


def test_offloaded_reference_gives_the_same_step_and_waits_on_the_cpu(tiny_world_path):
    loss, grad, _, _ = _gradient(tiny_world_path, _batch, finetune="full", kl_beta=0.1)

    module = DGPOModule(model_path=str(tiny_world_path), finetune="full", kl_beta=0.1, grad_clip=None, offload_reference=True)
    module.configure_model()
    with torch.no_grad():  # the same perturbation as _gradient
        generator = torch.Generator().manual_seed(7)
        for p in module.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    moves = _record_moves(module.reference.frozen)
    offloaded_loss, _ = module.backward_step(_batch(module))
    torch.testing.assert_close(offloaded_loss, loss)
    torch.testing.assert_close(flat(p.grad for p in module.trainable_parameters()), grad)
    device = str(next(module.backbone.denoiser.parameters()).device)
    assert moves == [device, "cpu"]  # one visit for the reference forward pass, then back
    assert {p.device.type for p in module.reference.frozen.parameters()} == {"cpu"}


def test_offload_reference_needs_a_reference_copy(tiny_world_path):
    with pytest.raises(ValueError, match=r"model\.offload_reference=True needs finetune=full"):
        DGPOModule(model_path=str(tiny_world_path), finetune="lora", offload_reference=True)


def test_offloaded_ema_reference_still_follows_the_online_weights(tmp_path, tiny_world_path):
    module = DGPOModule(model_path=str(tiny_world_path), finetune="full", reference="ema", reference_decay=0.5, lr=1e-3, offload_reference=True)
    module.configure_model()
    before = flat(module.reference.frozen.parameters())
    make_trainer(tmp_path, fast_dev_run=True).fit(module, make_data())
    after = flat(module.reference.frozen.parameters())
    online = flat(module.backbone.denoiser.parameters())
    assert not torch.equal(before, after)
    # one lerp halfway towards the online weights
    torch.testing.assert_close(after, 0.5 * before + 0.5 * online, rtol=1e-5, atol=1e-6)


def test_resume_continues_with_identical_state(tmp_path, tiny_world_path):
    """4 epochs straight == 2 epochs, checkpoint, resume to 4: weights and optimizer state."""

    def run(directory, epochs, ckpt_path=None):
        module = DGPOModule(model_path=str(tiny_world_path), lr=1e-3, reference="ema", reference_decay=0.5)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_epochs=1, save_on_train_epoch_end=True)
        trainer = make_trainer(directory, max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoint])
        trainer.fit(module, make_data(), ckpt_path=ckpt_path)
        return module, trainer

    straight, straight_trainer = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, trainer = run(tmp_path / "b", 4, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert trainer.global_step == straight_trainer.global_step > 0
    torch.testing.assert_close(flat(resumed.backbone.denoiser.parameters()), flat(straight.backbone.denoiser.parameters()))
    torch.testing.assert_close(flat(resumed.reference.frozen.parameters()), flat(straight.reference.frozen.parameters()))
    state_a = straight.optimizers().optimizer.state_dict()["state"]
    state_b = resumed.optimizers().optimizer.state_dict()["state"]
    for key in state_a:
        torch.testing.assert_close(state_b[key]["exp_avg"], state_a[key]["exp_avg"])
        torch.testing.assert_close(state_b[key]["exp_avg_sq"], state_a[key]["exp_avg_sq"])


def test_weight_ema_for_evaluation_and_export(tmp_path, tiny_world_path):
    """Lightning's EMAWeightAveraging composes with the module: the exported model is the EMA."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from dgpo_lightning.callbacks import ExportTrained
    from dgpo_lightning.world.backbone import load_backbone

    module = DGPOModule(model_path=str(tiny_world_path), lr=1e-2)
    ema = EMAWeightAveraging(decay=0.5)
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[ema, ExportTrained(str(tmp_path / "final"))])
    initial = flat(load_backbone(tiny_world_path).denoiser.parameters())
    trainer.fit(module, make_data())
    averaged = flat(ema._average_model.module.backbone.denoiser.parameters())
    exported = flat(load_backbone(tmp_path / "final").denoiser.parameters())
    assert not torch.equal(averaged, initial)
    torch.testing.assert_close(exported, averaged, rtol=0, atol=0)
