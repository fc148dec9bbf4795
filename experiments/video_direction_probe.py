"""Does a video-world model use the direction word? Two measurements of one checkpoint.

- **Loss probe**: the flow-matching loss on ``--clips`` rendered clips of one record ("a video of a
  green circle moving right"), with fixed noise and times, under the true caption, the opposite
  direction, another colour and the empty caption. A model that uses a word pays for swapping it.
- **Positions**: over ``--seeds`` samples (10-step DPM-Solver++ ODE) of the same object moving each
  way, the detected object's mean centre in the first and last frame. The training clips put it one
  cell (10.7 px) further along the named direction in the last frame.

``python experiments/video_direction_probe.py [--model DIR]`` (default: the shipped video base) prints
both and writes ``--out`` as JSON when given; about a minute on one CPU thread. This is what the video
base's model card reports in "Why it does not move objects as told".
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dgpo_lightning.algo.flow import denoising_error, flow_interpolate, velocity_target
from dgpo_lightning.world.detector import detect_batch
from dgpo_lightning.world.video.backbone import load_backbone
from dgpo_lightning.world.video.pretrain import sample_videos
from dgpo_lightning.world.video.scene import DIRECTIONS, render_prompt

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def record(colour: str, cls: str, direction: str) -> dict:
    return {
        "tag": "color_motion", "motion": direction, "include": [{"class": cls, "count": 1, "color": colour}],
        "prompt": f"a video of a {colour} {cls} moving {direction}",
    }


@torch.no_grad()
def loss_probe(backbone, *, colour: str = "green", other_colour: str = "blue", cls: str = "circle", direction: str = "right",
               clips: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean ``‖v(x_t, t, caption) − (ε − x0)‖²`` on the same clips, noise and times under four captions."""
    generator = torch.Generator().manual_seed(seed)
    truth = record(colour, cls, direction)
    videos = torch.stack([render_prompt(truth, generator) for _ in range(clips)])
    x0 = backbone.encode(videos)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(clips, generator=generator)
    x_t = flow_interpolate(x0, noise, t)
    captions = {
        "true caption": truth["prompt"],
        "opposite direction": record(colour, cls, OPPOSITE[direction])["prompt"],
        "other colour": record(other_colour, cls, direction)["prompt"],
        "empty caption": "",
    }
    return {
        name: float(denoising_error(backbone.velocity(x_t, t, backbone.encode_prompts([text] * clips)), velocity_target(x0, noise)).mean())
        for name, text in captions.items()
    }


@torch.no_grad()
def mean_positions(backbone, *, colour: str = "green", cls: str = "circle", seeds: int = 32) -> dict[str, dict[str, float]]:
    """Per direction: the detected object's mean centre ``x``/``y`` (pixels) in the first and last frame."""
    result = {}
    for direction in DIRECTIONS:
        videos = sample_videos(backbone, [record(colour, cls, direction)["prompt"]] * seeds, list(range(seeds)))
        frames = videos.shape[1]
        detections = detect_batch(videos.reshape(-1, *videos.shape[2:]))
        centres: dict[int, list[tuple[float, float]]] = {0: [], frames - 1: []}
        for index, found in enumerate(detections):
            frame = index % frames
            if frame in centres:
                centres[frame] += [((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2) for d in found if d.cls == cls]
        result[direction] = {
            f"{axis}{frame}": statistics.mean(c[i] for c in points) if points else float("nan")
            for frame, points in ((0, centres[0]), (frames - 1, centres[frames - 1]))
            for i, axis in enumerate("xy")
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="video checkpoint directory (default: the shipped base)")
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model)
    result = {"loss": loss_probe(backbone, clips=args.clips), "positions": mean_positions(backbone, seeds=args.seeds)}
    for name, value in result["loss"].items():
        print(f"loss, {name:<20s} {value:.6f}")
    for direction, centre in result["positions"].items():
        print(f"{direction:<6s} " + "  ".join(f"{k} {v:5.1f}" for k, v in centre.items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
