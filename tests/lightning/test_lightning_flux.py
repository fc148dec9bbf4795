"""The FLUX.1 path through the Lightning system and the evaluation CLI: a tiny random FLUX.1-dev
pipeline saved to disk, loaded by name like a real FLUX.1-dev directory, LoRA-trained by DGPO for
two optimizer steps, exported, and evaluated with ``python -m dgpo_lightning.evaluate`` with and
without the trained adapter; and the FLUX experiment config parses through the CLI."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.models.testing import save_tiny_clip
from dgpo_lightning.models.testing.flux import build_tiny_flux
from dgpo_lightning.module import DGPOModule

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "flux_dev_pickscore.yaml"
OPTIONS = {"resolution": 32, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """Two DGPO steps on a tiny FLUX.1-dev from disk, then the training export (as ExportTrained)."""
    from dgpo_lightning.callbacks.export import export_model

    root = tmp_path_factory.mktemp("flux_run")
    build_tiny_flux(seed=0).save_pretrained(root / "flux")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\na photo of a cat\n")
    torch.manual_seed(0)
    module = DGPOModule(backbone="flux", model_path=str(root / "flux"), backbone_options=OPTIONS,
                        finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5)
    data = RolloutDataModule(train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False)
    module.configure_model()
    backbone = module.backbone
    lora = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if not p.requires_grad}
    guidance_seen = []
    backbone.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: guidance_seen.append((kwargs["guidance"].clone(), torch.is_grad_enabled())), with_kwargs=True
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    export_model(module, root / "final")
    return {"module": module, "trainer": trainer, "lora": lora, "base": base, "guidance_seen": guidance_seen,
            "model": root / "flux", "prompts": prompts, "adapter": root / "final" / "adapter",
            "clip": save_tiny_clip(root / "clip", seed=0, image_size=32)}


def test_two_dgpo_steps_on_tiny_flux_dev_with_lora(flux_run):
    module, trainer = flux_run["module"], flux_run["trainer"]
    assert trainer.global_step == 2
    backbone = module.backbone
    assert type(backbone).__name__ == "FluxBackbone" and backbone.cfg_mode == "distilled"
    lora, base = flux_run["lora"], flux_run["base"]
    assert lora and all("lora" in n for n in lora)
    assert any(".ff_context.net.2." in n for n in lora)  # the backbone's FLUX targets, not SD3's
    after = dict(backbone.denoiser.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items() if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in base.items())
    # The distilled guidance 3.5 reached the transformer in rollouts (no grad) and training (grad) alike.
    seen = flux_run["guidance_seen"]
    assert {grad for _, grad in seen} == {False, True}
    assert all(torch.equal(g, torch.full_like(g, 3.5)) for g, _ in seen)
    assert (flux_run["adapter"] / "pytorch_lora_weights.safetensors").is_file()


def _argv(run, out, *extra):
    return ["--backbone", "flux", "--model", str(run["model"]), "--backbone-options", json.dumps(OPTIONS),
            "--prompts", str(run["prompts"]), "--reward", "pickscore",
            "--reward-options", json.dumps({"pickscore": {"model_path": str(run["clip"])}}),
            "--num-steps", "2", "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4",
            "--out", str(out), "--no-progress", *extra]


def _recompute(run, adapter=None):
    """PickScore of images sampled with ``sample_latents`` from the planned seeds, scored directly."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.flux import FluxBackbone
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings

    backbone = FluxBackbone.from_pretrained(run["model"], **OPTIONS)
    if adapter is not None:
        load_adapter(backbone, adapter)
    prompts = [p for p in run["prompts"].read_text().splitlines() for _ in range(2)]
    seeds = member_seeds(7, range(3), 2)
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
    return build("pickscore", model_path=str(run["clip"]))(images, prompts)


def test_evaluate_cli_on_flux_with_and_without_the_trained_adapter(flux_run, tmp_path, capsys):
    from dgpo_lightning.evaluate import main

    main(_argv(flux_run, tmp_path / "base.json"))
    main(_argv(flux_run, tmp_path / "tuned.json", "--adapter", str(flux_run["adapter"])))
    assert "+ adapter" in capsys.readouterr().out
    base, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row["pickscore"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    assert len(scores["base"]) == 6 and len(set(scores["base"])) == 6
    assert base["overall"] == pytest.approx(sum(scores["base"]) / 6)
    assert all(a != b for a, b in zip(scores["base"], scores["tuned"]))  # the adapter changes every image
    torch.testing.assert_close(torch.tensor(scores["base"]), _recompute(flux_run), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(scores["tuned"]), _recompute(flux_run, flux_run["adapter"]), rtol=1e-5, atol=1e-5)


def test_flux_config_parses_with_the_backbones_own_shift(tmp_path):
    from dgpo_lightning.cli import DGPOCLI

    cli = DGPOCLI(args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    hp = cli.model.hparams
    assert hp.backbone == "flux" and hp.backbone_options["guidance"] == 3.5
    assert (hp.lora_rank, hp.lora_alpha, hp.beta, hp.kl_beta) == (64, 128, 10.0, 0.001)
    assert cli.datamodule.hparams.shift is None  # FLUX.1-dev's exp(mu) at 512 px applies
    assert cli.datamodule.hparams.num_steps == 6 and cli.datamodule.hparams.group_size == 24
