"""The SANA path through the Lightning system and the evaluation CLI: a tiny random SanaPipeline saved
to disk, loaded by name like a real SANA directory, LoRA-trained by DGPO for two optimizer steps (CFG
rollouts, gradient checkpointing), exported, then evaluated with ``python -m dgpo_lightning.evaluate``
with and without the trained adapter."""

import json

import lightning as L
import pytest
import torch

from dgpo_lightning.callbacks.export import export_model
from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.models.sana import SANA_TARGET_MODULES
from dgpo_lightning.models.testing import save_tiny_clip
from dgpo_lightning.models.testing.sana import build_tiny_sana
from dgpo_lightning.module import DGPOModule


@pytest.fixture(scope="module")
def sana_run(tmp_path_factory):
    """Two DGPO steps on a tiny SANA from disk; parameters before/after and the exported adapter."""
    root = tmp_path_factory.mktemp("sana")
    build_tiny_sana(seed=0).save_pretrained(root / "sana")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\na photo of a cat\n")
    torch.manual_seed(0)
    module = DGPOModule(
        backbone="sana", model_path=str(root / "sana"), backbone_options={"resolution": 32},
        finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5, gradient_checkpointing=True,
    )
    data = RolloutDataModule(
        train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2, guidance_scale=4.5,
        rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False,
    )
    module.configure_model()
    denoiser = module.backbone.denoiser
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    export_model(module, root / "final")
    return {"module": module, "trainer": trainer, "before": before, "trainable": trainable, "root": root,
            "model": root / "sana", "prompts": prompts, "adapter": root / "final" / "adapter"}


def test_two_dgpo_steps_on_tiny_sana_with_lora(sana_run):
    module, before, trainable = sana_run["module"], sana_run["before"], sana_run["trainable"]
    denoiser = module.backbone.denoiser
    assert sana_run["trainer"].global_step == 2
    assert trainable and all("lora_" in n for n in trainable)
    # the backbone's default targets (the config names none): both attentions' projections, every block
    assert set(denoiser.peft_config["default"].target_modules) == set(SANA_TARGET_MODULES)
    adapted = {n.split(".lora_")[0].split(".", 2)[-1] for n in trainable}
    assert adapted == {f"attn{i}.{m}" for i in (1, 2) for m in SANA_TARGET_MODULES}
    after = dict(denoiser.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in trainable if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in before.items() if n not in trainable)  # base untouched
    assert (sana_run["adapter"] / "pytorch_lora_weights.safetensors").is_file()


def _recompute(run, clip, adapter=None):
    """PickScore of images sampled with ``sample_latents`` from the planned seeds, scored directly."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.models.sana import SanaBackbone
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings

    backbone = SanaBackbone.from_pretrained(run["model"], resolution=32)
    if adapter is not None:
        load_adapter(backbone, adapter)
    prompts = [p for p in run["prompts"].read_text().splitlines() for _ in range(2)]
    latents = sample_latents(backbone, prompts, member_seeds(7, range(3), 2), SamplerSettings(num_steps=2)).sample
    images = backbone.decode(latents)
    return build("pickscore", model_path=str(clip))(images, prompts)


def test_evaluate_cli_on_tiny_sana_with_and_without_the_trained_adapter(sana_run, tmp_path, capsys):
    from dgpo_lightning.evaluate import main

    clip = save_tiny_clip(tmp_path / "clip", seed=0, image_size=32)
    argv = ["--backbone", "sana", "--model", str(sana_run["model"]), "--backbone-options", '{"resolution": 32}',
            "--prompts", str(sana_run["prompts"]), "--reward", "pickscore",
            "--reward-options", json.dumps({"pickscore": {"model_path": str(clip)}}),
            "--num-steps", "2", "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4", "--no-progress"]
    main([*argv, "--out", str(tmp_path / "base.json")])
    main([*argv, "--out", str(tmp_path / "tuned.json"), "--adapter", str(sana_run["adapter"])])
    assert "+ adapter" in capsys.readouterr().out
    base, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row["pickscore"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    assert len(scores["base"]) == 6 and len(set(scores["base"])) == 6
    assert base["overall"] == pytest.approx(sum(scores["base"]) / 6)
    assert all(a != b for a, b in zip(scores["base"], scores["tuned"]))  # the adapter changes every image
    torch.testing.assert_close(torch.tensor(scores["base"]), _recompute(sana_run, clip), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(scores["tuned"]), _recompute(sana_run, clip, sana_run["adapter"]), rtol=1e-5, atol=1e-5
    )


def test_sana_pickscore_config_parses_with_the_sana_backbone(tmp_path):
    from pathlib import Path

    from dgpo_lightning.cli import DGPOCLI

    config = Path(__file__).resolve().parents[2] / "experiments" / "base" / "sana_pickscore.yaml"
    cli = DGPOCLI(args=["--config", str(config), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                        "--trainer.accelerator=cpu", "--trainer.precision=32-true"], run=False)
    hp, data = cli.model.hparams, cli.datamodule.hparams
    assert hp.backbone == "sana" and hp.finetune == "lora" and (hp.lora_rank, hp.lora_alpha) == (64, 128)
    assert hp.backbone_options["resolution"] == 1024 and hp.backbone_options["max_sequence_length"] == 300
    assert (hp.beta, hp.kl_beta, hp.clip_range, hp.t_min) == (10.0, 0.001, 0.05, 0.666)
    assert data.shift is None and data.guidance_scale == 4.5 and (data.num_steps, data.group_size) == (10, 24)
