"""Runs you can trust: one run directory, resume only a matching run, no silent success, which weights
validate evaluates. In-process ``dgpo_lightning.cli.main`` fits of a tiny world, 2 optimizer steps each."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dgpo_lightning.cli import DGPOCLI, config_differences, main

BASE = Path(__file__).resolve().parents[2] / "experiments" / "base" / "world_dgpo.yaml"


def tiny(world, root, *extra):
    return [
        "fit", "--config", str(BASE), f"--model.model_path={world}",
        "--data.group_size=2", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2",
        "--data.rewards={sharpness: 1.0}", "--data.eval_prompts=null", "--data.progress=false",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", *extra,
    ]


@pytest.fixture
def run(capfd, caplog):
    """``run(args)``: ``(exit code, stdout + stderr + Lightning's log)`` of one in-process CLI call."""

    def call(args):
        caplog.clear()
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capfd.readouterr()
        return code, out + err + caplog.text

    return call


def saved(root):
    return yaml.safe_load((Path(root) / "config.yaml").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_world_path):
    """One finished 2-step run (beta 100), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("trained") / "run"
    main(tiny(tiny_world_path, root))
    return root


@pytest.fixture
def run_copy(trained, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    return root


def test_the_run_directory_holds_everything_and_nothing_lands_in_the_working_directory(trained, tmp_path, tiny_world_path, run, monkeypatch):
    assert (trained / "config.yaml").is_file()
    assert (trained / "tb" / "checkpoints" / "last.ckpt").is_file()
    assert (trained / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    assert saved(trained)["trainer"]["logger"]["init_args"]["save_dir"] == str(trained)

    # A second fit with another root and other hyper-parameters, from a working directory where the
    # YAML's logger save_dir (runs/world_dgpo) would resolve: it leaves the first run alone.
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    code, output = run(tiny(tiny_world_path, other, "--model.beta=50"))
    assert code == 0, output
    assert "Restor" not in output  # started, not resumed
    assert saved(other)["model"]["beta"] == 50.0 and saved(trained)["model"]["beta"] == 100.0
    assert (other / "final").is_dir() and (other / "tb" / "checkpoints" / "last.ckpt").is_file()
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_fit_with_other_hyperparameters_refuses_before_loading_a_model(run_copy, tiny_world_path, run, monkeypatch):
    config = (run_copy / "config.yaml").read_text()

    def no_models(self):
        raise AssertionError("models were built")

    monkeypatch.setattr(DGPOCLI, "instantiate_classes", no_models)
    code, output = run(tiny(tiny_world_path, run_copy, "--model.beta=55", "--data.group_size=3"))
    assert code == 2
    assert "model.beta: 100.0 → 55.0" in output and "data.group_size: 2 → 3" in output
    assert "--resume force" in output and "--resume fresh" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 8, output
    assert (run_copy / "config.yaml").read_text() == config  # not rewritten
    assert not list(run_copy.parent.glob("run.old-*"))


def test_budget_and_progress_changes_resume(run_copy, tiny_world_path, run):
    code, output = run(tiny(tiny_world_path, run_copy, "--trainer.max_steps=4", "--data.progress=true"))
    assert code == 0, output
    assert "resuming the run" in output and "trainer.max_steps 2 → 4" in output
    assert "Restored all states" in output
    assert saved(run_copy)["trainer"]["max_steps"] == 4
    assert "epoch=1-step=4.ckpt" in {p.name for p in run_copy.glob("tb/checkpoints/*.ckpt")}


def test_resume_force_continues_despite_differences_and_keeps_the_old_config(run_copy, tiny_world_path, run):
    code, output = run(tiny(tiny_world_path, run_copy, "--model.beta=55", "--trainer.max_steps=4", "--resume=force"))
    assert code == 0, output
    assert "Restored all states" in output
    assert saved(run_copy)["model"]["beta"] == 55.0
    (old,) = run_copy.glob("config.old-*.yaml")
    assert yaml.safe_load(old.read_text())["model"]["beta"] == 100.0


def test_resume_fresh_moves_the_old_run_aside_and_starts_over(run_copy, tiny_world_path, run):
    code, output = run(tiny(tiny_world_path, run_copy, "--model.beta=55", "--resume=fresh"))
    assert code == 0, output
    assert "Restor" not in output
    (aside,) = run_copy.parent.glob("run.old-*")
    assert saved(aside)["model"]["beta"] == 100.0 and (aside / "final").is_dir()
    assert saved(run_copy)["model"]["beta"] == 55.0
    assert {p.name for p in run_copy.glob("tb/checkpoints/*.ckpt")} == {"last.ckpt", "epoch=0-step=2.ckpt"}


def test_differences_name_dotted_keys_and_callbacks_by_class():
    old = {"model": {"beta": 1.0}, "trainer": {"callbacks": [{"class_path": "a.B", "init_args": {"x": 1}}, {"class_path": "a.C"}]}}
    new = {"model": {"beta": 2.0}, "trainer": {"callbacks": [{"class_path": "a.C"}, {"class_path": "a.B", "init_args": {"x": 2}}]}}
    assert config_differences(old, new) == {"model.beta": (1.0, 2.0), "trainer.callbacks[B].init_args.x": (1, 2)}
    assert config_differences(old, old) == {}


@pytest.fixture
def eval_prompts(tmp_path):
    path = tmp_path / "two.jsonl"
    records = [
        {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
        {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a photo of a red square"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_validate_in_a_run_directory_evaluates_its_last_checkpoint_and_says_so(run_copy, tiny_world_path, eval_prompts, run):
    history = run_copy / "eval_history.csv"
    history.write_text("epoch,step\n0,2\n")  # what fit wrote: validate must not overwrite it
    args = ["validate", *tiny(tiny_world_path, run_copy)[1:], f"--data.eval_prompts={eval_prompts}", "--data.eval_images_per_prompt=1"]
    code, output = run(args)
    assert code == 0, output
    assert f"validate: evaluating {run_copy / 'tb' / 'checkpoints' / 'last.ckpt'} (step 2)" in output
    assert "Loaded model weights" in output
    assert history.read_text() == "epoch,step\n0,2\n"
    assert next(csv.DictReader((run_copy / "eval_validate.csv").open()))["step"] == "0.0"

    code, output = run([*args, "--ckpt_path=base"])
    assert code == 0, output
    assert "validate: evaluating the base model" in output and "Loaded model weights" not in output


def test_validate_without_a_checkpoint_says_it_evaluates_the_base(tmp_path, tiny_world_path, eval_prompts, run):
    args = ["validate", *tiny(tiny_world_path, tmp_path / "new")[1:], f"--data.eval_prompts={eval_prompts}", "--data.eval_images_per_prompt=1"]
    code, output = run(args)
    assert code == 0, output
    assert f"the base model ({tiny_world_path}): no checkpoint in {tmp_path / 'new'}" in output
    code, output = run([*args, "--ckpt_path=/no/such.ckpt"])
    assert code == 2 and "ckpt_path=/no/such.ckpt" in output and "Traceback" not in output


def test_resume_is_for_fit_only(tmp_path, tiny_world_path, run):
    code, output = run(["validate", *tiny(tiny_world_path, tmp_path)[1:], "--resume=fresh"])
    assert code == 2 and "--resume=fresh applies to fit only" in output


def test_a_fit_without_training_batches_fails_and_exports_nothing(tmp_path, tiny_world_path, run):
    # The random tiny world draws no object, so geneval_partial gives every image the same reward:
    # every group has zero advantage and no training batch is formed.
    root = tmp_path / "run"
    code, output = run(tiny(tiny_world_path, root, "--data.rewards={geneval_partial: 1.0}"))
    assert code != 0
    assert not (root / "final").exists()
    assert "trained model written" not in output
    assert "Traceback" not in output
