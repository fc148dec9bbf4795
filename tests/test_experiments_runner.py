"""experiments/run_ablations.py: every suite names existing configs, and identical runs are shared."""

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _runner():
    spec = importlib.util.spec_from_file_location("run_ablations", EXPERIMENTS / "run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_suite_config_exists_and_runs_are_shared_only_when_identical(tmp_path):
    runner = _runner()
    directories = {}
    for suite, runs in runner.SUITES.items():
        for name, configs in runs:
            for config in configs:
                assert (EXPERIMENTS / config).is_file(), f"{suite}/{name}: {config} is missing"
            world = runner.suite_world(suite)
            directories.setdefault(runner.run_dir(tmp_path, configs, 0, world), set()).add((world.name, tuple(configs)))
    # one directory per distinct world and configuration, and the base configuration is one run for all image suites
    assert all(len(configs) == 1 for configs in directories.values())
    video = runner.WORLDS["video"]
    video_dgpo = runner.SUITES["video"][0][1]
    assert runner.run_dir(tmp_path, video_dgpo, 0, video) in directories
    assert runner.run_dir(tmp_path, video_dgpo, 0, video) != runner.run_dir(tmp_path, video_dgpo, 0)  # the world names the run
    assert video.base.is_file() and runner.suite_world("video") is video and runner.suite_world("t_min") is runner.IMAGE
    assert runner.run_dir(tmp_path, [], 0) in directories
    assert runner.run_dir(tmp_path, [], 0) != runner.run_dir(tmp_path, [], 1)
    assert runner.run_dir(tmp_path, [], 0).parent != tmp_path / "runs" / "base"  # the base model's own evaluation


def test_runs_with_their_own_starting_model_are_scored_against_their_own_start(tmp_path):
    runner = _runner()
    # the few-step suite's student runs start from the student's evaluation, the base run from the base
    assert runner.start_configs(["base/world_student4.yaml"]) == ["base/world_student4.yaml"]
    assert runner.start_configs(["base/world_tdmr1.yaml"]) == ["base/world_student4.yaml"]
    assert runner.start_configs(["base/world_flow_grpo.yaml"]) == []
    row = lambda score, sharp, seconds, images: {"eval/geneval": score, "eval/sharpness": sharp, "seconds": seconds, "images": images}  # noqa: E731
    student, base = row(0.30, 1.5, 0, 0), row(0.31, 1.8, 0, 0)
    runs = {
        "student": [[student, row(0.40, 1.4, 60, 512)], [student, row(0.44, 1.3, 60, 512)]],
        "base": [[base, row(0.35, 1.9, 60, 256)], [base, row(0.37, 2.0, 60, 256)]],
    }
    runner.summarize("few", runs, tmp_path)
    table = (tmp_path / "results" / "few.md").read_text()
    assert "start (sharpness)" in table
    assert "| student | 2 | 0.300 (1.500) | 0.420 ± 0.020 | +0.120 |" in table
    assert "| 1.0 (nan / nan) |" in table  # training minutes; the phase split of runs that logged one
    assert "| base | 2 | 0.310 (1.800) | 0.360 ± 0.010 | +0.050 |" in table


def test_the_speed_up_is_paired_by_seed_and_leaves_out_seeds_that_missed_the_target(tmp_path):
    runner = _runner()
    metric = runner.WORLDS["video"].metric
    row = lambda score, seconds, images: {metric: score, "seconds": seconds, "images": images}  # noqa: E731
    start = row(0.10, 0, 0)
    runs = {
        # seeds 0 and 1 reach 0.20 after 60 s / 120 s; seed 2 after 100 s
        "dgpo": [[start, row(0.25, 60, 512)], [start, row(0.15, 60, 512), row(0.30, 120, 1024)], [start, row(0.22, 100, 640)]],
        # seed 0 after 300 s, seed 1 after 600 s, seed 2 never
        "flow_grpo": [[start, row(0.12, 150, 256), row(0.21, 300, 512)], [start, row(0.20, 600, 2048)], [start, row(0.19, 900, 4096)]],
    }
    text = runner.speed_up_lines(runs, 0.20, metric)
    # time ratios 300/60 = 5 and 600/120 = 5; image ratios 512/512 = 1 and 2048/1024 = 2
    assert "- dgpo vs flow_grpo: time 5.0x ± 0.0, images 1.5x ± 0.5 (2 seeds where both reached it; 1 where one did not)" in text
    runner.summarize("video", runs, tmp_path)
    table = (tmp_path / "results" / "video.md").read_text()
    assert f"base {metric} = 0.100" in table and "Speed-up of dgpo" in table
    assert "| flow_grpo | 3 | 0.200 ± 0.008 | +0.100 |" in table


def test_a_suite_where_no_run_gains_has_no_target_to_time(tmp_path):
    runner = _runner()
    metric = runner.WORLDS["video"].metric
    row = lambda score, seconds: {metric: score, "seconds": seconds, "images": seconds * 10}  # noqa: E731
    start = row(0.10, 0)
    runs = {"dgpo": [[start, row(0.08, 60)]], "flow_grpo": [[start, row(0.10, 60)]]}
    runner.summarize("video", runs, tmp_path)
    table = (tmp_path / "results" / "video.md").read_text()
    assert "target = nan" in table and "| 0/1 |" in table  # the start itself does not count as reaching a target
    assert "No run improved on its start" in table and "quality proxy" in table


def test_the_speed_up_is_also_split_by_phase_and_a_fixed_target_gain_is_the_common_target(tmp_path):
    runner = _runner()
    metric = runner.IMAGE.metric
    row = lambda score, seconds, rollout, train: {  # noqa: E731
        metric: score, "seconds": seconds, "images": seconds * 8, "rollout_seconds": rollout, "train_seconds": train,
    }
    start = row(0.30, 0, 0, 0)
    runs = {
        # start + 0.10 = 0.40: seed 0 at 60 s (20 s rollouts, 40 s updates), seed 1 at 90 s (30 / 60)
        "dgpo": [[start, row(0.45, 60, 20, 40)], [start, row(0.35, 45, 15, 30), row(0.41, 90, 30, 60)]],
        # seed 0 at 600 s (400 / 200), seed 1 at 900 s (600 / 300)
        "flow_grpo": [[start, row(0.38, 300, 200, 100), row(0.40, 600, 400, 200)], [start, row(0.42, 900, 600, 300)]],
    }
    runner.summarize("speed", runs, tmp_path, target_gain=0.10, split="validation")
    table = (tmp_path / "results" / "speed_on_validation.md").read_text()
    assert "Scored on the validation split." in table and "target = 0.400 (start + 0.1)" in table
    # ratios: time 10 and 10; rollouts 20 and 20; updates 5 and 5; images as time
    assert "- dgpo vs flow_grpo: time 10.0x ± 0.0 (rollouts 20.0x ± 0.0, updates 5.0x ± 0.0), images 10.0x ± 0.0 (2 seeds" in table
    # minutes to target, total (rollouts / updates): (60 + 90) / 2 s and (600 + 900) / 2 s
    assert "| 1.2 (0.4 / 0.8) | 2/2 |" in table and "| 12.5 (8.3 / 4.2) | 2/2 |" in table


def test_validation_runs_and_runs_stopped_at_a_target_have_their_own_directories(tmp_path):
    runner = _runner()
    test_run = runner.run_dir(tmp_path, ["base/world_flow_grpo.yaml"], 0)
    assert test_run.parent.name == "base_world_flow_grpo"
    assert runner.run_dir(tmp_path, ["base/world_flow_grpo.yaml"], 0, split="validation").parent.name == "base_world_flow_grpo_on_validation"
    assert runner.run_dir(tmp_path, [], 1, stop_at=0.4131).parent.name == "dgpo_to_0.413"
    assert runner.runs_folder(tmp_path, "base", runner.WORLDS["video"], "validation").name == "video_base_on_validation"
    assert runner.eval_args(runner.IMAGE, "validation")[-1] == "--data.eval_prompts=world:validation"
    assert runner.eval_args(runner.WORLDS["video"], "test")[-1] == "--data.eval_prompts=world_video:test"


def test_suites_run_together_launch_their_shared_runs_once_seed_by_seed():
    runner = _runner()
    alone = {suite: runner.planned_runs([suite], [0]) for suite in ("pairwise", "beta")}
    together = runner.planned_runs(["pairwise", "beta"], [0, 1])
    shared = set(alone["pairwise"]) & set(alone["beta"])
    # DGPO's base recipe and Diffusion-DPO's (β 100 / 50) are rows of both suites
    assert ((), 0, "image") in shared and (("base/world_diffusion_dpo.yaml",), 0, "image") in shared
    assert len(together) == 2 * (len(alone["pairwise"]) + len(alone["beta"]) - len(shared))
    assert len(set(together)) == len(together)
    seeds = [seed for _, seed, _ in together]
    assert seeds == sorted(seeds)  # every run of seed 0 before any of seed 1


def test_sampler_statistics_measure_the_spread_inside_each_group(tmp_path):
    spec = importlib.util.spec_from_file_location("sampler_statistics", EXPERIMENTS / "sampler_statistics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # two groups: rewards (0, 1, 1, 0) have population std 0.5; (0.5, 0.5, 0.5, 0.5) has none
    per_image = [{"record": r, "geneval_partial": v} for r, values in ((0, (0, 1, 1, 0)), (3, (0.5,) * 4)) for v in values]
    assert module.group_statistics(per_image) == {"group_std": 0.25, "zero_spread_groups": 0.5}
    rows = [
        {"sampler": f"{label} {steps} steps", "images": 8, "train_reward": 0.5, "geneval": 0.25, "group_std": 0.25,
         "zero_spread_groups": 0.5, "sharpness": 2.0}
        for label, _, _ in module.SAMPLERS for steps in module.STEPS
    ]
    module.write(rows, tmp_path, "world:validation", 4, 0)
    table = (tmp_path / "sampler_statistics.md").read_text()
    assert "| sde a=1.0 4 steps | 8 | 0.500 | 0.250 | 0.250 | 50.0% | 2.000 |" in table
    assert (tmp_path / "sampler_statistics.png").stat().st_size > 0


def test_the_video_direction_probe_scores_the_same_clips_under_each_caption(tmp_path):
    import json

    import torch

    from dgpo_lightning.world.video.backbone import save_backbone, tiny_backbone

    spec = importlib.util.spec_from_file_location("video_direction_probe", EXPERIMENTS / "video_direction_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    model = tiny_backbone(layout="canvas").eval()
    losses = probe.loss_probe(model, clips=8)
    # independent recomputation of the true caption's loss from the same draws
    generator = torch.Generator().manual_seed(0)
    truth = probe.record("green", "circle", "right")
    videos = torch.stack([probe.render_prompt(truth, generator) for _ in range(8)])
    x0 = videos.permute(0, 2, 1, 3, 4) * 2 - 1
    noise, t = torch.randn(x0.shape, generator=generator), torch.rand(8, generator=generator)
    with torch.no_grad():
        v = model.velocity((1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise, t, model.encode_prompts([truth["prompt"]] * 8))
    assert losses["true caption"] == pytest.approx(float(((v - (noise - x0)) ** 2).mean()), rel=1e-5)
    assert losses["opposite direction"] != losses["true caption"]  # a random text encoder already tells the words apart
    save_backbone(model, tmp_path / "tiny")
    result = probe.main(["--model", str(tmp_path / "tiny"), "--clips", "4", "--seeds", "2", "--out", str(tmp_path / "probe.json")])
    assert set(result["positions"]) == {"left", "right", "up", "down"}
    assert json.loads((tmp_path / "probe.json").read_text())["loss"] == pytest.approx(result["loss"])
