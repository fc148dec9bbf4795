"""Throughput of 10-step rollouts: ODE Euler vs ODE DPM-Solver++ vs Flow-GRPO's SDE, from one run.

Runs on the embedded world model (``dgpo_lightning.world.backbone.load_backbone``) when it can be
imported; without its shipped checkpoint it uses the same architecture with random weights (speed
does not depend on the weights). Without the world package it falls back to a small diffusers
``UNet2DConditionModel`` (32×32, 3 channels) built in code. Not a test: numbers depend on the machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_samplers.py [--batch-size 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from dgpo_lightning.sampling import flow_sigmas, get_sampler, initial_noise
from dgpo_lightning.sampling.seeds import sde_noise_seeds

PROMPT = "a photo of a red circle and a blue square"


def world_model(path: str | None, device: str, guidance_scale: float | None):
    """``(velocity_fn factory, latent shape, description)`` for the embedded world, or ``None``."""
    try:
        from dgpo_lightning.world.backbone import build_backbone, load_backbone
    except ImportError:
        return None
    try:
        backbone = load_backbone(path, device=device)
        what = f"embedded world model ({path or 'shipped base checkpoint'})"
    except FileNotFoundError:
        backbone = build_backbone().to(device).eval().requires_grad_(False)
        what = "embedded world architecture, random weights (no checkpoint found)"
    scale = backbone.default_guidance_scale if guidance_scale is None else guidance_scale

    def make(batch: int) -> Callable:
        cond = backbone.encode_prompts([PROMPT] * batch)
        return lambda x, t: backbone.velocity(x, t, cond, guidance_scale=scale)

    params = sum(p.numel() for p in backbone.denoiser.parameters())
    return make, backbone.latent_shape(), f"{what}; denoiser {params / 1e6:.2f} M params, CFG {scale}"


def fallback_unet(device: str):
    """A small random text-conditional diffusers UNet on 3×32×32 images."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=8,
    ).to(device).eval().requires_grad_(False)
    text = torch.randn(1, 8, 64, device=device)

    def make(batch: int) -> Callable:
        cond = text.expand(batch, -1, -1)
        return lambda x, t: unet(x, 1000 * t, encoder_hidden_states=cond, return_dict=False)[0]

    params = sum(p.numel() for p in unet.parameters())
    return make, (3, 32, 32), f"random diffusers UNet2DConditionModel 3x32x32 ({params / 1e6:.2f} M params)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", nargs="+", default=["ode_euler", "ode_dpm", "sde"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts per sampler (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="world checkpoint dir (default: the shipped base)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = world_model(args.model, args.device, args.guidance_scale) or fallback_unet(args.device)
    make_velocity, shape, what = model
    model_fn = make_velocity(args.batch_size)
    model_seconds = [0.0]
    cuda = args.device.startswith("cuda")

    def velocity_fn(x, t):
        # time the model calls so the sampler's own overhead (total − model) is reported too
        start = time.perf_counter()
        v = model_fn(x, t)
        if cuda:
            torch.cuda.synchronize()
        model_seconds[0] += time.perf_counter() - start
        return v
    sigmas = flow_sigmas(args.steps, shift=3.0, device=args.device)
    seeds = list(range(args.batch_size))

    def rollout(name: str) -> tuple[float, float]:
        """``(seconds, seconds outside the model)`` of one rollout, initial noise included."""
        kwargs = {"noise_seeds": sde_noise_seeds(seeds)} if name == "sde" else {}
        if cuda:
            torch.cuda.synchronize()
        model_seconds[0] = 0.0
        start = time.perf_counter()
        x = initial_noise(shape, seeds, device=args.device)
        get_sampler(name)(velocity_fn, x, sigmas, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - start
        return total, total - model_seconds[0]

    results = {}
    with torch.inference_mode():
        for name in args.samplers:
            rollout(name)  # warm-up
        # interleave the samplers so drifts in machine load hit all of them alike
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in args.samplers}
        for _ in range(args.repeats):
            for name in args.samplers:
                times[name].append(rollout(name))
    for name in args.samplers:
        seconds = statistics.median(t for t, _ in times[name])
        overhead = statistics.median(o for _, o in times[name])
        results[name] = {
            "images_per_s": args.batch_size / seconds,
            "ms_per_step": 1000 * seconds / args.steps,
            "seconds_per_batch": seconds,
            "sampler_overhead_ms": 1000 * overhead,
        }

    print(f"model: {what}")
    print(f"device: {args.device} ({torch.get_num_threads()} CPU threads), batch {args.batch_size}, "
          f"{args.steps} steps (shift 3), median of {args.repeats}")
    print(f"{'sampler':<10} {'images/s':>10} {'ms/step':>10} {'s/batch':>10} {'vs ode_euler':>13} {'overhead ms':>12}")
    base = results.get("ode_euler", next(iter(results.values())))["images_per_s"]
    for name, r in results.items():
        print(f"{name:<10} {r['images_per_s']:>10.1f} {r['ms_per_step']:>10.2f} {r['seconds_per_batch']:>10.3f} "
              f"{r['images_per_s'] / base:>12.2f}x {r['sampler_overhead_ms']:>12.1f}")
    print("overhead = time outside the model calls per rollout (noise, sampler arithmetic, log-probs)")
    out = {"model": what, "device": args.device, "batch_size": args.batch_size, "steps": args.steps, "results": results}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
