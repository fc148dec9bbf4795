"""Stop at step k, resume the same command to step n == an uninterrupted run to n, for every shipped
world config (shrunk to the tiny world model): every trained tensor, the optimizer state, the steps
(and values) of every logged rollout/train/eval scalar, and the image counts.

k is the end of an epoch without validation, followed by a validation epoch: the case where
Lightning's iteration-based restart used to redo the finished epoch (a new rollout and an extra step).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BASE = Path(__file__).resolve().parents[2] / "experiments" / "base"
#: Two optimizer steps per rollout epoch (one batch, two passes); validation after epochs 1, 3, 5 (steps 4, 8, 12).
SHRINK = [
    "--data.group_size=3", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.num_steps=2",
    "--data.passes_per_rollout=2", "--data.rewards={sharpness: 1.0}", "--data.progress=false",
    "--data.eval_images_per_prompt=1", "--data.eval_min_images_per_task=0", "--data.eval_num_steps=2",
    "--trainer.check_val_every_n_epoch=2", "--trainer.max_epochs=1000", "--trainer.enable_progress_bar=false",
]
STOP, END = 6, 10
#: Scalars whose values are timings (their steps are still compared).
def is_timing(tag):
    """Wall-clock scalars (``rollout/seconds``, ``rollout/reward_wait_seconds``, ...) differ run to run."""
    return tag.endswith("seconds")

CONFIGS = {
    "dgpo_lora": (["world_dgpo.yaml"], []),
    "demo": (["world_demo.yaml"], []),
    "flow_grpo": (["world_dgpo.yaml", "world_flow_grpo.yaml"], []),
    "diffusion_dpo": (["world_dgpo.yaml", "world_diffusion_dpo.yaml"], []),
    "dgpo_full_initial": (["world_dgpo.yaml"], ["--model.finetune=full", "--model.reference=initial"]),
    "dgpo_full_ema": (["world_dgpo.yaml"], ["--model.finetune=full", "--model.reference=ema"]),
}


def fit(configs, extra, world_path, root, max_steps):
    command = [sys.executable, "-m", "dgpo_lightning", "fit"]
    for name in configs:
        command += ["--config", str(BASE / name)]
    command += [f"--model.model_path={world_path}", *SHRINK, *extra, f"--trainer.max_steps={max_steps}",
                f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def last_checkpoint(root):
    return torch.load(next(Path(root).glob("**/checkpoints/last.ckpt")), weights_only=False, map_location="cpu")


def scalars(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted(Path(root).glob("**/events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag == "hp_metric":  # the logger writes a placeholder at the start of every fit
                continue
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(values) for tag, values in out.items()}


def history(root):
    files = list(Path(root).glob("**/eval_history.csv"))
    if not files:
        return []
    with files[0].open() as handle:
        return [(float(row["step"]), float(row["images"])) for row in csv.DictReader(handle)]


def assert_same_run(straight, resumed):
    a, b = last_checkpoint(straight), last_checkpoint(resumed)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (END, a["epoch"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"state_dict[{key}] differs")
    oa, ob = a["optimizer_states"], b["optimizer_states"]
    assert len(oa) == len(ob)
    for x, y in zip(oa, ob):
        assert x["param_groups"] == y["param_groups"]
        assert x["state"].keys() == y["state"].keys()
        for index in x["state"]:
            for name, value in x["state"][index].items():
                torch.testing.assert_close(y["state"][index][name], value, rtol=0, atol=0, msg=f"optimizer {index}.{name} differs")
    untimed = lambda state: {k: v for k, v in state.items() if k != "rollout_seconds"}  # noqa: E731 (wall-clock)
    assert untimed(a["RolloutDataModule"]) == untimed(b["RolloutDataModule"])
    assert a["RolloutDataModule"]["rollouts_done"] == a["epoch"] + 1
    assert b["RolloutDataModule"]["rollout_seconds"]["rollout"] > 0  # the resumed run's clock continued
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    sa, sb = scalars(straight), scalars(resumed)
    assert sa.keys() == sb.keys()
    assert any(tag.startswith("rollout/") for tag in sa) and any(tag.startswith("train/") for tag in sa)
    for tag in sa:
        assert [s for s, _ in sb[tag]] == [s for s, _ in sa[tag]], f"{tag} logged at other steps"
        if not is_timing(tag):
            assert sb[tag] == sa[tag], f"{tag} differs"
    assert history(straight) == history(resumed)


def run_case(name, world_path, tmp_path):
    configs, extra = CONFIGS[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(configs, extra, world_path, straight, END)
    fit(configs, extra, world_path, resumed, STOP)
    assert last_checkpoint(resumed)["global_step"] == STOP
    fit(configs, extra, world_path, resumed, END)
    assert_same_run(straight, resumed)


@pytest.mark.distributed  # spawns training processes
def test_lora_dgpo_stop_and_resume_equals_uninterrupted(tmp_path, tiny_world_path):
    run_case("dgpo_lora", tiny_world_path, tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "dgpo_lora"])
def test_every_config_stop_and_resume_equals_uninterrupted(name, tmp_path, tiny_world_path):
    run_case(name, tiny_world_path, tmp_path)
