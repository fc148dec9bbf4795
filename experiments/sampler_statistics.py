"""What the rollout sampler hands DGPO before any training: the shipped base's groups under each
rollout sampler of the ``sampler_steps`` suite (ODE DPM-Solver++ or Flow-GRPO's SDE at a = 0.7 / 1.0,
4 / 6 / 10 steps), scored as the training rollouts are.

Per setting it samples ``--group-size`` images for every prompt of ``--prompts`` (the validation split
by default: the tuning split, never the test one) with the evaluation pipeline and reports

- the mean training reward (``geneval_partial``) and strict GenEval score: the quality of a rollout image,
- the mean within-group std of the training reward: the spread the group-normalised advantages feed on,
- the fraction of groups with no spread at all (DGPO learns nothing from them),
- the sharpness proxy (eval-only; a noisier sampler leaves more high-frequency energy).

``python experiments/sampler_statistics.py --out experiments/disagreements/sampler_statistics`` writes
``sampler_statistics.{csv,md,png}`` there (about 2 minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

#: (label, sampler, noise level) of the sampler_steps suite; the steps are crossed with these.
SAMPLERS = (("ode", "ode_dpm", 0.0), ("sde a=0.7", "sde", 0.7), ("sde a=1.0", "sde", 1.0))
STEPS = (4, 6, 10)
TRAIN_REWARD, STRICT, QUALITY = "geneval_partial", "geneval", "sharpness"


def group_statistics(per_image: list[dict[str, float]], reward: str = TRAIN_REWARD) -> dict[str, float]:
    """Mean within-group population std of ``reward`` and the fraction of groups whose rewards are all
    equal; a group is every image of one prompt (``record``)."""
    groups: dict[int, list[float]] = defaultdict(list)
    for row in per_image:
        groups[row["record"]].append(row[reward])
    spreads = [statistics.pstdev(values) for values in groups.values()]
    return {
        "group_std": statistics.mean(spreads),
        "zero_spread_groups": sum(spread == 0 for spread in spreads) / len(spreads),
    }


def measure(prompts: str, group_size: int, seed: int, out: Path) -> list[dict[str, float | str]]:
    from dgpo_lightning import evaluate

    rows: list[dict[str, float | str]] = []
    for label, sampler, noise in SAMPLERS:
        for steps in STEPS:
            name = f"{label} {steps} steps"
            path = out / f"{label.replace(' ', '_').replace('=', '')}_{steps}.json"
            evaluate.main([
                "--prompts", prompts, "--images-per-prompt", str(group_size), "--seed", str(seed),
                "--sampler", sampler, "--num-steps", str(steps), "--noise-level", str(noise),
                "--reward", TRAIN_REWARD, "--reward", STRICT, "--reward", QUALITY,
                "--no-progress", "--out", str(path),
            ])
            per_image = json.loads(path.read_text())["per_image"]
            rows.append({
                "sampler": name,
                "images": len(per_image),
                "train_reward": statistics.mean(row[TRAIN_REWARD] for row in per_image),
                "geneval": statistics.mean(row[STRICT] for row in per_image),
                **group_statistics(per_image),
                "sharpness": statistics.mean(row[QUALITY] for row in per_image),
            })
    return rows


def write(rows: list[dict[str, float | str]], out: Path, prompts: str, group_size: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "sampler_statistics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "sampler_statistics.md").open("w") as handle:
        handle.write(
            f"### The base's rollout groups by sampler ({prompts}, {group_size} images per prompt, seed {seed})\n\n"
            "| sampler | images | training reward | strict GenEval | within-group std | groups without spread | sharpness |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for row in rows:
            handle.write(
                f"| {row['sampler']} | {row['images']} | {row['train_reward']:.3f} | {row['geneval']:.3f} "
                f"| {row['group_std']:.3f} | {row['zero_spread_groups']:.1%} | {row['sharpness']:.3f} |\n"
            )
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, _, _ in SAMPLERS:
        series = [row for row in rows if str(row["sampler"]).startswith(label + " ")]
        for axis, key, title in zip(axes, ("train_reward", "group_std", "sharpness"),
                                    ("training reward (geneval_partial)", "within-group reward std", "sharpness (eval-only)")):
            axis.plot(STEPS, [row[key] for row in series], marker="o", label=label)
            axis.set_title(title, fontsize=10)
            axis.set_xlabel("rollout steps")
            axis.set_xticks(STEPS)
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"the shipped base's rollouts by sampler ({prompts}, G = {group_size})")
    figure.tight_layout()
    figure.savefig(out / "sampler_statistics.png", dpi=110)
    plt.close(figure)
    print((out / "sampler_statistics.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="world:validation")
    parser.add_argument("--group-size", type=int, default=8, help="images per prompt (the rollouts' G)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.prompts, args.group_size, args.seed, args.out)
    write(rows, args.out, args.prompts, args.group_size, args.seed)


if __name__ == "__main__":
    main()
