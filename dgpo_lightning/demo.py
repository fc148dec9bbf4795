"""The main job on a laptop CPU: DGPO lifts the embedded world's held-out GenEval-style score.

``make demo`` runs ``python -m dgpo_lightning.demo``: it loads the shipped base checkpoint, evaluates
it on the held-out prompts, trains with DGPO on the CPU for the config's ``trainer.max_steps`` (at
most ``--minutes`` of training), evaluates again and prints both scores. Everything lands in
``runs/demo/``: TensorBoard logs (``tb/``; watch with ``tensorboard --logdir runs/demo``),
``score_vs_time.png``, ``eval_history.csv``, sample grids, the resolved ``config.yaml`` and the
trained model in ``final/`` (``python -m dgpo_lightning.evaluate --prompts
dgpo_lightning/world/prompts/test.jsonl --model runs/demo/final --out result.json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "base" / "world_demo.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=45.0,
        help="training-time cap (evaluation excluded); the config's trainer.max_steps ends the run first",
    )
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="LightningCLI config to run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args, overrides = parser.parse_known_args(argv)

    torch.set_num_threads(args.threads)
    from dgpo_lightning.cli import DGPOCLI

    out = Path(args.out)
    safety = int(args.minutes * 2 * 60)  # hard stop; the budget itself is checked at evaluations
    cli = DGPOCLI(
        args=[
            "--config", args.config,
            f"--trainer.default_root_dir={out}",
            f"--trainer.max_time={safety // 86400:02d}:{safety // 3600 % 24:02d}:{safety // 60 % 60:02d}:{safety % 60:02d}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.callbacks.init_args.max_training_minutes={args.minutes}",
            *overrides,
        ],
        run=False,
    )
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    history = next(cb for cb in trainer.callbacks if type(cb).__name__ == "ScoreHistory")
    history.dirpath = str(out)
    for callback in trainer.callbacks:
        if type(callback).__name__ == "ExportTrained":
            callback.dirpath = str(out / "final")

    start = time.perf_counter()
    module.configure_model()
    trainer.validate(module, data, verbose=False)
    before = dict(module.last_eval)
    trainer.fit(module, data)
    if history.rows[-1]["step"] != trainer.global_step:  # the time budget ended between evaluations
        trainer.validate(module, data, verbose=False)
    after = dict(module.last_eval)
    cli.parser.save(cli.config, out / "config.yaml", overwrite=True, skip_check=True)

    metric = history.metric
    print()
    # One row per logged score: each reward's task mean ("overall") and its tasks; the headline is marked.
    names = {key: key.removeprefix("eval/") + ("/overall" if key.count("/") == 1 else "") + (" *" if key == metric else "") for key in before}
    width = max(len(name) for name in names.values()) + 2
    print(f"{'score (* headline)':<{width}}{'before':>8}{'after':>8}")
    for key in sorted(before):
        print(f"{names[key]:<{width}}{before[key]:>8.3f}{after.get(key, float('nan')):>8.3f}")
    print(
        f"\nheld-out {metric}: {before[metric]:.3f} -> {after[metric]:.3f} "
        f"({after[metric] - before[metric]:+.3f}) in {(time.perf_counter() - start) / 60:.1f} min total; "
        f"model in {out / 'final'}, plot in {out / 'score_vs_time.png'}, logs: tensorboard --logdir {out}"
    )
    return {"before": before[metric], "after": after[metric]}


if __name__ == "__main__":
    main()
