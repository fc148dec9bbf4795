"""The FLUX.1 path through the Lightning system and the evaluation CLI: a tiny random FLUX.1-dev
pipeline saved to disk, loaded by name like a real FLUX.1-dev directory, LoRA-trained by DGPO for
two optimizer steps, exported, and evaluated with ``python -m dgpo_lightning.evaluate`` with and
without the trained adapter; and the FLUX experiment config parses through the CLI."""

from pathlib import Path

import pytest
import torch

from backbone_checks import check_evaluate_cli, check_trained_lora, train_two_dgpo_steps
from dgpo_lightning.models.testing import save_tiny_clip
from dgpo_lightning.models.testing.flux import build_tiny_flux

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "base" / "flux_dev_pickscore.yaml"
OPTIONS = {"resolution": 32, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """Two DGPO steps on a tiny FLUX.1-dev from disk, then the training export (as ExportTrained);
    the guidance values the transformer saw."""
    guidance_seen = []

    def record_guidance(module):
        module.backbone.denoiser.register_forward_pre_hook(
            lambda m, args, kwargs: guidance_seen.append((kwargs["guidance"].clone(), torch.is_grad_enabled())),
            with_kwargs=True,
        )

    root = tmp_path_factory.mktemp("flux_run")
    run = train_two_dgpo_steps(root, "flux", build_tiny_flux(seed=0), OPTIONS,
                               ["a red cube", "a blue sphere", "a photo of a cat"], before_fit=record_guidance)
    return {**run, "guidance_seen": guidance_seen, "clip": save_tiny_clip(root / "clip", seed=0, image_size=32)}


def test_two_dgpo_steps_on_tiny_flux_dev_with_lora(flux_run):
    lora = check_trained_lora(flux_run)
    backbone = flux_run["module"].backbone
    assert type(backbone).__name__ == "FluxBackbone" and backbone.cfg_mode == "distilled"
    assert any(".ff_context.net.2." in n for n in lora)  # the backbone's FLUX targets, not SD3's
    # The distilled guidance 3.5 reached the transformer in rollouts (no grad) and training (grad) alike.
    seen = flux_run["guidance_seen"]
    assert {grad for _, grad in seen} == {False, True}
    assert all(torch.equal(g, torch.full_like(g, 3.5)) for g, _ in seen)


def test_evaluate_cli_on_flux_with_and_without_the_trained_adapter(flux_run, tmp_path, capsys):
    from dgpo_lightning.models.flux import FluxBackbone

    check_evaluate_cli(flux_run, tmp_path, capsys, FluxBackbone, "pickscore", {"model_path": str(flux_run["clip"])})


def test_flux_config_parses_with_the_backbones_own_shift(tmp_path):
    from dgpo_lightning.cli import DGPOCLI

    cli = DGPOCLI(args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                        "--trainer.precision=32-true", "--trainer.logger=false"], run=False)
    hp = cli.model.hparams
    assert hp.backbone == "flux" and hp.backbone_options["guidance"] == 3.5
    assert (hp.lora_rank, hp.lora_alpha, hp.beta, hp.kl_beta) == (64, 128, 10.0, 0.001)
    assert cli.datamodule.hparams.shift is None  # FLUX.1-dev's exp(mu) at 512 px applies
    assert cli.datamodule.hparams.num_steps == 6 and cli.datamodule.hparams.group_size == 24
