"""Pretrain the embedded world's flow model on freshly rendered scenes.

``python -m dgpo_lightning.world.pretrain --out DIR [--minutes M] [--steps N] [--seed S]``

Every step draws a batch of TRAIN prompt records (task first, uniformly, then a record of that
task), renders a fresh random scene for each (:func:`~dgpo_lightning.world.scene.render_prompt`) and
takes one AdamW step on the rectified-flow (flow-matching) loss

    L = E_{x0, ε, t} ‖v_θ(x_t, t, c) − (ε − x0)‖²,   x_t = (1 − t) x0 + t ε,   t ~ U[0, 1],

with the caption replaced by the empty prompt with probability ``caption_dropout`` (for CFG). The
UNet and the text encoder train jointly. An exponential moving average of the weights is kept and
is what gets saved (``DIR`` via :func:`~dgpo_lightning.world.backbone.save_backbone`), together with
``pretrain.json`` (arguments, steps, time, evaluation history). Periodically the EMA model is
evaluated on the held-out TEST prompts with a 10-step DPM-Solver++ ODE.

With ``--caption-noise P`` a fraction P of the scenes is drawn for a corrupted record
(:func:`~dgpo_lightning.world.scene.corrupt_metadata`: one attribute off) under the original caption.

Run time: ≈ 0.23 s per batch-32 step on one CPU thread. The shipped base is a clean stage
(reproduced approximately by ``--steps 6400 --decay-steps 2500``, about 25 minutes) followed by a
noisy-caption stage (``--init CLEAN --caption-noise 0.4 --steps 1200 --decay-steps 400``, about 5
minutes); see ``checkpoints/base/MODEL_CARD.md``. The detector starts accepting the drawn shapes
after ≈ 2000 clean steps and held-out overall reaches ≈ 0.5 after 4000-5000.

Held-out prompts are never trained on: the training records come from ``prompts/train.jsonl``,
whose class/colour/count/relation combinations exclude the test split's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from dgpo_lightning.data.prompts import read_prompt_file
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import build_backbone, save_backbone
from dgpo_lightning.world.scene import validate_metadata
from dgpo_lightning.world.training import PretrainingState, TaskBalancedPrompts, flow_matching_loss, render_batch  # noqa: F401  (re-exported)


def world_records(spec: str | Path) -> list[dict]:
    """The records of a GenEval prompt file in file order (``"world:train"``/``"world:validation"``/``"world:test"``: the shipped
    splits), read by the data layer's reader (:func:`~dgpo_lightning.data.prompts.read_prompt_file`)
    and each checked with :func:`~dgpo_lightning.world.scene.validate_metadata`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON, a record is not a scene this world can draw, or the file
            holds no prompts; the message names ``file:line``.
    """
    prompts = read_prompt_file(spec)
    for index, record in enumerate(prompts.records):
        validate_metadata(record, where=prompts.where(index))
    return prompts.records


#: Full training state (online weights, EMA, optimizer) written next to the EMA checkpoint for --resume.
TRAIN_STATE = "train_state.pt"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dgpo_lightning.world.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory of the EMA checkpoint")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default: no limit)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: until --minutes; 2000 if neither)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    parser.add_argument("--decay-steps", type=int, default=0, help="with --steps: decay the lr linearly to 10%% over the last N steps")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--caption-noise",
        type=float,
        default=0.0,
        help="probability that a scene is drawn from a corrupted record (scene.corrupt_metadata) under the original caption",
    )
    parser.add_argument("--channels", default="32,64,64", help="UNet block_out_channels")
    parser.add_argument("--down", default="DownBlock2D,CrossAttnDownBlock2D,CrossAttnDownBlock2D", help="UNet down block types")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--mid-block", action="store_true", help="add the UNet's cross-attention mid block")
    parser.add_argument("--no-mid-block", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    parser.add_argument("--patch-size", type=int, default=2, help="pixel-unshuffle factor in front of the UNet")
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="default CFG scale stored in the checkpoint")
    parser.add_argument("--shift", type=float, default=3.0, help="recommended schedule shift stored in the checkpoint")
    parser.add_argument("--eval-minutes", type=float, default=3.0, help="held-out evaluation/save cadence")
    parser.add_argument("--eval-images", type=int, default=1, help="images per held-out prompt in the periodic evaluation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine OpenMP oversubscription slows 2 threads down many-fold)")
    parser.add_argument("--init", default=None, help="start from the weights of this world checkpoint (fresh optimizer)")
    parser.add_argument(
        "--resume", action="store_true", help=f"continue from DIR/{TRAIN_STATE} (weights, EMA, optimizer, step count)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.caption_noise < 1.0:
        parser.error(f"--caption-noise must be in [0, 1), got {args.caption_noise}")
    return args


def build_from_args(args: argparse.Namespace):
    channels = tuple(int(c) for c in args.channels.split(","))
    down = tuple(args.down.split(","))
    if len(down) != len(channels):
        raise SystemExit(f"--down has {len(down)} blocks but --channels {len(channels)}")
    up = tuple(reversed([name.replace("Down", "Up") for name in down]))
    unet = {
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": args.layers_per_block,
    }
    unet["mid_block_type"] = "UNetMidBlock2DCrossAttn" if args.mid_block else None
    heads = max(1, args.text_dim // 16)
    return build_backbone(
        unet=unet,
        text_encoder={"hidden_dim": args.text_dim, "num_layers": args.text_layers, "num_heads": heads},
        guidance_scale=args.guidance_scale,
        shift=args.shift,
        patch_size=args.patch_size,
    )


def heldout_eval(model, images_per_prompt: int, seed: int, guidance_scales: Sequence[float]) -> dict[str, Any]:
    """GenEval summary (``overall`` + per task) of ``model`` on the TEST prompts, per CFG scale."""
    from dgpo_lightning.evaluation import evaluate
    from dgpo_lightning.rewards.base import build

    records = world_records("world:test")
    rewards = {"geneval": build("geneval")}
    model.eval()
    out = {}
    for scale in guidance_scales:
        settings = SamplerSettings(guidance_scale=scale)
        result = evaluate(model, records, rewards, settings, images_per_prompt=images_per_prompt, seed=seed)
        out[f"cfg{scale:g}"] = result.summary["geneval"]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_steps = args.steps if args.steps is not None else (None if args.minutes else 2000)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf

    model = build_from_args(args)
    if args.init:
        from dgpo_lightning.world.backbone import load_backbone

        model.load_state_dict(load_backbone(args.init).state_dict())
    model.train()
    state = PretrainingState(
        model, lr=args.lr, warmup=args.warmup, ema_decay=args.ema, seed=args.seed,
        max_steps=max_steps, decay_steps=args.decay_steps, weight_decay=args.weight_decay,
    )
    ema, generator = state.ema, state.generator
    n_unet = sum(p.numel() for p in model.denoiser.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    print(f"UNet {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.3f}M params; threads {torch.get_num_threads()}")
    prompts = TaskBalancedPrompts(world_records("world:train"), generator)
    start = time.monotonic()
    next_eval = start + 60 * args.eval_minutes
    if args.resume and state.resume(out / TRAIN_STATE):
        print(f"resumed from step {state.step} ({state.minutes_before:.1f} min)")

    def checkpoint(final: bool = False) -> None:
        scales = sorted({1.0, args.guidance_scale, 2.0, 3.0}) if final else sorted({1.0, args.guidance_scale})
        result = heldout_eval(ema, args.eval_images, seed=1234, guidance_scales=scales)
        minutes = state.minutes_before + (time.monotonic() - start) / 60
        entry = {"step": state.step, "minutes": minutes, "loss": state.loss_avg, "heldout": result}
        state.history.append(entry)
        text = "  ".join(f"{k}: overall {v['overall']:.3f}" for k, v in result.items())
        detail = "  ".join(f"{k}={v:.2f}" for k, v in result[f"cfg{args.guidance_scale:g}"].items() if k != "overall")
        print(f"\n[step {state.step}, {minutes:.1f} min, loss {state.loss_avg:.4f}] held-out {text}\n    {detail}", flush=True)
        save_backbone(ema, out)
        state.save(out / TRAIN_STATE, minutes)
        info = {"args": vars(args), "steps": state.step, "minutes": minutes, "history": state.history}
        (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, unit="step", mininterval=5.0)
    while (max_steps is None or state.step < max_steps) and time.monotonic() < deadline:
        records = prompts.draw(args.batch_size)
        texts = [r["prompt"] if float(torch.rand((), generator=generator)) >= args.caption_dropout else "" for r in records]
        images = render_batch(records, generator, args.caption_noise)
        state.update(flow_matching_loss(model, images, texts, generator))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{state.loss_avg:.4f}", refresh=False)
        if time.monotonic() >= next_eval:
            checkpoint()
            model.train()
            next_eval = time.monotonic() + 60 * args.eval_minutes
    if progress is not None:
        progress.close()
    checkpoint(final=True)
    print(f"done: {state.step} steps in {state.history[-1]['minutes']:.1f} min; EMA checkpoint in {out}")


if __name__ == "__main__":
    main()
