"""Cost accounting: every evaluation row and epoch log says where the time went, by phase, and
time_to_target reads a history back."""

from __future__ import annotations

import csv
import json
import time

import pytest

from dgpo_lightning.callbacks import ScoreHistory, read_history, time_to_target
from dgpo_lightning.module import DGPOModule
from test_lightning_module import make_data, make_trainer

RECORDS = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "prompt": "a photo of a red square"},
]


def test_rows_split_the_wall_clock_into_phases(tmp_path, tiny_world_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    module = DGPOModule(model_path=str(tiny_world_path), lr=1e-3)
    data = make_data(eval_prompts=str(prompts), eval_images_per_prompt=1, eval_num_steps=2, eval_rewards=["geneval_partial"])
    rollouts, steps = [], []
    make_rollout = data.make_rollout
    data.make_rollout = lambda *a, **k: rollouts.append(make_rollout(*a, **k)) or rollouts[-1]
    training_step = module.training_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        out = training_step(*args, **kwargs)
        steps.append(time.perf_counter() - start)
        return out

    module.training_step = timed_step
    history = ScoreHistory(metric="eval/geneval_partial")
    trainer = make_trainer(tmp_path, max_epochs=3, check_val_every_n_epoch=1, callbacks=[history])
    trainer.fit(module, data)

    rows = read_history(tmp_path)
    assert len(rows) == 3 and [r["optimizer_steps"] for r in rows] == [r["step"] for r in rows]
    last = rows[-1]
    # Rollout seconds are the sum of every rollout's own timing; the parts are the rollouts' parts.
    assert last["rollout_seconds"] == pytest.approx(sum(r.seconds for r in rollouts), rel=1e-9)
    assert last["sampling_seconds"] == pytest.approx(sum(r.sampling_seconds for r in rollouts), rel=1e-9)
    # Training seconds cover the training steps (measured here independently) and little else.
    assert sum(steps) <= last["train_seconds"] <= sum(steps) + 0.5
    assert last["eval_seconds"] > 0 and last["other_seconds"] >= 0
    phases = last["train_seconds"] + last["rollout_seconds"] + last["eval_seconds"] + last["other_seconds"]
    assert phases == pytest.approx(last["wall_seconds"], rel=1e-6)
    assert last["seconds"] == pytest.approx(last["wall_seconds"] - last["eval_seconds"], abs=0.05)
    assert last["device_seconds"] == last["wall_seconds"] and last["devices"] == 1
    assert all(a["wall_seconds"] < b["wall_seconds"] for a, b in zip(rows, rows[1:]))  # cumulative
    assert trainer.callback_metrics["cost/images"] == data.images_generated


@pytest.mark.parametrize("stop_at, evaluations", [(0.0, 1), (1.5, 3)])
def test_a_run_stops_at_the_first_evaluation_that_reaches_its_target(tmp_path, tiny_world_path, stop_at, evaluations):
    """geneval_partial lies in [0, 1]: a target of 0 is reached at once, 1.5 never (the epoch cap ends it)."""
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    module = DGPOModule(model_path=str(tiny_world_path), lr=1e-3)
    data = make_data(eval_prompts=str(prompts), eval_images_per_prompt=1, eval_num_steps=2, eval_rewards=["geneval_partial"])
    history = ScoreHistory(metric="eval/geneval_partial", stop_at_score=stop_at)
    trainer = make_trainer(tmp_path, max_epochs=3, check_val_every_n_epoch=1, callbacks=[history])
    trainer.fit(module, data)
    rows = read_history(tmp_path)
    assert len(rows) == evaluations and trainer.current_epoch == evaluations
    assert all(r["eval/geneval_partial"] < stop_at for r in rows[:-1])


def test_time_to_target_reads_the_first_row_that_reaches_it(tmp_path):
    rows = [
        {"epoch": 0, "step": 0, "seconds": 0.0, "images": 0, "eval/geneval": 0.30, "train_seconds": 0.0, "rollout_seconds": 0.0},
        {"epoch": 1, "step": 8, "seconds": 60.0, "images": 512, "eval/geneval": 0.38, "train_seconds": 20.0, "rollout_seconds": 35.0},
        {"epoch": 2, "step": 16, "seconds": 120.0, "images": 1024, "eval/geneval": 0.45, "train_seconds": 41.0, "rollout_seconds": 70.0},
        {"epoch": 3, "step": 24, "seconds": 180.0, "images": 1536, "eval/geneval": 0.41, "train_seconds": 60.0, "rollout_seconds": 110.0},
    ]
    with (tmp_path / "eval_history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    hit = time_to_target(tmp_path, "eval/geneval", 0.10, baseline="first")
    assert hit == {"score": 0.45, "target": pytest.approx(0.40), "seconds": 120.0, "train_seconds": 41.0,
                   "rollout_seconds": 70.0, "images": 1024.0}
    assert time_to_target(rows, "eval/geneval", 0.38)["images"] == 512
    assert time_to_target(rows, "eval/geneval", 0.5) is None
    with pytest.raises(KeyError, match="eval/ocr"):
        time_to_target(rows, "eval/ocr", 0.5)


def test_rollouts_switch_to_the_old_policy_from_the_configured_step(tmp_path, tiny_world_path):
    """model.old_policy_rollouts_after: the official recipe's late switch of rollouts to θ_old."""
    import torch

    from dgpo_lightning.errors import ConfigError

    module = DGPOModule(
        model_path=str(tiny_world_path), finetune="lora", lora_rank=4, lr=1e-2, clip_range=0.05,
        old_policy=True, old_policy_decay_max=0.9, old_policy_decay_rate=0.5, old_policy_rollouts_after=2,
    )
    data = make_data()
    seen = []  # per rollout: (step, sampled with θ_old, sampled with the online weights)
    make_rollout = data.make_rollout

    def recording(backbone, **kwargs):
        trained = [p for p in backbone.denoiser.parameters() if p.requires_grad]
        old = list(module.old_policy.averaged)
        seen.append((
            module.global_step,
            all(torch.equal(p, o) for p, o in zip(trained, old)),
            all(torch.equal(p, q) for p, q in zip(trained, online_at_step[-1])),
        ))
        return make_rollout(backbone, **kwargs)

    online_at_step = []
    data.make_rollout = recording
    original = data.train_dataloader

    def dataloader():
        online_at_step.append([p.detach().clone() for p in module.backbone.denoiser.parameters() if p.requires_grad])
        return original()

    data.train_dataloader = dataloader
    make_trainer(tmp_path, max_epochs=4).fit(module, data)
    assert [step for step, _, _ in seen] == [0, 2, 4, 6]  # two optimizer steps per epoch
    # Before step 2 the online weights sample; from step 2 on θ_old does, and it differs from them.
    assert seen[0][2]
    assert all(old for _, old, _ in seen[1:]) and not any(online for _, _, online in seen[1:])
    # The online weights are back for training after each rollout.
    assert all(not torch.equal(p, o) for p, o in zip(
        [p for p in module.backbone.denoiser.parameters() if p.requires_grad], module.old_policy.averaged))
    with pytest.raises(ConfigError, match="model.old_policy_rollouts_after"):
        DGPOModule(model_path=str(tiny_world_path), old_policy_rollouts_after=10)
