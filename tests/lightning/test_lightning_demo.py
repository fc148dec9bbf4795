"""The demo's flow end to end on a tiny random world: evaluate, train within a time budget,
evaluate, export, plot; its "before" and "after" scores equal the standalone evaluation's, on a
reward with spread (a random world's GenEval score is 0 everywhere, which would compare nothing)."""

import csv
import json

import pytest

from dgpo_lightning import demo
from dgpo_lightning.data.prompts import load_prompt_records
from dgpo_lightning.evaluation import evaluate
from dgpo_lightning.rewards import build
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone


def test_demo_end_to_end(tmp_path, tiny_world_path):
    out = tmp_path / "demo"
    result = demo.main([
        "--minutes", "0.01", "--out", str(out), "--threads", "1",
        f"--model.model_path={tiny_world_path}", "--model.lr=1e-3",
        "--data.group_size=3", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2",
        "--data.rewards={sharpness: 1.0}", "--data.eval_images_per_prompt=1", "--data.eval_num_steps=2",
        "--data.eval_min_images_per_task=3", "--data.eval_rewards=[geneval, test_brightness]",
        "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false", "--data.progress=false",
    ])
    rows = list(csv.DictReader((out / "eval_history.csv").open()))
    assert float(rows[0]["seconds"]) == 0.0 and float(rows[0]["step"]) == 0.0  # the evaluation before training
    assert len(rows) >= 2 and float(rows[-1]["step"]) > 0
    assert result["before"] == float(rows[0]["eval/geneval"]) and result["after"] == float(rows[-1]["eval/geneval"])
    for path in ("score_vs_time.png", "config.yaml", "final/unet/config.json"):
        assert (out / path).exists(), path
    assert list(out.glob("tb/events.out.tfevents.*")) and list(out.glob("tb/samples/step_*.png"))

    # The standalone evaluation of the base model reproduces the demo's "before" number exactly.
    records = load_prompt_records("world:test")

    def standalone(model_dir):
        evaluation = evaluate(
            load_backbone(model_dir), records, {"geneval": build("geneval"), "test_brightness": build("test_brightness")},
            SamplerSettings(num_steps=2), images_per_prompt=1, min_images_per_task=3, seed=1234,
        )
        return evaluation.summary["geneval"]["overall"], evaluation.summary["test_brightness"]["overall"]

    brightness = [float(row["eval/test_brightness"]) for row in rows]
    assert brightness[0] > 0 and brightness[-1] != brightness[0]  # non-trivial numbers that training moved
    # (GenEval scores are exact fractions; the brightness mean is accumulated in float32 by torchmetrics)
    assert standalone(tiny_world_path) == (result["before"], pytest.approx(brightness[0], rel=1e-6))
    # ... and the exported model is what was evaluated last.
    assert standalone(out / "final") == (result["after"], pytest.approx(brightness[-1], rel=1e-6))
    json.dumps(result)


def test_demo_stops_at_the_configured_step_budget_and_evaluates_there(tmp_path, tiny_world_path):
    out = tmp_path / "demo"
    result = demo.main([
        "--minutes", "5", "--out", str(out), "--threads", "1", "--trainer.max_steps=3",
        f"--model.model_path={tiny_world_path}", "--data.group_size=3", "--data.prompts_per_rank=2",
        "--data.groups_per_batch=2", "--data.passes_per_rollout=1", "--data.num_steps=2",
        "--data.rewards={sharpness: 1.0}", "--data.eval_images_per_prompt=1", "--data.eval_num_steps=2",
        "--data.eval_min_images_per_task=3",
        "--trainer.check_val_every_n_epoch=2", "--trainer.enable_progress_bar=false", "--data.progress=false",
    ])
    rows = list(csv.DictReader((out / "eval_history.csv").open()))
    # Evaluated before training, at step 2 (every second epoch) and, since the budget ended between
    # evaluations, once more at step 3: "after" is the model that stopped there.
    assert [int(float(r["step"])) for r in rows] == [0, 2, 3]
    assert result["after"] == float(rows[-1]["eval/geneval"])
