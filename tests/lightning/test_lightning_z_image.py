"""The Z-Image path through the Lightning system and the evaluation CLI: a tiny random Z-Image-Turbo
pipeline saved to disk, loaded by name, LoRA-trained by DGPO for two optimizer steps, exported, and
scored by ``python -m dgpo_lightning.evaluate`` with and without the adapter; and the experiment
config parses with the values it claims."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.evaluate import main
from dgpo_lightning.models.testing.z_image import build_tiny_z_image
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.sampling.settings import SamplerSettings

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "z_image_turbo_geneval.yaml"
OPTIONS = {"resolution": 32, "turbo": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two DGPO steps on the tiny Turbo pipeline; the LoRA and base weights before and after; the
    exported adapter."""
    from dgpo_lightning.callbacks.export import export_model

    root = tmp_path_factory.mktemp("z_image")
    build_tiny_z_image(seed=0).save_pretrained(root / "z_image_turbo")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    torch.manual_seed(0)
    module = DGPOModule(backbone="z_image", model_path=str(root / "z_image_turbo"), backbone_options=OPTIONS,
                        finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5, timesteps_per_sample=2)
    data = RolloutDataModule(train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False)
    module.configure_model()
    denoiser = module.backbone.denoiser
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if not p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    export_model(module, root / "final")
    return {"root": root, "model": root / "z_image_turbo", "prompts": prompts, "module": module, "trainer": trainer,
            "lora": lora, "base": base, "adapter": root / "final" / "adapter"}


def test_two_dgpo_steps_on_tiny_z_image_turbo_with_lora(trained):
    module, trainer = trained["module"], trained["trainer"]
    assert trainer.global_step == 2
    backbone = module.backbone
    assert backbone.turbo and backbone.cfg_mode == "none"
    lora = trained["lora"]
    assert lora and all("lora" in n for n in lora)
    # The backbone's default targets (TDM-R1's) were used: only attention projections carry LoRA.
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} <= {"to_q", "to_k", "to_v", "0"}
    after = dict(backbone.denoiser.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items() if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in trained["base"].items())
    assert (trained["adapter"] / "pytorch_lora_weights.safetensors").is_file()


def _argv(run, out, *extra):
    return ["--backbone", "z_image", "--model", str(run["model"]), "--backbone-options", json.dumps(OPTIONS),
            "--prompts", str(run["prompts"]), "--reward", "jpeg_incompressibility", "--num-steps", "2",
            "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4", "--out", str(out), "--no-progress", *extra]


def _recompute(run, adapter=None):
    """The reward of images sampled directly with ``sample_latents`` from the planned seeds."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.models.z_image import ZImageBackbone
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds

    backbone = ZImageBackbone.from_pretrained(run["model"], **OPTIONS)
    if adapter is not None:
        load_adapter(backbone, adapter)
    prompts = [p for p in run["prompts"].read_text().splitlines() for _ in range(2)]
    seeds = member_seeds(7, range(2), 2)
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
    return build("jpeg_incompressibility")(images, prompts)


def test_evaluate_cli_on_tiny_z_image_with_and_without_the_adapter(trained, tmp_path, capsys):
    main(_argv(trained, tmp_path / "base.json"))
    main(_argv(trained, tmp_path / "tuned.json", "--adapter", str(trained["adapter"])))
    assert "+ adapter" in capsys.readouterr().out
    base, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row["jpeg_incompressibility"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    assert len(scores["base"]) == 4 and base["run"]["guidance_scale"] == 1.0 and base["run"]["shift"] == 3.0
    assert base["overall"] == pytest.approx(sum(scores["base"]) / 4)
    assert scores["base"] != scores["tuned"]
    torch.testing.assert_close(torch.tensor(scores["base"]), _recompute(trained).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(scores["tuned"]), _recompute(trained, trained["adapter"]).float(),
                               rtol=1e-5, atol=1e-5)


def test_z_image_turbo_geneval_config_parses(tmp_path):
    from dgpo_lightning.cli import DGPOCLI

    cli = DGPOCLI(args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    hp, data = cli.model.hparams, cli.datamodule.hparams
    assert hp.backbone == "z_image" and hp.backbone_options["turbo"] is True
    assert (hp.lora_rank, hp.lora_alpha) == (32, 64)  # TDM-R1's LoRA on Z-Image-Turbo
    assert (hp.beta, hp.kl_beta) == (100.0, 0.02)  # DGPO's GenEval recipe
    assert data.num_steps == 4 and data.shift is None and data.guidance_scale is None  # backbone defaults
    assert "geneval" in str(data.rewards)
