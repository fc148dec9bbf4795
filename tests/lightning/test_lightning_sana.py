"""The SANA path through the Lightning system and the evaluation CLI: a tiny random SanaPipeline saved
to disk, loaded by name like a real SANA directory, LoRA-trained by DGPO for two optimizer steps (CFG
rollouts, gradient checkpointing), exported, then evaluated with ``python -m dgpo_lightning.evaluate``
with and without the trained adapter."""

import pytest

from backbone_checks import check_evaluate_cli, check_trained_lora, train_two_dgpo_steps
from dgpo_lightning.models.sana import SANA_TARGET_MODULES
from dgpo_lightning.models.testing import save_tiny_clip
from dgpo_lightning.models.testing.sana import build_tiny_sana


@pytest.fixture(scope="module")
def sana_run(tmp_path_factory):
    """Two DGPO steps on a tiny SANA from disk; parameters before/after and the exported adapter."""
    return train_two_dgpo_steps(
        tmp_path_factory.mktemp("sana"), "sana", build_tiny_sana(seed=0), {"resolution": 32},
        ["a red cube", "a blue sphere", "a photo of a cat"],
        module_options={"gradient_checkpointing": True}, data_options={"guidance_scale": 4.5},
    )


def test_two_dgpo_steps_on_tiny_sana_with_lora(sana_run):
    trainable = check_trained_lora(sana_run)
    denoiser = sana_run["module"].backbone.denoiser
    assert denoiser.is_gradient_checkpointing
    # the backbone's default targets (the config names none): both attentions' projections, every block
    assert set(denoiser.peft_config["default"].target_modules) == set(SANA_TARGET_MODULES)
    adapted = {n.split(".lora_")[0].split(".", 2)[-1] for n in trainable}
    assert adapted == {f"attn{i}.{m}" for i in (1, 2) for m in SANA_TARGET_MODULES}


def test_evaluate_cli_on_tiny_sana_with_and_without_the_trained_adapter(sana_run, tmp_path, capsys):
    from dgpo_lightning.models.sana import SanaBackbone

    clip = save_tiny_clip(tmp_path / "clip", seed=0, image_size=32)
    check_evaluate_cli(sana_run, tmp_path, capsys, SanaBackbone, "pickscore", {"model_path": str(clip)})


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
