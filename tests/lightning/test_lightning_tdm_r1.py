"""TDM-R1 through Trainer + RolloutDataModule on the tiny world (4 Euler steps, trajectories kept):
two optimizer steps move the generator and its auxiliary models and keep global_step = generator
steps; the checkpoint holds the three optimizers and the trained/EMA auxiliary weights only; a resumed
run continues bit-identically."""

from __future__ import annotations

import lightning as L
import torch

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.module import DGPOModule


def flat(tensors):
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def make_module(path):
    return DGPOModule(model_path=str(path), algorithm="tdm_r1", finetune="lora", lora_rank=4, lr=1e-3,
                      algorithm_options={"aux_finetune": "full"})


def make_data():
    return RolloutDataModule(group_size=4, prompts_per_rank=2, groups_per_batch=2, sampler="ode_euler", num_steps=4, shift=3.0,
                             guidance_scale=1.0, advantage_std="global", rewards={"test_brightness": 1.0}, eval_prompts=None,
                             progress=False)


def make_trainer(directory, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory)
    return L.Trainer(**{**defaults, **kwargs})


def weights(module):
    return {
        "online": flat(module.trainable_parameters()),
        "fake": flat(module.auxiliary["fake"].parameters()),
        "surrogate": flat(module.auxiliary["surrogate"].parameters()),
        "old_surrogate": flat(module.auxiliary["old_surrogate"].averaged),
    }


def test_two_steps_train_all_three_models_and_checkpoint_them(tmp_path, tiny_world_path):
    module = make_module(tiny_world_path)
    module.configure_model()
    before = weights(module)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_epochs=1,
                                                     save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, make_data())
    assert trainer.global_step == 2  # the auxiliary optimizers' steps are not counted
    after = weights(module)
    for name in before:
        assert torch.isfinite(after[name]).all() and not torch.equal(before[name], after[name]), name
    assert len(trainer.optimizers) == 3
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(saved["optimizer_states"]) == 3
    keys = saved["state_dict"].keys()
    frozen = {f"backbone.{n}" for n, p in module.backbone.named_parameters() if not p.requires_grad}
    assert not frozen & set(keys)
    assert {f"auxiliary.fake.{n}" for n, _ in module.auxiliary["fake"].named_parameters()} <= set(keys)
    assert any(k.startswith("auxiliary.old_surrogate.") for k in keys)


def test_resume_continues_bit_identically(tmp_path, tiny_world_path):
    """2 epochs straight == 1 epoch, checkpoint, resume to 2: every model and every optimizer state."""

    def run(directory, epochs, ckpt_path=None):
        torch.manual_seed(0)  # the LoRA initialisation draws from the global generator (as seed_everything does in the CLI)
        module = make_module(tiny_world_path)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_epochs=1,
                                                         save_on_train_epoch_end=True)
        trainer = make_trainer(directory, max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoint])
        trainer.fit(module, make_data(), ckpt_path=ckpt_path)
        return module, trainer

    straight, straight_trainer = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, trainer = run(tmp_path / "b", 2, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert trainer.global_step == straight_trainer.global_step == 2
    a, b = weights(straight), weights(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for opt_a, opt_b in zip(straight_trainer.optimizers, trainer.optimizers):
        state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert state_a.keys() == state_b.keys() and state_a
        for key in state_a:
            for field in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state_a[key][field], state_b[key][field])


# --------------------------------------------------------------------------- configs

from pathlib import Path  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def parse(*args):
    from dgpo_lightning.cli import DGPOCLI

    return DGPOCLI(args=[*args, "--trainer.logger=false"], run=False)


def test_world_config_composes_after_dgpo_and_trains_a_step(tmp_path):
    """world_dgpo.yaml + world_tdmr1.yaml: the shipped student and teacher by name, the official values
    arrive, the teacher loads from its path, one update runs."""
    cli = parse(
        "--config", str(EXPERIMENTS / "base" / "world_dgpo.yaml"), "--config", str(EXPERIMENTS / "base" / "world_tdmr1.yaml"),
        f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
        "--data.group_size=2", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.eval_prompts=null",
        "--data.progress=false", "--trainer.enable_progress_bar=false",
    )
    hp, data, objective = cli.model.hparams, cli.datamodule.hparams, cli.model.objective
    assert hp.algorithm == "tdm_r1" and objective.surrogate_guidance == 2.5 and objective.t_min_generator == 0.25
    assert hp.model_path == "world:student4" and objective.teacher_path == "world:base" and objective.aux_finetune == "lora"
    assert (data.sampler, data.num_steps, data.shift, data.guidance_scale) == ("ode_euler", 4, 3.0, 1.0)
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
    assert len(ema) == 1
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    optimizers = cli.trainer.optimizers
    assert len(optimizers) == 3 and optimizers[0].defaults["betas"] == (0.0, 0.999)
    assert [o.param_groups[0]["lr"] for o in optimizers] == [7.5e-5, 3e-4, 3e-4]
    assert "teacher" in cli.model.auxiliary


def test_z_image_config_has_the_public_recipe(tmp_path):
    cli = parse("--config", str(EXPERIMENTS / "base" / "zimage_tdmr1_geneval.yaml"), f"--trainer.default_root_dir={tmp_path}",
                "--trainer.accelerator=cpu", "--trainer.precision=32-true")
    hp, data, objective = cli.model.hparams, cli.datamodule.hparams, cli.model.objective
    assert hp.backbone == "z_image" and hp.backbone_options["turbo"] and hp.lora_rank == 32 and hp.lora_alpha == 64
    assert (data.group_size, data.sampler, data.num_steps, data.guidance_scale) == (24, "ode_euler", 4, 1.0)
    assert objective.aux_finetune == "lora" and objective.aux_lora_rank == 32 and objective.teacher_path is None
    assert objective.surrogate_guidance == 2.5 and objective.trained_steps == 2 and list(data.rewards) == ["geneval"]
