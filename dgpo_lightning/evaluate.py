"""Held-out evaluation of any backbone on a prompt file, with any rewards.

``python -m dgpo_lightning.evaluate --prompts FILE [--backbone world|sd3] [--model PATH]
[--adapter DIR] [--reward NAME ...] [--images-per-prompt N] [--seed S] --out RESULT.json``
(``--protocol paper ...``: the paper's whole table for several models, :mod:`dgpo_lightning.benchmark`)

Samples ``N`` images per prompt (10-step DPM-Solver++ ODE by default; per-image seeded noise, so
the numbers depend on the seed only, not on batching), scores them with each reward and writes
``RESULT.json``: the first reward's ``overall`` and per-task scores at the top level (for the
world's GenEval: ``{"overall": ..., "<tag>": ...}``, the per-task accuracies and their unweighted
mean), every reward's under ``"rewards"``, the run's settings and one row per image; plus
``RESULT.png``, a grid with one row per task. The pipeline is :func:`dgpo_lightning.evaluation.evaluate`,
the same one Lightning's validation runs.

Defaults are the embedded world's: its shipped base, GenEval with its programmatic detector.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from dgpo_lightning.errors import ShortErrorsParser, UsageError, json_object_option, read_yaml_option
from dgpo_lightning.evaluation import EvalResult, evaluate, generate_images, save_grid  # noqa: F401 (re-export)
from dgpo_lightning.sampling.settings import SAMPLER_NAMES, SamplerSettings

DEFAULT_SAMPLER = "ode_dpm"
DEFAULT_STEPS = 10

def format_table(summary: Mapping[str, float], name: str = "score") -> str:
    """A two-column text table of one reward's summary (tasks, then ``overall``)."""
    rows = [(tag, value) for tag, value in summary.items() if tag != "overall"] + [("overall", summary["overall"])]
    width = max(len(row) for row, _ in rows)
    lines = [f"{'task':<{width}}  {name}", f"{'-' * width}  {'-' * max(len(name), 5)}"]
    lines += [f"{row:<{width}}  {value:.3f}" for row, value in rows]
    return "\n".join(lines)


def _reward_suite(path: str | None) -> tuple[list[str], dict[str, Any]]:
    """``data.eval_rewards`` and ``data.reward_options`` of a YAML config fragment."""
    if not path:
        return [], {}
    config = read_yaml_option(path, "--reward-suite") or {}
    data = config.get("data") if isinstance(config, dict) else None
    names = (data or {}).get("eval_rewards")
    options = (data or {}).get("reward_options") or {}
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UsageError(f"--reward-suite: {path} needs data.eval_rewards, a list of reward names")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise UsageError(f"--reward-suite: {path}: data.reward_options must map reward names to option mappings")
    return names, options


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorsParser(
        prog="python -m dgpo_lightning.evaluate",
        description="Held-out evaluation of a text-to-image backbone on a prompt file, with any rewards.",
        allow_abbrev=False,
    )
    parser.add_argument("--prompts", required=True, help="prompt file: GenEval-format .jsonl or plain text (one prompt a line)")
    parser.add_argument("--backbone", default="world", help="backbone kind: world (default), sd3, or a registered one")
    parser.add_argument("--model", default=None, help="checkpoint / pipeline directory (world default: the shipped base)")
    parser.add_argument("--backbone-options", default=None, help='JSON object of backbone options, e.g. \'{"resolution": 512}\'')
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory exported by training (<run>/final/adapter)")
    parser.add_argument("--device", default=None, help="device to evaluate on (default: where the backbone loads, the CPU)")
    parser.add_argument(
        "--reward", action="append", default=None, metavar="NAME", help="reward to score with (repeatable; default: geneval)"
    )
    parser.add_argument(
        "--reward-options", default=None, help='JSON object {reward: {option: value}}, e.g. \'{"clip_score": {"model_path": "/m/clip"}}\''
    )
    parser.add_argument(
        "--reward-suite", default=None, metavar="FILE.yaml",
        help="rewards from a config fragment: its data.eval_rewards and data.reward_options (e.g. experiments/eval/ood.yaml)",
    )
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images sampled per prompt (default 4)")
    parser.add_argument(
        "--min-images-per-task", type=int, default=0, help="more images per prompt for tasks with few prompts (default 0: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    parser.add_argument("--out", required=True, help="where to write the result JSON (the grid goes next to it as .png)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    parser.add_argument("--num-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--shift", type=float, default=None, help="schedule shift (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--noise-level", type=float, default=0.7, help="the SDE sampler's noise level a")
    parser.add_argument("--batch-size", type=int, default=64, help="images sampled and scored at once (numbers do not change)")
    parser.add_argument("--grid-per-task", type=int, default=4, help="images per task row of the grid (default 4)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> tuple[EvalResult, dict[str, Any]]:
    """Load, evaluate and write; user errors raise :class:`UsageError`."""
    from dgpo_lightning.data.validation import validate_prompt_file, world_vocabulary
    from dgpo_lightning.models.factory import load_backbone
    from dgpo_lightning.rewards.base import build

    if args.backbone != "world" and not args.model:
        raise UsageError(f"--backbone {args.backbone} needs --model PATH (a local pipeline directory or cached hub id)")
    suite_names, suite_options = _reward_suite(args.reward_suite)
    if args.backbone != "world" and not (args.reward or suite_names):
        # The default GenEval reads images with the embedded world's detector: meaningless elsewhere.
        raise UsageError(f"--backbone {args.backbone}: name the reward(s) with --reward NAME or --reward-suite FILE")
    reward_names = list(dict.fromkeys((args.reward or []) + suite_names)) or ["geneval"]
    reward_options = {**suite_options, **json_object_option(args.reward_options, "--reward-options")}
    unused = sorted(set(reward_options) - set(reward_names))
    if unused:
        raise UsageError(f"--reward-options names reward(s) {unused} that no --reward asks for")
    try:
        settings = SamplerSettings(
            args.sampler, args.num_steps, args.shift, args.guidance_scale, noise_level=args.noise_level
        )
        # The validation every entry point shares (data/validation.py), before any model loads.
        records = validate_prompt_file(
            args.prompts, key="--prompts", rewards=reward_names, reward_options=reward_options,
            vocabulary=world_vocabulary(args.model) if args.backbone == "world" else None,
        ).records
        rewards = {name: build(name, **dict(reward_options.get(name) or {})) for name in reward_names}
        backbone = load_backbone(args.backbone, args.model, **json_object_option(args.backbone_options, "--backbone-options"))
        if args.device:
            backbone = backbone.to(args.device)
        if args.adapter:
            from dgpo_lightning.models.lora import load_adapter

            load_adapter(backbone, args.adapter)
        backbone.eval()
    except (ValueError, FileNotFoundError, OSError, TypeError) as error:
        # TypeError: an option the backbone or a reward does not take.
        raise UsageError(str(error)) from error
    try:
        result = evaluate(
            backbone,
            records,
            rewards,
            settings,
            images_per_prompt=args.images_per_prompt,
            min_images_per_task=args.min_images_per_task,
            seed=args.seed,
            batch_size=args.batch_size,
            examples_per_task=args.grid_per_task,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        # Rewards load their weights on first call: a missing model path surfaces here.
        raise UsageError(str(error)) from error
    primary = result.summary[reward_names[0]]
    resolved = result.settings
    output = {
        **primary,
        "rewards": result.summary,
        "run": {
            "prompts": str(args.prompts),
            "backbone": args.backbone,
            "model": args.model,
            "adapter": args.adapter,
            "seed": args.seed,
            "images_per_prompt": args.images_per_prompt,
            "min_images_per_task": args.min_images_per_task,
            "images": len(result.prompts),
            "sampler": resolved.sampler,
            "num_steps": resolved.num_steps,
            "shift": resolved.shift,
            "guidance_scale": resolved.guidance_scale,
            **({"noise_level": resolved.noise_level} if resolved.stochastic else {}),
        },
        "per_image": result.per_image(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
    if result.examples is not None:
        save_grid(result.examples, out.with_suffix(".png"), per_task=args.grid_per_task, reward=reward_names[0])
    return result, output


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command line; returns the written JSON as a dict (exits with status 2 on a user error).

    With ``--protocol`` (``paper`` or a protocol YAML) the arguments go to
    :func:`dgpo_lightning.benchmark.main`: a table of models x benchmark columns."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--protocol" or a.startswith("--protocol=") for a in arguments):
        from dgpo_lightning.benchmark import main as benchmark_main

        return benchmark_main(arguments)
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        result, output = run(args)
    except UsageError as error:
        parser.exit(2, "error: " + " ".join(str(error).split()) + "\n")
    per_task = f", at least {args.min_images_per_task} per task" if args.min_images_per_task else ""
    model = args.model or ("shipped base" if args.backbone == "world" else "")
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(
        f"{len(set(result.record_index))} prompts x {args.images_per_prompt} images{per_task}, seed {args.seed}, "
        f"{args.backbone} model {model}{adapter}"
    )
    for name, summary in result.summary.items():
        print(format_table(summary, name))
    out = Path(args.out)
    print(f"written to {out}" + (f" and {out.with_suffix('.png')}" if result.examples is not None else ""))
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
