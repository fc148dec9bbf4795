"""GenEval-style evaluation of a world model on a GenEval-format prompt file.

``python -m dgpo_lightning.evaluate --prompts FILE.jsonl [--model PATH] [--images-per-prompt N]
[--seed S] --out RESULT.json``

Samples ``N`` images per prompt with a 10-step DPM-Solver++ ODE (per-sample seeded noise, so the
numbers depend on the seed only, not on batching), reads the objects back with the world's detector,
applies GenEval's correctness rules and writes ``{"overall": ..., "<tag>": ...}``: the per-task
accuracies of the tasks present and their unweighted mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dgpo_lightning.world.scene import TAGS, load_prompts, validate_metadata

DEFAULT_SAMPLER = "ode_dpm"
DEFAULT_STEPS = 10


@torch.no_grad()
def generate_images(
    backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    sampler: str = DEFAULT_SAMPLER,
    num_steps: int = DEFAULT_STEPS,
    shift: float | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """One image ``[N, 3, H, W]`` in ``[0, 1]`` per ``(prompt, seed)``.

    ``shift=None`` uses the backbone's recommended schedule shift (``backbone.shift``, else 3);
    ``guidance_scale=None`` its default CFG scale.
    """
    from dgpo_lightning.data.rollout import sample_latents

    output = sample_latents(
        backbone,
        list(prompts),
        list(seeds),
        sampler=sampler,
        num_steps=num_steps,
        shift=shift,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        progress=progress,
        description="evaluate",
    )
    return backbone.decode(output.sample)


def evaluate_backbone(
    backbone,
    records: Sequence[Mapping[str, Any]],
    *,
    images_per_prompt: int = 4,
    min_images_per_task: int = 0,
    seed: int = 0,
    sampler: str = DEFAULT_SAMPLER,
    num_steps: int = DEFAULT_STEPS,
    shift: float | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """GenEval accuracy of ``backbone`` on ``records`` (GenEval metadata with ``prompt`` text).

    Args:
        backbone: a world backbone (anything with the Backbone protocol and 32×32 RGB outputs the
            world's detector can read).
        records: GenEval jsonl records; each is validated (unknown classes/colours raise).
        images_per_prompt: images sampled per prompt.
        min_images_per_task: tasks with few prompts get more images per prompt, at least this many
            per task (see :func:`~dgpo_lightning.data.rollout.evaluation_plan`).
        seed: evaluation seed; image ``j`` of prompt ``i`` uses a seed derived from ``(seed, i, j)``.
        sampler, num_steps, shift: sampler name (``ode_dpm``, ``ode_euler``, ``sde``), its steps and
            schedule shift (``None``: the backbone's recommended one).
        guidance_scale: CFG scale; ``None`` = the backbone's default.
        batch_size: images per sampler batch (does not change the result).
        progress: show a tqdm bar.

    Returns:
        ``{"overall": mean of the task scores, <tag>: accuracy per task present}``.
    """
    from dgpo_lightning.data.rollout import evaluation_plan
    from dgpo_lightning.rewards.geneval import image_correct, summarize
    from dgpo_lightning.world.detector import detect_batch

    records = list(records)
    if not records:
        raise ValueError("no prompts to evaluate")
    for index, record in enumerate(records):
        validate_metadata(record, where=f"prompt {index}")
    _warn_unknown_words(backbone, [r["prompt"] for r in records])
    plan = evaluation_plan(records, seed, images_per_prompt, min_images_per_task)
    metadata = [records[index] for index, _ in plan]
    images = generate_images(
        backbone,
        [record["prompt"] for record in metadata],
        [image_seed for _, image_seed in plan],
        sampler=sampler,
        num_steps=num_steps,
        shift=shift,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        progress=progress,
    )
    detections = detect_batch(images)
    correct = [image_correct(m, d) for m, d in zip(metadata, detections)]
    summary = summarize([m["tag"] for m in metadata], correct)
    ordered = {"overall": summary["overall"]}
    ordered.update({tag: summary[tag] for tag in TAGS if tag in summary})
    return ordered


def _warn_unknown_words(backbone, prompts: Sequence[str]) -> None:
    encoder = getattr(backbone, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "unknown_words"):
        return
    unknown = sorted({word for prompt in prompts for word in encoder.unknown_words(prompt)})
    if unknown:
        warnings.warn(
            f"words outside the model's vocabulary are encoded as [unk]: {', '.join(unknown)}", stacklevel=3
        )


def format_table(result: Mapping[str, float]) -> str:
    """A two-column text table of ``result`` (tasks, then ``overall``)."""
    rows = [(tag, result[tag]) for tag in TAGS if tag in result] + [("overall", result["overall"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'task':<{width}}  score", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {value:.3f}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m dgpo_lightning.evaluate",
        description="GenEval-style evaluation of an embedded-world model on a GenEval-format prompt file.",
    )
    parser.add_argument("--prompts", required=True, help="GenEval-format jsonl prompt file")
    parser.add_argument("--model", default=None, help="world checkpoint directory (default: the shipped base)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images sampled per prompt (default 4)")
    parser.add_argument(
        "--min-images-per-task", type=int, default=0, help="more images per prompt for tasks with few prompts (default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=("ode_dpm", "ode_euler", "sde"))
    parser.add_argument("--num-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--shift", type=float, default=None, help="schedule shift (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    try:
        records = load_prompts(args.prompts)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    from dgpo_lightning.world.backbone import load_backbone

    try:
        backbone = load_backbone(args.model)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    result = evaluate_backbone(
        backbone,
        records,
        images_per_prompt=args.images_per_prompt,
        min_images_per_task=args.min_images_per_task,
        seed=args.seed,
        sampler=args.sampler,
        num_steps=args.num_steps,
        shift=args.shift,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    per_task = f", at least {args.min_images_per_task} per task" if args.min_images_per_task else ""
    print(
        f"{len(records)} prompts x {args.images_per_prompt} images{per_task}, seed {args.seed}, "
        f"model {args.model or 'shipped base'}"
    )
    print(format_table(result))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
