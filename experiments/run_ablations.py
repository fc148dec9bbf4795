"""Run the paper's comparisons on the embedded world and tabulate/plot them.

    python experiments/run_ablations.py --suite all            # everything, resumable
    python experiments/run_ablations.py --suite t_min --seeds 0 1 2 --minutes 6
    python experiments/run_ablations.py --suite flow_grpo_tuning --split validation --seeds 0 --out experiments/tuning
    python experiments/run_ablations.py --suite speed --target-gain 0.10 --minutes 30 --out experiments/speed_to_target

Each run is ``python -m dgpo_lightning fit`` with composed configs and a wall-clock budget; a run
whose ``eval_history.csv`` ends with a ``done`` marker file is skipped, so an interrupted suite
continues where it stopped. Results land in ``experiments/results/``: per-suite CSV and Markdown
tables (mean ± std over seeds of the final held-out score, the visual-quality proxy and the time to
reach a target) and PNG plots of score versus wall-clock time and versus images generated.

``--split validation`` evaluates on the world's validation prompts (for tuning; the tables say which
split they are on); ``--target-gain G`` stops each run at the first evaluation scoring its start + G
(or at the ``--minutes`` cap) and times every run to that common target.
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
    prompts: str  # prefix of the shipped prompt splits (``<prompts>:<split>``)


WORLDS = {
    # GenEval plus the out-of-domain sharpness proxy; 2 images per prompt, topped up so that every
    # task is scored from at least 32 images.
    "image": World(
        "image", ROOT / "base" / "world_dgpo.yaml", "eval/geneval", "eval/sharpness",
        ("--data.eval_rewards=[geneval, sharpness]", "--data.eval_images_per_prompt=2", "--data.eval_min_images_per_task=32"),
        "world",
    ),
    # The graded video reward on the held-out clips (the strict one is logged beside it: on the shipped
    # base it sits near its floor, see the base's model card), as many clips per task (the motion
    # tasks have 2 prompts per split).
    "video": World(
        "video", ROOT / "base" / "world_video_dgpo.yaml", "eval/world_video_partial", None,
        ("--data.eval_rewards=[world_video, world_video_partial]", "--data.eval_images_per_prompt=2", "--data.eval_min_images_per_task=32"),
        "world_video",
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
        # the best of the dgpo_tuning suite on the validation split (Flow-GRPO's tuned lr 1e-3)
        ("dgpo (tuned)", ["ablations/dgpo/lr_1e-3.yaml"]),
        ("flow_grpo", ["base/world_flow_grpo.yaml"]),
        # the best of the flow_grpo_tuning suite on the validation split (lr 1e-3, no KL)
        ("flow_grpo (tuned)", ["base/world_flow_grpo.yaml", "ablations/flow_grpo/lr_1e-3.yaml", "ablations/flow_grpo/kl_0.yaml"]),
        ("diffusion_dpo", ["base/world_diffusion_dpo.yaml"]),
        ("diffusion_nft", ["base/world_diffusion_nft.yaml"]),
    ],
    "sampler": [("ode", []), ("sde", ["ablations/sampler/sde.yaml"])],
    # The ODE-vs-SDE disagreement: both samplers at 4, 6 and 10 rollout steps, the SDE at two noise levels.
    "sampler_steps": [
        (f"{sampler} {steps} steps", [*configs, *([f"ablations/sampler/steps_{steps}.yaml"] if steps != 10 else [])])
        for sampler, configs in (("ode", []), ("sde a=0.7", ["ablations/sampler/sde.yaml"]), ("sde a=1.0", ["ablations/sampler/sde_1.0.yaml"]))
        for steps in (4, 6, 10)
    ],
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
    # The DGPO-vs-pairwise-DPO disagreement: best/worst vs all pairs, larger groups, the strict 0/1
    # reward instead of the graded one the other suites train on.
    "pairwise": [
        ("dgpo", []),
        ("dpo best/worst", ["base/world_diffusion_dpo.yaml"]),
        ("dpo all pairs", ["base/world_diffusion_dpo.yaml", "ablations/dpo/all_pairs.yaml"]),
        *[
            (f"{name} G={g}", [*configs, f"ablations/group_size/{g}.yaml"])
            for g in (16, 24)
            for name, configs in (("dgpo", []), ("dpo best/worst", ["base/world_diffusion_dpo.yaml"]))
        ],
        ("dgpo 0/1 reward", ["ablations/reward/geneval_binary.yaml"]),
        ("dpo best/worst 0/1 reward", ["ablations/reward/geneval_binary.yaml", "base/world_diffusion_dpo.yaml"]),
    ],
    # The reviewers' β ablation, for DGPO (base 100) and Diffusion-DPO (base 50).
    "beta": [
        ("dgpo β=25", ["ablations/beta/25.yaml"]),
        ("dgpo β=100", []),
        ("dgpo β=400", ["ablations/beta/400.yaml"]),
        ("dpo β=12.5", ["base/world_diffusion_dpo.yaml", "ablations/beta/dpo_12.5.yaml"]),
        ("dpo β=50", ["base/world_diffusion_dpo.yaml"]),
        ("dpo β=200", ["base/world_diffusion_dpo.yaml", "ablations/beta/dpo_200.yaml"]),
    ],
    # Flow-GRPO's fair chance: one knob at a time from its official values (base/world_flow_grpo.yaml),
    # within the ranges of the official configs; run it with --split validation.
    "flow_grpo_tuning": [
        ("flow_grpo", ["base/world_flow_grpo.yaml"]),
        *[
            (name, ["base/world_flow_grpo.yaml", f"ablations/flow_grpo/{name}.yaml"])
            for name in ("lr_1e-3", "clip_1e-3", "kl_0", "noise_1.0", "timesteps_4", "minibatches_2", "minibatches_4")
        ],
        ("lr_1e-3 + kl_0", ["base/world_flow_grpo.yaml", "ablations/flow_grpo/lr_1e-3.yaml", "ablations/flow_grpo/kl_0.yaml"]),
    ],
    # DGPO given the same tuning on validation: Flow-GRPO's tuned step size, half the update cost.
    "dgpo_tuning": [
        ("dgpo", []),
        ("lr_1e-3", ["ablations/dgpo/lr_1e-3.yaml"]),
        ("timesteps_2", ["ablations/dgpo/timesteps_2.yaml"]),
        ("lr_1e-3 + timesteps_2", ["ablations/dgpo/lr_1e-3.yaml", "ablations/dgpo/timesteps_2.yaml"]),
    ],
    # Open question 1 (video): DGPO and Flow-GRPO on the embedded video world at equal wall-clock.
    # Each method with the image world's validation-tuned values (the speed suite's "tuned" rows).
    "video": [
        ("dgpo (tuned)", ["ablations/dgpo/lr_1e-3.yaml"]),
        ("flow_grpo (tuned)", ["base/world_video_flow_grpo.yaml", "ablations/flow_grpo/lr_1e-3.yaml", "ablations/flow_grpo/kl_0.yaml"]),
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


def run_dir(out: Path, configs: list[str], seed: int, world: World = IMAGE, split: str = "test", stop_at: float | None = None) -> Path:
    """A run's directory, named by its world, configuration, evaluation split and (when it stops at a
    target score) that target: suites that run the same one share it."""
    name = "+".join(Path(c).with_suffix("").as_posix().removeprefix("ablations/").replace("/", "_") for c in configs)
    name = (name or "dgpo") + (f"_to_{stop_at:.3f}" if stop_at is not None else "")
    return runs_folder(out, name, world, split) / f"seed{seed}"


def runs_folder(out: Path, name: str, world: World = IMAGE, split: str = "test") -> Path:
    """``out/runs/<name>``; runs of another world than the image world carry its name as a prefix,
    runs evaluated on another split than test its name as a suffix."""
    name = name if world is IMAGE else f"{world.name}_{name}"
    return out / "runs" / (name if split == "test" else f"{name}_on_{split}")


def eval_args(world: World, split: str) -> list[str]:
    """The evaluation overrides of a run of ``world`` scored on its shipped ``split``."""
    return [*world.eval_args, f"--data.eval_prompts={world.prompts}:{split}"]


EXTRA: list[str] = []  # --set overrides, appended to every run's command


def launch(
    configs: list[str], seed: int, minutes: float, out: Path, eval_every: int, world: World = IMAGE,
    split: str = "test", stop_at: float | None = None,
) -> Path:
    directory = run_dir(out, configs, seed, world, split, stop_at)
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
        *eval_args(world, split),
        *([f"--trainer.callbacks.init_args.stop_at_score={stop_at}"] if stop_at is not None else []),
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


def base_row(out: Path, configs: list[str] | None = None, world: World = IMAGE, split: str = "test") -> dict[str, float]:
    """The starting model's evaluation on ``split`` (identical for every seed: same model, prompts and
    seeds); ``configs`` (see :func:`start_configs`) select another starting model than the world's shipped base."""
    configs = configs or []
    name = "base" if not configs else "start_" + "+".join(Path(c).with_suffix("").name for c in configs)
    directory = runs_folder(out, name, world, split)
    if not (directory / "done").exists():
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "dgpo_lightning", "validate", "--config", str(world.base),
            *[arg for config in configs for arg in ("--config", str(ROOT / config))],
            f"--trainer.default_root_dir={directory}",
            "--trainer.enable_progress_bar=false", *eval_args(world, split), *EXTRA,
        ]
        with (directory / "log.txt").open("w") as log:
            if subprocess.call(command, stdout=log, stderr=subprocess.STDOUT) != 0:
                raise SystemExit(f"base evaluation failed; see {directory / 'log.txt'}")
        (directory / "done").write_text("ok\n")
    return read_history(directory, "eval_validate.csv")[0]


def time_to(rows: list[dict[str, float]], target: float, metric: str = IMAGE.metric, key: str = "seconds") -> float | None:
    """``key`` (training seconds, ``images`` or a phase's seconds) at the first evaluation scoring at
    least ``target`` (``None`` when none did, when there is no target, or when the history has no such
    column): :func:`dgpo_lightning.callbacks.history.time_to_target`."""
    from dgpo_lightning.callbacks.history import time_to_target

    hit = time_to_target(rows, metric, target)
    return hit.get(key) if hit else None


#: Suites whose first run is timed against the others to the common target.
SPEED_SUITES = ("speed", "video")


#: The phases of a run's training wall-clock that the speed-up is also given for (ScoreHistory's columns).
PHASES = {"rollouts": "rollout_seconds", "updates": "train_seconds"}


def speed_up_lines(runs: dict[str, list[list[dict[str, float]]]], target: float, metric: str) -> str:
    """Markdown lines: the first run's time-to-target and images-to-target ratios against every other
    run, over the seeds both runs share (paired by seed), mean ± std, with the time ratio also per
    phase (rollouts: sampling and scoring; updates: the training steps) where both runs logged it; a
    seed where either run missed the target is counted as such and left out of the ratio."""
    from dgpo_lightning.callbacks.history import time_to_target

    names = list(runs)
    reference = runs[names[0]]
    if target != target:
        return "\nNo run improved on its start, so there is no target to time.\n"
    text = f"\nSpeed-up of {names[0]} to the target {target:.3f}, seed by seed (training wall-clock; rollout images):\n\n"
    spread = lambda v: f"{statistics.mean(v):.1f}x ± {statistics.pstdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}x"  # noqa: E731
    for name in names[1:]:
        ratios: dict[str, list[float]] = {"time": [], "images": [], **{phase: [] for phase in PHASES}}
        missed = 0
        for ours, theirs in zip(reference, runs[name]):
            hits = [time_to_target(rows, metric, target) for rows in (ours, theirs)]
            if any(hit is None for hit in hits):
                missed += 1
                continue
            for key, column in (("time", "seconds"), ("images", "images"), *PHASES.items()):
                if all(column in hit for hit in hits):
                    ratios[key].append(hits[1][column] / max(hits[0][column], 1e-9))
        counted = len(ratios["time"])
        if not counted:
            text += f"- {names[0]} vs {name}: no seed where both reached the target ({missed} missed)\n"
            continue
        phases = ", ".join(f"{phase} {spread(ratios[phase])}" for phase in PHASES if len(ratios[phase]) == counted)
        text += (
            f"- {names[0]} vs {name}: time {spread(ratios['time'])}" + (f" ({phases})" if phases else "")
            + f", images {spread(ratios['images'])} "
            f"({counted} seed{'s' if counted > 1 else ''} where both reached it"
            + (f"; {missed} where one did not" if missed else "") + ")\n"
        )
    return text


def summarize(
    suite: str, runs: dict[str, list[list[dict[str, float]]]], out: Path, world: World | None = None,
    split: str = "test", target_gain: float | None = None,
) -> None:
    """Tables (CSV + Markdown) and plots for one suite, scored on ``split``; the common target is the
    start + ``target_gain`` when given, else half of the best run's gain."""
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
    if target_gain is not None:
        target, target_rule = base + target_gain, f"start + {target_gain:g}"
    else:  # half of the best method's gain, so that every method can be timed; no gain, no target
        target, target_rule = (base + 0.5 * (best_final - base) if best_final > base else float("nan")), "half the best gain"
    lines = []
    for name, seeds in runs.items():
        final = [rows[-1][metric] for rows in seeds]
        quality = [rows[-1].get(quality_key, float("nan")) for rows in seeds]
        reach = [time_to(rows, target, metric) for rows in seeds]
        reached = [r for r in reach if r is not None]
        phase_reach = {
            phase: [v for v in (time_to(rows, target, metric, column) for rows in seeds) if v is not None]
            for phase, column in PHASES.items()
        }
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
            # the same minutes split by phase (seeds that logged it); nan when no seed reached the target
            **{
                f"{phase}_minutes_to_target": statistics.mean(v) / 60 if v and len(v) == len(reached) else float("nan")
                for phase, v in phase_reach.items()
            },
            "reached_target": f"{len(reached)}/{len(seeds)}",
            "images": statistics.mean(rows[-1]["images"] for rows in seeds),
            "train_minutes": statistics.mean(rows[-1]["seconds"] for rows in seeds) / 60,
            # where the training wall-clock went (ScoreHistory's cost split; absent in old runs)
            "rollout_minutes": statistics.mean(rows[-1].get("rollout_seconds", float("nan")) for rows in seeds) / 60,
            "update_minutes": statistics.mean(rows[-1].get("train_seconds", float("nan")) for rows in seeds) / 60,
        })
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = suite if split == "test" else f"{suite}_on_{split}"
    with (results / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    split_note = f"Scored on the {split} split. " if split != "test" else ""
    with (results / f"{stem}.md").open("w") as handle:
        if own_starts:
            handle.write(f"### {suite}\n\n{split_note}Each run starts from its own model and sampler (start column); gain is over that start.\n\n")
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
            handle.write(f"### {suite}\n\n{split_note}base {metric} = {base:.3f}; target = {target:.3f} ({target_rule})\n\n")
            handle.write(f"| run | seeds | final (mean ± std) | gain | {quality_name} | min to target (rollouts / updates) | reached | images | training min (rollouts / updates) |\n")
            handle.write("|---|---|---|---|---|---|---|---|---|\n")
            for row in lines:
                to_target = f"{row['minutes_to_target']:.1f}"
                if row["rollouts_minutes_to_target"] == row["rollouts_minutes_to_target"]:
                    to_target += f" ({row['rollouts_minutes_to_target']:.1f} / {row['updates_minutes_to_target']:.1f})"
                handle.write(
                    f"| {row['run']} | {row['seeds']} | {row['final_mean']:.3f} ± {row['final_std']:.3f} | {row['gain']:+.3f} "
                    f"| {row['quality_proxy']:.4f} | {to_target} | {row['reached_target']} | {row['images']:.0f} "
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
        axis.set_ylabel(f"{split} {metric}")
        axis.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.suptitle(f"{suite} (one line per seed)" + (f", {split} split" if split != "test" else ""))
    figure.tight_layout()
    figure.savefig(results / f"{stem}.png", dpi=110)
    plt.close(figure)
    print((results / f"{stem}.md").read_text())


def planned_runs(suites: list[str], seeds: list[int]) -> list[tuple[tuple[str, ...], int, str]]:
    """The runs to launch, as (configs, seed, world name), in launch order: seeds outermost, so that a
    sweep cut short still has one complete seed of every run; a run that several suites share (same
    world, configs and seed) appears once."""
    todo = {
        (tuple(configs), seed, suite_world(suite).name): None
        for seed in seeds for suite in suites for _, configs in SUITES[suite]
    }
    return list(todo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], nargs="+", default=["all"],
                        help="one or more suites; runs they share (same configs and seed) are launched once")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per run")
    parser.add_argument("--eval-every", type=int, default=3, help="rollout epochs between evaluations")
    parser.add_argument("--out", type=Path, default=ROOT)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one CPU thread each)")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN", help="only these runs of the suite (names as in the tables)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra CLI override for every run, e.g. --set model.model_path=DIR")
    parser.add_argument("--split", choices=["test", "validation"], default="test", help="held-out split every run is scored on (tune on validation)")
    parser.add_argument("--target-gain", type=float, default=None, metavar="G",
                        help="stop each run once it scores its start + G (--minutes is then the cap) and time every run to that target")
    args = parser.parse_args()
    EXTRA.extend(f"--{item}" for item in args.set)
    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
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
        start_rows[world, start] = base_row(args.out, list(start), WORLDS[world], args.split)

    def stop_at(world: World, configs) -> float | None:
        if args.target_gain is None:
            return None
        return round(start_rows[world.name, tuple(start_configs(list(configs)))][world.metric] + args.target_gain, 6)

    if not args.summarize_only:
        from concurrent.futures import ThreadPoolExecutor

        todo = planned_runs(suites, args.seeds)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(
                    launch, list(configs), seed, args.minutes, args.out, args.eval_every, WORLDS[world],
                    args.split, stop_at(WORLDS[world], configs),
                )
                for configs, seed, world in todo
            ]
            for future in futures:
                future.result()
    for suite in suites:
        world = suite_world(suite)
        runs: dict[str, list[list[dict[str, float]]]] = {}
        for name, configs in SUITES[suite]:
            for seed in args.seeds:
                directory = run_dir(args.out, configs, seed, world, args.split, stop_at(world, configs))
                if (directory / "done").exists():
                    start = start_rows[world.name, tuple(start_configs(configs))]
                    runs.setdefault(name, []).append([start] + read_history(directory))
        if runs:
            summarize(suite, runs, args.out, world, args.split, args.target_gain)


if __name__ == "__main__":
    main()
