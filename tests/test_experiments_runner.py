"""experiments/run_ablations.py: every suite names existing configs, and identical runs are shared."""

import importlib.util
from pathlib import Path

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
            directories.setdefault(runner.run_dir(tmp_path, configs, 0), set()).add(tuple(configs))
    # one directory per distinct configuration, and the base configuration is one run for all suites
    assert all(len(configs) == 1 for configs in directories.values())
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
