"""Every experiment config parses; bad values fail at parse/instantiation naming the key."""

from pathlib import Path

import pytest

from dgpo_lightning.cli import DGPOCLI

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BASE = EXPERIMENTS / "base" / "world_dgpo.yaml"
# Configs only, not the resolved config.yaml files that experiment runs write under experiments/runs/.
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "runs" not in p.relative_to(EXPERIMENTS).parts)


def parse(*args):
    return DGPOCLI(args=[*args, "--trainer.logger=false"], run=False)


def test_there_are_configs():
    assert BASE in CONFIGS and len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_parses(config, tmp_path):
    # Base configs stand alone; ablations compose on top of the DGPO base, left to right.
    args = ["--config", str(config)] if config.parent.name == "base" else ["--config", str(BASE), "--config", str(config)]
    # GPU configs are parsed on the CPU here; the accelerator is the only thing overridden.
    cli = parse(*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.precision=32-true")
    assert cli.model.hparams.algorithm in ("dgpo", "flow_grpo", "diffusion_dpo")
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1


def test_later_configs_override_earlier_ones(tmp_path):
    cli = parse("--config", str(BASE), "--config", str(EXPERIMENTS / "ablations" / "t_min" / "0.6.yaml"))
    assert cli.model.hparams.t_min == 0.6
    assert cli.datamodule.hparams.group_size == 8  # untouched keys keep the base value


@pytest.mark.parametrize(
    "override, key",
    [
        ("--data.group_size=1", "data.group_size"),
        ("--model.t_min=1.0", "model.t_min"),
        ("--model.t_min=-0.1", "model.t_min"),
        ("--data.sampler=heun", "sampler"),
        ("--data.rewards={nonexistent: 1.0}", "data.rewards"),
        ("--data.train_prompts=/no/such/prompts.jsonl", "/no/such/prompts.jsonl"),
        ("--model.beta=-1", "model.beta"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key, capsys):
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as error:
        parse("--config", str(BASE), override)
    message = str(error.value) + capsys.readouterr().err
    assert key in message
