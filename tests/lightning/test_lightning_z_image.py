"""The Z-Image path through the Lightning system and the evaluation CLI: a tiny random Z-Image-Turbo
pipeline saved to disk, loaded by name, LoRA-trained by DGPO for two optimizer steps, exported, and
scored by ``python -m dgpo_lightning.evaluate`` with and without the adapter; and the experiment
config parses with the values it claims."""

from pathlib import Path

import pytest

from backbone_checks import check_evaluate_cli, check_trained_lora, train_two_dgpo_steps
from dgpo_lightning.models.testing.z_image import build_tiny_z_image

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "z_image_turbo_geneval.yaml"
OPTIONS = {"resolution": 32, "turbo": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two DGPO steps on the tiny Turbo pipeline; the weights before and after; the exported adapter."""
    return train_two_dgpo_steps(tmp_path_factory.mktemp("z_image"), "z_image", build_tiny_z_image(seed=0), OPTIONS,
                                ["a red cube", "a blue sphere"], module_options={"timesteps_per_sample": 2},
                                directory_name="z_image_turbo")


def test_two_dgpo_steps_on_tiny_z_image_turbo_with_lora(trained):
    lora = check_trained_lora(trained)
    backbone = trained["module"].backbone
    assert backbone.turbo and backbone.cfg_mode == "none"
    # The backbone's default targets (TDM-R1's) were used: only attention projections carry LoRA.
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} <= {"to_q", "to_k", "to_v", "0"}


def test_evaluate_cli_on_tiny_z_image_with_and_without_the_adapter(trained, tmp_path, capsys):
    from dgpo_lightning.models.z_image import ZImageBackbone

    base, _ = check_evaluate_cli(trained, tmp_path, capsys, ZImageBackbone)
    assert base["run"]["guidance_scale"] == 1.0 and base["run"]["shift"] == 3.0


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
