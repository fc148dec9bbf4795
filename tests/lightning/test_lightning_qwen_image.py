"""The Qwen-Image path through the Lightning system and the evaluation CLI: a tiny random Qwen-Image
pipeline saved to disk, loaded by name like a real ``Qwen/Qwen-Image`` directory, LoRA-trained by
DGPO for two optimizer steps (rollouts with Qwen-Image's norm-rescaled true CFG), exported, and
scored by ``python -m dgpo_lightning.evaluate`` with and without the adapter; and the experiment
config parses with the values it claims."""

import math
import warnings
from pathlib import Path

import pytest

from backbone_checks import check_evaluate_cli, check_trained_lora, train_two_dgpo_steps
from dgpo_lightning.models.testing.qwen_image import build_tiny_qwen_image

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "qwen_image_pickscore.yaml"
OPTIONS = {"resolution": 32}

pytestmark = pytest.mark.filterwarnings("ignore:Qwen-Image scheduler config has shift_terminal")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two DGPO steps on the tiny pipeline; the weights before and after; the exported adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_two_dgpo_steps(
            tmp_path_factory.mktemp("qwen_image"), "qwen_image", build_tiny_qwen_image(seed=0), OPTIONS,
            ["a red cube", "a blue sphere on a green table"],  # different token counts: padding
            module_options={"timesteps_per_sample": 2},
        )


def test_two_dgpo_steps_on_tiny_qwen_image_with_lora(trained):
    lora = check_trained_lora(trained)
    backbone = trained["module"].backbone
    assert backbone.cfg_mode == "true" and backbone.default_guidance_scale == 4.0 and backbone.negative_prompt == " "
    # The backbone's default targets (Flow-GRPO's Qwen-Image modules) were used.
    layers = {n.split(".lora_")[0].split(".", 2)[-1] for n in lora}
    assert {"attn.to_q", "attn.add_k_proj", "img_mlp.net.2", "txt_mlp.net.0.proj"} <= layers


def test_evaluate_cli_on_tiny_qwen_image_with_and_without_the_adapter(trained, tmp_path, capsys):
    from dgpo_lightning.models.qwen_image import QwenImageBackbone

    base, _ = check_evaluate_cli(trained, tmp_path, capsys, QwenImageBackbone)
    # The backbone's defaults: true CFG 4 and the dynamic shift exp(mu) at 32 px (64 image tokens).
    mu = 0.5 + (64 - 256) * (0.9 - 0.5) / (8192 - 256)
    assert base["run"]["guidance_scale"] == 4.0
    assert base["run"]["shift"] == pytest.approx(math.exp(mu))


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
