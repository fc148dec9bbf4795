"""Run the paper's comparisons on the embedded world and tabulate/plot them.

    python experiments/run_ablations.py --suite all            # everything, resumable
    python experiments/run_ablations.py --suite t_min --seeds 0 1 2 --minutes 6

Each run is ``python -m dgpo_lightning fit`` with composed configs and a wall-clock budget; a run
whose ``eval_history.csv`` ends with a ``done`` marker file is skipped, so an interrupted suite
continues where it stopped. Results land in ``experiments/results/``: per-suite CSV and Markdown
tables (mean ± std over seeds of the final held-out score, the visual-quality proxy and the time to
reach a target) and PNG plots of score versus wall-clock time and versus images generated.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent


class World(NamedTuple):
    """What a suite's runs share: the config every run composes onto, the held-out metric its tables
    report, an optional out-of-domain quality proxy, and the evaluation overrides of every run.
    (A NamedTuple, not a dataclass: notebooks and tests load this script by path, outside sys.modules.)"""

    name: str
    base: Path
    metric: str
    quality: str | None
    eval_args: tuple[str, ...]


WORLDS = {
    # GenEval plus the out-of-domain sharpness proxy; 2 images per prompt, topped up so that every
    # task is scored from at least 32 images.
    "image": World(
        "image", ROOT / "base" / "world_dgpo.yaml", "eval/geneval", "eval/sharpness",
        ("--data.eval_rewards=[geneval, sharpness]", "--data.eval_images_per_prompt=2", "--data.eval_min_images_per_task=32"),
    ),
    # The strict video reward on the held-out clips, as many clips per task (the motion tasks have 2
    # prompts per split).
    "video": World(
        "video", ROOT / "base" / "world_video_dgpo.yaml", "eval/world_video", None,
        ("--data.eval_rewards=[world_video]", "--data.eval_images_per_prompt=2", "--data.eval_min_images_per_task=32"),
    ),
}
IMAGE = WORLDS["image"]
#: The image world's config, headline metric and quality proxy (what the comparison notebook reads).
BASE, METRIC, QUALITY = IMAGE.base, IMAGE.metric, IMAGE.quality

#: suite -> list of (run name, extra config files relative to experiments/). ``[]`` is DGPO as
#: configured in base/world_dgpo.yaml (ODE rollouts, G=8, t_min 0.3, |A| weights); the suites share
#: that run (one per seed) rather than repeating it.
SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "speed": [
        ("dgpo", []),
        ("flow_grpo", ["base/world_flow_grpo.yaml"]),
        ("diffusion_dpo", ["base/world_diffusion_dpo.yaml"]),
        ("diffusion_nft", ["base/world_diffusion_nft.yaml"]),
    ],
    "sampler": [("ode", []), ("sde", ["ablations/sampler/sde.yaml"])],
    "t_min": [
        *[(f"t_min={t}", [f"ablations/t_min/{t}.yaml"]) for t in ("0.0", "0.2")],
        ("t_min=0.3", []),
        *[(f"t_min={t}", [f"ablations/t_min/{t}.yaml"]) for t in ("0.4", "0.6")],
    ],
    "group_size": [(f"G={g}", [f"ablations/group_size/{g}.yaml"] if g != 8 else []) for g in (2, 4, 8, 16)],
    "open_questions": [
        ("advantage", []),
        ("rank", ["ablations/group_weighting/rank.yaml"]),
        ("softmax", ["ablations/group_weighting/softmax.yaml"]),
        ("t_min annealed 0.6->0.2", ["ablations/t_min_schedule/anneal.yaml"]),
    ],
    # TDM-R1 (issue: few-step RL): the 4-NFE student reinforced by TDM-R1, by DGPO directly, and the
    # 10-step base with DGPO; each run starts from its own model and sampler (STARTS below).
    "few_step": [
        ("tdm_r1 (student, 4 NFE)", ["base/world_tdmr1.yaml"]),
        ("dgpo (student, 4 NFE)", ["base/world_student4.yaml"]),
        ("dgpo (base, 10 steps)", []),
    ],
    # Open question 1 (video): DGPO and Flow-GRPO on the embedded video world at equal wall-clock.
    "video": [
        ("dgpo", []),
        ("flow_grpo", ["base/world_video_flow_grpo.yaml"]),
    ],
}
#: Suites outside the image world (every other suite runs on WORLDS["image"]).
SUITE_WORLD: dict[str, str] = {"video": "video"}


def suite_world(suite: str) -> World:
    return WORLDS[SUITE_WORLD.get(suite, "image")]

#: Runs that do not start from the shipped base at 10 steps: their starting evaluation uses these
#: configs (the model and the evaluation sampler), so each row's gain is over its own start.
STARTS: dict[str, list[str]] = {
    "base/world_tdmr1.yaml": ["base/world_student4.yaml"],
    "base/world_student4.yaml": ["base/world_student4.yaml"],
}


def start_configs(configs: list[str]) -> list[str]:
    """The configs of a run's starting evaluation (``[]``: the shipped base)."""
    for config in configs:
        if config in STARTS:
            return STARTS[config]
    return []


def run_dir(out: Path, configs: list[str], seed: int, world: World = IMAGE) -> Path:
    """A run's directory, named by its world and configuration: suites that run the same one share it."""
    name = "+".join(Path(c).with_suffix("").as_posix().removeprefix("ablations/").replace("/", "_") for c in configs)
    return runs_folder(out, name or "dgpo", world) / f"seed{seed}"


def runs_folder(out: Path, name: str, world: World = IMAGE) -> Path:
    """``out/runs/<name>``; runs of another world than the image world carry its name as a prefix."""
    return out / "runs" / (name if world is IMAGE else f"{world.name}_{name}")


EXTRA: list[str] = []  # --set overrides, appended to every run's command


def launch(configs: list[str], seed: int, minutes: float, out: Path, eval_every: int, world: World = IMAGE) -> Path:
    directory = run_dir(out, configs, seed, world)
    label = directory.parent.name
    if (directory / "done").exists():
        print(f"[skip] {label} seed {seed}: done")
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    seconds = int(minutes * 60)
    command = [
        sys.executable, "-m", "dgpo_lightning", "fit",
        "--config", str(world.base),
        *[arg for config in configs for arg in ("--config", str(ROOT / config))],
        f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
        f"--trainer.default_root_dir={directory}",
        # The budget is training time (evaluation excluded), checked at each evaluation; max_time
        # (wall-clock, evaluations included) is only a safety net against a run that never evaluates.
        f"--trainer.callbacks.init_args.max_training_minutes={minutes}",
        f"--trainer.max_time=00:{(4 * seconds + 1200) // 3600:02d}:{(4 * seconds + 1200) // 60 % 60:02d}:00",
        "--trainer.max_epochs=100000",
        f"--trainer.check_val_every_n_epoch={eval_every}",
        "--trainer.enable_progress_bar=false",
        "--data.progress=false",
        *world.eval_args,
        *EXTRA,
    ]
    print(f"[run] {label} seed {seed} ({minutes} min)", flush=True)
    start = time.perf_counter()
    # One thread per run: runs go side by side (--jobs) instead of sharing cores inside one run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with (directory / "log.txt").open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{label} seed {seed} failed (exit {code}); see {directory / 'log.txt'}")
    (directory / "done").write_text(f"{time.perf_counter() - start:.0f} s\n")
    return directory


def read_history(directory: Path, name: str = "eval_history.csv") -> list[dict[str, float]]:
    """Evaluation rows of a run (written by the ScoreHistory callback: ``eval_history.csv`` by fit,
    ``eval_validate.csv`` by validate)."""
    path = next(directory.glob(f"**/{name}"))
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def base_row(out: Path, configs: list[str] | None = None, world: World = IMAGE) -> dict[str, float]:
    """The starting model's evaluation (identical for every seed: same model, prompts and seeds);
    ``configs`` (see :func:`start_configs`) select another starting model than the world's shipped base."""
    configs = configs or []
    name = "base" if not configs else "start_" + "+".join(Path(c).with_suffix("").name for c in configs)
    directory = runs_folder(out, name, world)
    if not (directory / "done").exists():
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "dgpo_lightning", "validate", "--config", str(world.base),
            *[arg for config in configs for arg in ("--config", str(ROOT / config))],
            f"--trainer.default_root_dir={directory}",
            "--trainer.enable_progress_bar=false", *world.eval_args, *EXTRA,
        ]
        with (directory / "log.txt").open("w") as log:
            if subprocess.call(command, stdout=log, stderr=subprocess.STDOUT) != 0:
                raise SystemExit(f"base evaluation failed; see {directory / 'log.txt'}")
        (directory / "done").write_text("ok\n")
    return read_history(directory, "eval_validate.csv")[0]


def time_to(rows: list[dict[str, float]], target: float, metric: str = IMAGE.metric, key: str = "seconds") -> float | None:
    """``key`` (training seconds, or ``images``) at the first evaluation scoring at least ``target``
    (``None`` when none did, or when there is no target): :func:`dgpo_lightning.callbacks.history.time_to_target`."""
    from dgpo_lightning.callbacks.history import time_to_target

    hit = time_to_target(rows, metric, target)
    return hit[key] if hit else None


#: Suites whose first run is timed against the others to the common target.
SPEED_SUITES = ("speed", "video")


def speed_up_lines(runs: dict[str, list[list[dict[str, float]]]], target: float, metric: str) -> str:
    """Markdown lines: the first run's time-to-target and images-to-target ratios against every other
    run, over the seeds both runs share (paired by seed), mean ± std; a seed where either run missed
    the target is counted as such and left out of the ratio."""
    names = list(runs)
    reference = runs[names[0]]
    if target != target:
        return "\nNo run improved on its start, so there is no target to time.\n"
    text = f"\nSpeed-up of {names[0]} to the target {target:.3f}, seed by seed (training wall-clock; rollout images):\n\n"
    for name in names[1:]:
        times, images, missed = [], [], 0
        for ours, theirs in zip(reference, runs[name]):
            pair = [(time_to(rows, target, metric), time_to(rows, target, metric, "images")) for rows in (ours, theirs)]
            if any(t is None for t, _ in pair):
                missed += 1
                continue
            (t_ours, i_ours), (t_theirs, i_theirs) = pair
            times.append(t_theirs / max(t_ours, 1e-9))
            images.append(i_theirs / max(i_ours, 1e-9))
        counted = len(times)
        if not counted:
            text += f"- {names[0]} vs {name}: no seed where both reached the target ({missed} missed)\n"
            continue
        spread = lambda v: f"{statistics.mean(v):.1f}x ± {statistics.pstdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}x"  # noqa: E731
        text += (
            f"- {names[0]} vs {name}: time {spread(times)}, images {spread(images)} "
            f"({counted} seed{'s' if counted > 1 else ''} where both reached it"
            + (f"; {missed} where one did not" if missed else "") + ")\n"
        )
    return text


def summarize(suite: str, runs: dict[str, list[list[dict[str, float]]]], out: Path, world: World | None = None) -> None:
    """Tables (CSV + Markdown) and plots for one suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = world or suite_world(suite)
    metric, quality_key = world.metric, world.quality or "-"
    quality_name = quality_key.split("/")[-1] if world.quality else "quality proxy"

    starts = {name: seeds[0][0][metric] for name, seeds in runs.items()}  # each run's own starting score
    base = statistics.mean(starts.values())
    own_starts = len({round(v, 6) for v in starts.values()}) > 1
    finals = {name: [rows[-1][metric] for rows in seeds] for name, seeds in runs.items()}
    best_final = max(statistics.mean(v) for v in finals.values())
    # Half of the best method's gain, so that every method can be timed; no gain, no target.
    target = base + 0.5 * (best_final - base) if best_final > base else float("nan")
    lines = []
    for name, seeds in runs.items():
        final = [rows[-1][metric] for rows in seeds]
        quality = [rows[-1].get(quality_key, float("nan")) for rows in seeds]
        reach = [time_to(rows, target, metric) for rows in seeds]
        reached = [r for r in reach if r is not None]
        lines.append({
            "run": name,
            "seeds": len(seeds),
            "start": starts[name],
            "start_quality_proxy": seeds[0][0].get(quality_key, float("nan")),
            "final_mean": statistics.mean(final),
            "final_std": statistics.pstdev(final) if len(final) > 1 else 0.0,
            "gain": statistics.mean(final) - starts[name],
            "quality_proxy": statistics.mean(quality),
            "minutes_to_target": statistics.mean(reached) / 60 if reached else float("nan"),
            "reached_target": f"{len(reached)}/{len(seeds)}",
            "images": statistics.mean(rows[-1]["images"] for rows in seeds),
            "train_minutes": statistics.mean(rows[-1]["seconds"] for rows in seeds) / 60,
            # where the training wall-clock went (ScoreHistory's cost split; absent in old runs)
            "rollout_minutes": statistics.mean(rows[-1].get("rollout_seconds", float("nan")) for rows in seeds) / 60,
            "update_minutes": statistics.mean(rows[-1].get("train_seconds", float("nan")) for rows in seeds) / 60,
        })
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    with (results / f"{suite}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    with (results / f"{suite}.md").open("w") as handle:
        if own_starts:
            handle.write(f"### {suite}\n\nEach run starts from its own model and sampler (start column); gain is over that start.\n\n")
            handle.write(f"| run | seeds | start ({quality_name}) | final (mean ± std) | gain | {quality_name} | images | training min (rollouts / updates) |\n")
            handle.write("|---|---|---|---|---|---|---|---|\n")
            for row in lines:
                handle.write(
                    f"| {row['run']} | {row['seeds']} | {row['start']:.3f} ({row['start_quality_proxy']:.3f}) "
                    f"| {row['final_mean']:.3f} ± {row['final_std']:.3f} | {row['gain']:+.3f} "
                    f"| {row['quality_proxy']:.4f} | {row['images']:.0f} "
                    f"| {row['train_minutes']:.1f} ({row['rollout_minutes']:.1f} / {row['update_minutes']:.1f}) |\n"
                )
        else:
            handle.write(f"### {suite}\n\nbase {metric} = {base:.3f}; target = {target:.3f} (half the best gain)\n\n")
            handle.write(f"| run | seeds | final (mean ± std) | gain | {quality_name} | min to target | reached | images | training min (rollouts / updates) |\n")
            handle.write("|---|---|---|---|---|---|---|---|---|\n")
            for row in lines:
                handle.write(
                    f"| {row['run']} | {row['seeds']} | {row['final_mean']:.3f} ± {row['final_std']:.3f} | {row['gain']:+.3f} "
                    f"| {row['quality_proxy']:.4f} | {row['minutes_to_target']:.1f} | {row['reached_target']} | {row['images']:.0f} "
                    f"| {row['train_minutes']:.1f} ({row['rollout_minutes']:.1f} / {row['update_minutes']:.1f}) |\n"
                )
        if suite in SPEED_SUITES:
            handle.write(speed_up_lines(runs, target, metric))
    figure, (by_time, by_images) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (name, seeds) in enumerate(runs.items()):
        color = colors[number % len(colors)]  # one colour per method, one line per seed
        for index, rows in enumerate(seeds):
            kwargs = {"label": name} if index == 0 else {}
            by_time.plot([r["seconds"] / 60 for r in rows], [r[metric] for r in rows], alpha=0.8, color=color, marker=".", **kwargs)
            by_images.plot([r["images"] for r in rows], [r[metric] for r in rows], alpha=0.8, color=color, marker=".")
    for axis, label in ((by_time, "training wall-clock (min)"), (by_images, "rollout images generated")):
        if not own_starts:  # a common target only means something from a common start
            axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
        axis.set_ylabel(f"held-out {metric}")
        axis.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.suptitle(f"{suite} (one line per seed)")
    figure.tight_layout()
    figure.savefig(results / f"{suite}.png", dpi=110)
    plt.close(figure)
    print((results / f"{suite}.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per run")
    parser.add_argument("--eval-every", type=int, default=3, help="rollout epochs between evaluations")
    parser.add_argument("--out", type=Path, default=ROOT)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one CPU thread each)")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN", help="only these runs of the suite (names as in the tables)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra CLI override for every run, e.g. --set model.model_path=DIR")
    args = parser.parse_args()
    EXTRA.extend(f"--{item}" for item in args.set)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    if args.only:
        known = {name for suite in suites for name, _ in SUITES[suite]}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"--only: no run named {unknown} in {suites}; runs: {sorted(known)}")
        for suite in suites:
            SUITES[suite] = [(name, configs) for name, configs in SUITES[suite] if name in args.only]
    start_rows = {
        (suite_world(suite).name, tuple(start_configs(configs))): None for suite in suites for _, configs in SUITES[suite]
    }
    for world, start in start_rows:
        start_rows[world, start] = base_row(args.out, list(start), WORLDS[world])
    if not args.summarize_only:
        from concurrent.futures import ThreadPoolExecutor

        # Seeds outermost: a suite cut short still has one complete seed of every run.
        # Runs shared by several suites are launched once.
        todo = {
            (tuple(configs), seed, suite_world(suite).name): None
            for seed in args.seeds for suite in suites for _, configs in SUITES[suite]
        }
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(launch, list(configs), seed, args.minutes, args.out, args.eval_every, WORLDS[world])
                for configs, seed, world in todo
            ]
            for future in futures:
                future.result()
    for suite in suites:
        world = suite_world(suite)
        runs: dict[str, list[list[dict[str, float]]]] = {}
        for name, configs in SUITES[suite]:
            for seed in args.seeds:
                directory = run_dir(args.out, configs, seed, world)
                if (directory / "done").exists():
                    start = start_rows[world.name, tuple(start_configs(configs))]
                    runs.setdefault(name, []).append([start] + read_history(directory))
        if runs:
            summarize(suite, runs, args.out)


if __name__ == "__main__":
    main()
