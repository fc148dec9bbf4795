"""Pretrain the video world's flow model on freshly rendered clips.

``python -m dgpo_lightning.world.video.pretrain --out DIR [--minutes M] [--steps N] [--caption-noise P]``

As :mod:`dgpo_lightning.world.pretrain` for images: every step draws a batch of TRAIN records (task
uniformly, then a record of it), renders a fresh random clip for each
(:func:`~dgpo_lightning.world.video.scene.render_prompt`) and takes one AdamW step on the
rectified-flow loss ``E ‖v_θ(x_t, t, c) − (ε − x0)‖²``, ``x_t = (1 − t) x0 + t ε``, ``t ~ U[0, 1]``,
with 10% caption dropout (CFG). UNet and text encoder train jointly; an EMA of the weights is what is
saved (``DIR``, :func:`~dgpo_lightning.world.video.backbone.save_backbone`) with ``pretrain.json``.
With ``--caption-noise P`` a fraction P of the clips is drawn for a corrupted record
(:func:`~dgpo_lightning.world.video.scene.corrupt_metadata`) under the original caption, the image
base's stage-2 recipe. With ``--frame-levels P`` (a ``frame_levels`` model) a fraction P of the
clips has one frame noised less than the other (:func:`frame_levels_loss`); ``--coordinates`` adds
the row/column input channels. The EMA model is evaluated periodically on ``--eval-split``
(validation by default) and at the end on it and the test split (:func:`heldout_eval`: strict
``world_video`` reward, 10-step DPM-Solver++ ODE, fixed seeds).

With ``--init-image`` (``base``: the shipped image-world base) the model starts from an image-world
checkpoint (:func:`init_from_image_model`): every frame starts as the image model's drawing (each
frame an independent image of the prompt), so pretraining has to learn motion, cross-frame
agreement and the video words, not how to draw shapes.

This module sits in the world layer, below the data/evaluation layers, so it reads the prompt files
with :func:`~dgpo_lightning.world.video.prompts.read_records` and samples with the pure samplers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from dgpo_lightning.algo.flow import denoising_error, velocity_target
from dgpo_lightning.world import training as world_training
from dgpo_lightning.world.training import PretrainingState, TaskBalancedPrompts, flow_matching_loss
from dgpo_lightning.sampling.noise import initial_noise
from dgpo_lightning.sampling.ode import ode_dpm
from dgpo_lightning.sampling.schedule import flow_sigmas
from dgpo_lightning.world.video.backbone import build_backbone, load_backbone, save_backbone
from dgpo_lightning.world.video.prompts import read_records
from dgpo_lightning.world.video.reward import VideoWorldReward
from dgpo_lightning.world.video.scene import corrupt_metadata, render_prompt

TRAIN_STATE = "train_state.pt"


def render_batch(records: Sequence[dict], generator: torch.Generator, caption_noise: float = 0.0) -> torch.Tensor:
    """Fresh clips ``[B, F, 3, 32, 32]``; with probability ``caption_noise`` a record is corrupted first."""
    return world_training.render_batch(records, generator, caption_noise, render=render_prompt, corrupt=corrupt_metadata)


def draw_frame_levels(batch: int, frames: int, uneven: float, generator: torch.Generator) -> torch.Tensor:
    """Noise levels ``[B, F]``: ``t ~ U[0, 1]`` for every frame of a clip; with probability ``uneven``
    one frame of the clip (uniformly chosen) gets ``u · t`` instead, ``u ~ U[0, 1]``."""
    t = torch.rand(batch, generator=generator)
    levels = t[:, None].repeat(1, frames)
    chosen = torch.rand(batch, generator=generator) < uneven
    frame = torch.randint(frames, (batch,), generator=generator)
    lower = torch.rand(batch, generator=generator) * t
    rows = torch.nonzero(chosen).flatten()
    levels[rows, frame[rows]] = lower[rows]
    return levels


def frame_levels_loss(backbone, videos: torch.Tensor, prompts: Sequence[str], generator: torch.Generator, uneven: float) -> torch.Tensor:
    """Mean ``‖v_θ(x_L, L, c) − (ε − x0)‖²`` with per-frame levels ``L [B, F]``
    (:func:`draw_frame_levels`) and ``x_L[:, :, f] = (1 − L_f) x0[:, :, f] + L_f ε[:, :, f]``: the
    rectified-flow target ``ε − x0`` does not depend on the level, so frames at different levels share
    one loss (diffusion forcing). ``uneven = 0`` is :func:`~dgpo_lightning.world.training.flow_matching_loss`'s
    objective (a different draw order)."""
    x0 = backbone.encode(videos)  # [B, 3, F, H, W]
    noise = torch.randn(x0.shape, generator=generator)
    levels = draw_frame_levels(x0.shape[0], x0.shape[2], uneven, generator)
    per_frame = levels[:, None, :, None, None]  # broadcast over channels and pixels
    x_t = (1 - per_frame) * x0 + per_frame * noise
    v = backbone.frame_velocity(x_t, levels, backbone.encode_prompts(list(prompts)))
    return denoising_error(v, velocity_target(x0, noise)).mean()


@torch.no_grad()
def sample_videos(backbone, prompts: Sequence[str], seeds: Sequence[int], *, num_steps: int = 10, guidance_scale: float = 1.0) -> torch.Tensor:
    """Videos ``[B, F, 3, H, W]``: 10-step DPM-Solver++ ODE at the backbone's shift, noise from ``seeds``."""
    cond = backbone.encode_prompts(list(prompts))
    x = initial_noise(backbone.latent_shape(), list(seeds))
    sigmas = flow_sigmas(num_steps, shift=backbone.shift)
    out = ode_dpm(lambda x_t, t: backbone.velocity(x_t, t, cond, guidance_scale), x, sigmas)
    return backbone.decode(out.sample)


@torch.no_grad()
def heldout_eval(
    backbone, split: str = "test", *, samples_per_prompt: int = 16, seed: int = 1234, guidance_scale: float = 1.0, batch: int = 16
) -> dict[str, float]:
    """Strict ``world_video`` accuracy per task on ``split``, ``overall`` = mean over tasks (GenEval's
    convention), and ``partial`` = the graded reward's mean over all clips."""
    records = read_records(split)
    strict, graded = VideoWorldReward(), VideoWorldReward(partial=True)
    items = [(r, seed + 1000 * i + k) for i, r in enumerate(records) for k in range(samples_per_prompt)]
    by_task: dict[str, list[float]] = {}
    partial: list[float] = []
    backbone.eval()
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        metas = [r for r, _ in chunk]
        prompts = [r["prompt"] for r in metas]
        videos = sample_videos(backbone, prompts, [s for _, s in chunk], guidance_scale=guidance_scale)
        for record, score in zip(metas, strict(videos, prompts, metas).tolist()):
            by_task.setdefault(record["tag"], []).append(score)
        partial += graded(videos, prompts, metas).tolist()
    summary = {tag: sum(v) / len(v) for tag, v in sorted(by_task.items())}
    summary["overall"] = sum(summary.values()) / len(summary)
    summary["partial"] = sum(partial) / len(partial)
    return summary


def _copy_unet(target: torch.nn.Module, source: torch.nn.Module, *, zero_missing: tuple[str, ...]) -> dict[str, int]:
    """Copy ``source``'s UNet weights into ``target``'s: equal shapes are copied; an input convolution
    taking more channels gets the source's weights on the first ones and zeros on the rest (so the new
    inputs start with no effect); tensors the source lacks whose names start with ``zero_missing``
    start at zero. Anything else is an architecture mismatch. Returns ``copied`` / ``zeroed`` counts."""
    weights = source.state_dict()
    counts = {"copied": 0, "zeroed": 0}
    for name, value in target.state_dict().items():
        given = weights.get(name)
        if given is not None and given.shape == value.shape:
            value.copy_(given)
            counts["copied"] += 1
        elif name == "conv_in.weight" and given is not None and value.shape[0] == given.shape[0] and value.shape[1] > given.shape[1]:
            value.zero_()
            value[:, : given.shape[1]] = given
            counts["zeroed"] += 1
        elif given is None and name.startswith(zero_missing):
            value.zero_()
            counts["zeroed"] += 1
        else:
            shape = "missing" if given is None else tuple(given.shape)
            raise ValueError(f"{name}: {shape} in the source, {tuple(value.shape)} here (the architectures differ)")
    return counts


@torch.no_grad()
def init_from_video_model(video, source) -> dict[str, int]:
    """Copy a video backbone's weights into ``video`` (same widths), whose input convolution may take
    more channels (e.g. a ``frame_levels`` model from a plain canvas one): the extra ones start at
    zero, so ``video`` starts as ``source`` at equal levels. Returns counts of ``copied`` / ``zeroed``."""
    if (video.layout, video.patch_size, video.num_frames) != (source.layout, source.patch_size, source.num_frames):
        raise ValueError(
            f"layouts differ: {(video.layout, video.patch_size, video.num_frames)} vs "
            f"{(source.layout, source.patch_size, source.num_frames)} (layout, patch size, frames)"
        )
    if source.coordinates and ((video.frame_levels and not source.frame_levels) or not video.coordinates):
        raise ValueError("the source's input channels must be a prefix of the target's (levels come before coordinates)")
    counts = _copy_unet(video.denoiser, source.denoiser, zero_missing=())
    video.text_encoder.load_state_dict(source.text_encoder.state_dict())
    return counts


@torch.no_grad()
def init_from_image_model(video, image) -> dict[str, int]:
    """Copy an image-world backbone's weights into a video backbone of the same widths.

    UNet tensors of equal shape are copied; the input convolution takes the image's weights on the
    frame's own channels and zeros on the extra ones (the mean frame of the ``factorised`` layout, the
    position channel of ``canvas``), and the frame embedding starts at zero, so at the start every
    frame's velocity is the image model's (``factorised``) or the canvas's is (``canvas``). The text encoder copies its
    layers, positions and the embeddings of the words both vocabularies have. Returns counts of
    ``copied`` / ``zeroed`` tensors and ``words`` shared.
    """
    if image.patch_size != video.patch_size:
        raise ValueError(f"patch sizes differ: image {image.patch_size}, video {video.patch_size}")
    counts = {**_copy_unet(video.denoiser, image.denoiser, zero_missing=("class_embedding.",)), "words": 0}
    image_text, video_text = image.text_encoder.state_dict(), video.text_encoder.state_dict()
    for name, value in video_text.items():
        if name == "token_embedding.weight":
            for word, row in video.text_encoder.index.items():
                if word in image.text_encoder.index:
                    value[row] = image_text[name][image.text_encoder.index[word]]
                    counts["words"] += 1
        elif image_text[name].shape == value.shape:
            value.copy_(image_text[name])
        else:
            raise ValueError(f"text encoder {name}: image {tuple(image_text[name].shape)} vs video {tuple(value.shape)}")
    return counts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dgpo_lightning.world.video.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory of the EMA checkpoint")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training loop")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: until --minutes; 2000 if neither)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--decay-steps", type=int, default=0, help="with --steps: decay the lr linearly to 10%% over the last N steps")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--caption-noise", type=float, default=0.0, help="probability that a clip is drawn from a corrupted record")
    parser.add_argument("--channels", default=None, help="UNet block_out_channels (default: the shipped 32,64,64)")
    parser.add_argument("--layout", choices=("factorised", "canvas"), default="factorised", help="how the denoiser sees a clip (backbone.LAYOUTS)")
    parser.add_argument(
        "--frame-levels", type=float, default=None, metavar="P",
        help="build a frame_levels model and noise one frame of a clip less than the other with probability P",
    )
    parser.add_argument("--coordinates", action="store_true", help="build a model with row/column input channels (backbone docstring)")
    parser.add_argument("--eval-split", default="validation", help="prompt split of the periodic held-out evaluations")
    parser.add_argument("--eval-minutes", type=float, default=5.0, help="held-out evaluation/save cadence")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt in the periodic evaluations")
    parser.add_argument("--final-samples", type=int, default=16, help="samples per held-out prompt in the final evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default=None, help="start from this video checkpoint's weights ('base': the shipped one; fresh optimizer; extra input channels start at zero)")
    parser.add_argument("--init-image", default=None, help="start from an image-world checkpoint ('base': the shipped one)")
    parser.add_argument("--resume", action="store_true", help=f"continue from DIR/{TRAIN_STATE}")
    args = parser.parse_args(argv)
    if not 0.0 <= args.caption_noise < 1.0:
        parser.error(f"--caption-noise must be in [0, 1), got {args.caption_noise}")
    if args.frame_levels is not None and not 0.0 <= args.frame_levels <= 1.0:
        parser.error(f"--frame-levels must be a probability in [0, 1], got {args.frame_levels}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_steps = args.steps if args.steps is not None else (None if args.minutes else 2000)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf
    unet = {"block_out_channels": tuple(int(c) for c in args.channels.split(","))} if args.channels else None
    model = build_backbone(unet=unet, layout=args.layout, frame_levels=args.frame_levels is not None, coordinates=args.coordinates)
    if args.init:
        source = load_backbone(None if args.init == "base" else args.init)
        print(f"initialised from the video model: {init_from_video_model(model, source)}", flush=True)
    elif args.init_image:
        from dgpo_lightning.world.backbone import load_backbone as load_image_backbone

        image = load_image_backbone(None if args.init_image == "base" else args.init_image)
        print(f"initialised from the image model: {init_from_image_model(model, image)}", flush=True)
    model.train()
    state = PretrainingState(
        model, lr=args.lr, warmup=args.warmup, ema_decay=args.ema, seed=args.seed,
        max_steps=max_steps, decay_steps=args.decay_steps,
    )
    ema, generator = state.ema, state.generator
    n_unet = sum(p.numel() for p in model.denoiser.parameters())
    print(f"UNet {n_unet / 1e6:.2f}M params; threads {torch.get_num_threads()}", flush=True)
    prompts = TaskBalancedPrompts(read_records("train"), generator)
    if args.resume and state.resume(out / TRAIN_STATE):
        print(f"resumed from step {state.step} ({state.minutes_before:.1f} min)", flush=True)
    start = time.monotonic()

    def checkpoint(samples: int, splits: Sequence[str]) -> None:
        train_minutes = state.minutes_before + (time.monotonic() - start) / 60
        entry = {"step": state.step, "minutes": train_minutes, "loss": state.loss_avg, "samples_per_prompt": samples}
        for split in splits:
            result = heldout_eval(ema, split, samples_per_prompt=samples)
            entry["heldout" if split == "test" else split] = result
            print(f"[step {state.step}, {train_minutes:.1f} min, loss {state.loss_avg:.4f}] {split} ({samples}/prompt): "
                  + "  ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)
        state.history.append(entry)
        save_backbone(ema, out)
        state.save(out / TRAIN_STATE, train_minutes)
        info = {"args": vars(args), "steps": state.step, "minutes": train_minutes, "history": state.history}
        (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    next_eval = time.monotonic() + 60 * args.eval_minutes
    while (max_steps is None or state.step < max_steps) and time.monotonic() < deadline:
        records = prompts.draw(args.batch_size)
        texts = [r["prompt"] if float(torch.rand((), generator=generator)) >= args.caption_dropout else "" for r in records]
        videos = render_batch(records, generator, args.caption_noise)
        if args.frame_levels is None:
            state.update(flow_matching_loss(model, videos, texts, generator))
        else:
            state.update(frame_levels_loss(model, videos, texts, generator, args.frame_levels))
        if state.step % 100 == 0:
            print(f"step {state.step} loss {state.loss_avg:.4f} ({(time.monotonic() - start) / 60:.1f} min)", flush=True)
        if time.monotonic() >= next_eval:
            checkpoint(args.eval_samples, [args.eval_split])
            model.train()
            next_eval = time.monotonic() + 60 * args.eval_minutes
    checkpoint(args.final_samples, sorted({args.eval_split, "test"}, key=lambda split: split != args.eval_split))
    print(f"done: {state.step} steps; EMA checkpoint in {out}", flush=True)


if __name__ == "__main__":
    main()
