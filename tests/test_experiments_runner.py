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
