"""Every experiment config parses; bad values fail at parse/instantiation naming the key."""

from pathlib import Path

import pytest

from dgpo_lightning import objectives
from dgpo_lightning.cli import DGPOCLI

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BASE = EXPERIMENTS / "base" / "world_dgpo.yaml"
# Configs only: not the resolved config.yaml files that experiment runs write under experiments/runs/,
# nor the benchmark protocols (experiments/protocols, read by evaluate --protocol).
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if not {"runs", "protocols"} & set(p.relative_to(EXPERIMENTS).parts))


def parse(*args):
    return DGPOCLI(args=[*args, "--trainer.logger=false"], run=False)


def test_there_are_configs():
    assert BASE in CONFIGS and len(CONFIGS) >= 10


#: Ablation folders whose cells compose after a method's base (which itself composes after BASE).
METHOD_OF_ABLATION = {"dpo": "world_diffusion_dpo.yaml", "flow_grpo": "world_flow_grpo.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_parses(config, tmp_path):
    # Base and paper task configs stand alone; ablations and overlays compose on top of the DGPO base,
    # left to right.
    standalone = config.parent.name == "base" or (config.parent.name == "paper" and config.name != "cfg_free.yaml")
    paper_overlay = config.name == "cfg_free.yaml" or config.parent.name == "models"
    under = EXPERIMENTS / "paper" / "sd35m_ocr.yaml" if paper_overlay else BASE
    args = ["--config", str(config)] if standalone else ["--config", str(under), "--config", str(config)]
    method = METHOD_OF_ABLATION.get(config.parent.name) if config.parent.parent.name == "ablations" else None
    if method:
        args[2:2] = ["--config", str(EXPERIMENTS / "base" / method)]
    # GPU configs are parsed on the CPU here; the accelerator is the only thing overridden.
    cli = parse(*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.precision=32-true")
    assert cli.model.hparams.algorithm in objectives.BUILTIN
    assert cli.trainer.reload_dataloaders_every_n_epochs == 1


@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore"])
def test_paper_cfg_free_overlay_composes_on_each_task(task, tmp_path):
    paper = EXPERIMENTS / "paper"
    cli = parse(
        "--config", str(paper / f"sd35m_{task}.yaml"), "--config", str(paper / "cfg_free.yaml"),
        f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
    )
    assert cli.datamodule.hparams.guidance_scale == 1.0  # rollouts without CFG
    assert cli.model.hparams.reference_guidance_scale == 4.5 and cli.model.hparams.clip_range == 1e-3


@pytest.mark.parametrize("model", sorted((EXPERIMENTS / "paper" / "models").glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("task", ["geneval", "ocr", "pickscore"])
def test_paper_tasks_compose_with_each_backbone(task, model, tmp_path):
    """The paper's three tasks on every backbone: the task's loss values, the model's sampling."""
    import yaml

    paper = EXPERIMENTS / "paper"
    cli = parse(
        "--config", str(paper / f"sd35m_{task}.yaml"), "--config", str(model),
        f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
    )
    recipe, overlay = yaml.safe_load((paper / f"sd35m_{task}.yaml").read_text()), yaml.safe_load(model.read_text())
    assert cli.model.hparams.beta == recipe["model"]["beta"] and cli.model.hparams.t_min == recipe["model"]["t_min"]
    assert cli.model.hparams.backbone == overlay["model"].get("backbone", "sd3")
    assert cli.model.hparams.lora_targets is None  # each backbone's own targets
    assert list(cli.datamodule.hparams.rewards) == [task]
    if "backbone" in overlay["model"]:
        assert cli.datamodule.hparams.shift is None  # the model's own schedule, not SD3's 3


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


# ---------------------------------------------------------------- user errors: short, no traceback


def cli_main(capsys, *args):
    """``(exit code, stderr lines)`` of ``python -m dgpo_lightning ARGS``, run in-process."""
    from dgpo_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    # From the error on: what comes before is Lightning's log and, in-process, its warning about sys.argv.
    start = next((i for i, line in enumerate(lines) if line.startswith(("error:", "Traceback"))), 0)
    return exit_.value.code, lines[start:]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
@pytest.mark.parametrize("abbreviated", ["--model.bet=55", "--data.group=3", "--trainer.max_st=3", "--seed_every=1", "--resu=fresh"])
def test_abbreviated_keys_are_refused(subcommand, abbreviated, capsys):
    code, err = cli_main(capsys, subcommand, "--config", str(BASE), abbreviated)
    assert code == 2
    assert f"unrecognized arguments: {abbreviated}" in "\n".join(err)
    assert len(err) <= 3 and not any("usage:" in line for line in err)


def test_abbreviated_top_level_options_are_refused():
    # argparse's own prefix matching, one level up: --conf must not mean --config.
    with pytest.raises(SystemExit):
        DGPOCLI(args=["--conf", str(BASE), "fit"], run=True)


def test_the_cli_optimizer_option_is_off_with_a_hint(capsys):
    code, err = cli_main(capsys, "fit", "--config", str(BASE), "--optimizer", "torch.optim.SGD")
    assert code == 2
    assert "--optimizer" in err[0] and "model.optimizer" in "\n".join(err)


@pytest.mark.parametrize(
    "override, named",
    [
        ("--model.betx=1", "--model.betx"),  # unknown key
        ("--data.sampler=heun", "data.sampler"),  # bad choice
        ("--data.group_size=many", "data.group_size"),  # wrong type
        ("--data.rewards={geneval_partial:1}", "data.rewards"),  # YAML typo: a string, not a mapping
        ("--model.beta=-1", "model.beta"),  # our constructors' validation
        ("--data.train_prompts=/no/such/prompts.jsonl", "/no/such/prompts.jsonl"),  # missing file
        ("--trainer.logger.init_args.version", "trainer.logger"),  # no value
    ],
)
def test_user_errors_print_a_short_message_naming_the_key(override, named, capsys):
    code, err = cli_main(capsys, "fit", "--config", str(BASE), "--trainer.logger=false", override)
    assert code == 2
    text = "\n".join(err)
    assert named in text and "Traceback" not in text
    assert len(err) <= 5, text
    assert err[-1].startswith("hint:")


def test_debug_shows_the_traceback(monkeypatch):
    from dgpo_lightning.cli import main

    monkeypatch.setenv("DGPO_DEBUG", "1")
    with pytest.raises(ValueError, match="model.beta"):
        main(["fit", "--config", str(BASE), "--trainer.logger=false", "--model.beta=-1"])


def test_bugs_keep_their_traceback(monkeypatch):
    from dgpo_lightning import cli

    def broken(self):
        raise ValueError("a bug after instantiation")

    monkeypatch.setattr(cli.DGPOCLI, "before_fit", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["fit", "--config", str(BASE), "--trainer.logger=false", "--trainer.max_steps=0", "--data.eval_prompts=null"])


@pytest.mark.parametrize("content", ["{oops", "[1, 2]", "\xff\xfe"])
def test_a_corrupt_backbone_json_is_named(content, tiny_world_path, tmp_path, capsys):
    import shutil

    from dgpo_lightning.errors import ConfigError
    from dgpo_lightning.world.backbone import load_backbone

    world = tmp_path / "world"
    shutil.copytree(tiny_world_path, world)
    (world / "backbone.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=str(world / "backbone.json")):
        load_backbone(world)
    code, err = cli_main(
        capsys, "fit", "--config", str(BASE), f"--model.model_path={world}", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--data.eval_prompts=null", "--trainer.enable_progress_bar=false", "--data.progress=false",
    )
    text = "\n".join(err)
    assert code == 2 and str(world / "backbone.json") in text and "Traceback" not in text


@pytest.mark.parametrize(
    "content, expected",
    [("model:\n  beta: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "got a list"), ("just text\n", "got a str")],
)
def test_a_bad_config_file_is_named(content, expected, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    code, err = cli_main(capsys, "fit", "--config", str(BASE), "--config", str(config))
    assert code == 2 and str(config) in err[0] and expected in err[0] and len(err) == 2


@pytest.mark.parametrize("override", ["--trainer.logger.class_path=foo.NoLogger", "--trainer.callbacks+=foo.NoCallback", "--trainer.precision=7"])
def test_union_type_errors_are_condensed(override, capsys):
    code, err = cli_main(capsys, "fit", "--config", str(BASE), override)
    text = "\n".join(err)
    assert code == 2 and len(err) <= 5 and "NoneType" not in text, text
    assert override.split("=")[0].lstrip("-").removesuffix("+").split(".class_path")[0] in err[0]
