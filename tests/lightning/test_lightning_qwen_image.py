"""The Qwen-Image path through the Lightning system and the evaluation CLI: a tiny random Qwen-Image
pipeline saved to disk, loaded by name like a real ``Qwen/Qwen-Image`` directory, LoRA-trained by
DGPO for two optimizer steps (rollouts with Qwen-Image's norm-rescaled true CFG), exported, and
scored by ``python -m dgpo_lightning.evaluate`` with and without the adapter; and the experiment
config parses with the values it claims."""

import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.evaluate import main
from dgpo_lightning.models.testing.qwen_image import build_tiny_qwen_image
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.sampling.settings import SamplerSettings

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "qwen_image_pickscore.yaml"
OPTIONS = {"resolution": 32}

pytestmark = pytest.mark.filterwarnings("ignore:Qwen-Image scheduler config has shift_terminal")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two DGPO steps on the tiny pipeline; the LoRA and base weights before and after; the exported adapter."""
    from dgpo_lightning.callbacks.export import export_model

    root = tmp_path_factory.mktemp("qwen_image")
    build_tiny_qwen_image(seed=0).save_pretrained(root / "qwen_image")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere on a green table\n")  # different token counts: padding
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = DGPOModule(backbone="qwen_image", model_path=str(root / "qwen_image"), backbone_options=OPTIONS,
                            finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5, timesteps_per_sample=2)
        module.configure_model()
    data = RolloutDataModule(train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False)
    denoiser = module.backbone.denoiser
    lora = {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if not p.requires_grad}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    export_model(module, root / "final")
    return {"root": root, "model": root / "qwen_image", "prompts": prompts, "module": module, "trainer": trainer,
            "lora": lora, "base": base, "adapter": root / "final" / "adapter"}


def test_two_dgpo_steps_on_tiny_qwen_image_with_lora(trained):
    module, trainer = trained["module"], trained["trainer"]
    assert trainer.global_step == 2
    backbone = module.backbone
    assert backbone.cfg_mode == "true" and backbone.default_guidance_scale == 4.0 and backbone.negative_prompt == " "
    lora = trained["lora"]
    assert lora and all("lora" in n for n in lora)
    # The backbone's default targets (Flow-GRPO's Qwen-Image modules) were used.
    layers = {n.split(".lora_")[0].split(".", 2)[-1] for n in lora}
    assert {"attn.to_q", "attn.add_k_proj", "img_mlp.net.2", "txt_mlp.net.0.proj"} <= layers
    after = dict(backbone.denoiser.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in lora.items() if "lora_B" in n)
    assert all(torch.equal(after[n], p) for n, p in trained["base"].items())  # the reference (adapter off) is untouched
    assert (trained["adapter"] / "pytorch_lora_weights.safetensors").is_file()


def _argv(run, out, *extra):
    return ["--backbone", "qwen_image", "--model", str(run["model"]), "--backbone-options", json.dumps(OPTIONS),
            "--prompts", str(run["prompts"]), "--reward", "jpeg_incompressibility", "--num-steps", "2",
            "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4", "--out", str(out), "--no-progress", *extra]


def _recompute(run, adapter=None):
    """The reward of images sampled directly with ``sample_latents`` from the planned seeds."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.models.qwen_image import QwenImageBackbone
    from dgpo_lightning.rewards.base import build
    from dgpo_lightning.sampling.seeds import member_seeds

    backbone = QwenImageBackbone.from_pretrained(run["model"], **OPTIONS)
    if adapter is not None:
        load_adapter(backbone, adapter)
    prompts = [p for p in run["prompts"].read_text().splitlines() for _ in range(2)]
    seeds = member_seeds(7, range(2), 2)
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
    return build("jpeg_incompressibility")(images, prompts)


def test_evaluate_cli_on_tiny_qwen_image_with_and_without_the_adapter(trained, tmp_path, capsys):
    main(_argv(trained, tmp_path / "base.json"))
    main(_argv(trained, tmp_path / "tuned.json", "--adapter", str(trained["adapter"])))
    assert "+ adapter" in capsys.readouterr().out
    base, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "tuned"))
    scores = {name: [row["jpeg_incompressibility"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    # The backbone's defaults: true CFG 4 and the dynamic shift exp(mu) at 32 px (64 image tokens).
    mu = 0.5 + (64 - 256) * (0.9 - 0.5) / (8192 - 256)
    assert len(scores["base"]) == 4 and base["run"]["guidance_scale"] == 4.0
    assert base["run"]["shift"] == pytest.approx(math.exp(mu))
    assert base["overall"] == pytest.approx(sum(scores["base"]) / 4)
    assert scores["base"] != scores["tuned"]
    torch.testing.assert_close(torch.tensor(scores["base"]), _recompute(trained).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(scores["tuned"]), _recompute(trained, trained["adapter"]).float(),
                               rtol=1e-5, atol=1e-5)


def test_qwen_image_pickscore_config_parses(tmp_path):
    from dgpo_lightning.cli import DGPOCLI

    cli = DGPOCLI(args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    hp, data = cli.model.hparams, cli.datamodule.hparams
    assert hp.backbone == "qwen_image" and hp.backbone_options["resolution"] == 512
    assert hp.backbone_options["negative_prompt"] == " "
    assert (hp.lora_rank, hp.lora_alpha) == (64, 128)  # Flow-GRPO's Qwen-Image LoRA
    assert (hp.beta, hp.kl_beta, hp.clip_range) == (10.0, 0.001, 0.05)  # DGPO's PickScore preset
    assert data.num_steps == 10 and data.eval_num_steps == 50 and data.guidance_scale == 4.0  # Flow-GRPO
    assert data.shift is None  # the backbone's exp(mu) at 512 px applies
    assert "pickscore" in str(data.rewards)
