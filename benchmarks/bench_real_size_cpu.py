"""SD3.5-Medium at its published size on the CPU, without weights: one rollout step and one DGPO LoRA
training step in bf16, with process peak memory (RSS) and seconds.

What is real: the transformer is diffusers' ``SD3Transformer2DModel`` with SD3.5-Medium's published
architecture (``benchmarks/bench_sd3_gpu.py``'s ``SD35_MEDIUM``: 24 MMDiT-X blocks, width 1536, 13
dual-attention blocks, 384² positional table), built directly in bf16 with random weights; the code
path is the package's (``SD3Backbone`` with true CFG, ``models.lora.add_lora`` at rank 64 / alpha 128
with fp32 adapters on SD3's 8 attention projections, diffusers' gradient checkpointing,
``DGPOModule.backward_step`` with the DGPO objective and the adapter-disabled reference, AdamW), built
by ``bench_sd3_gpu.py``'s own ``build_backbone`` / ``build_module``.

What is not: no text encoders (T5 and both CLIPs dropped; prompts become seeded random embeddings of
SD3's widths, ``[B, T, 4096]`` and pooled ``[B, 2048]``) and a tiny random VAE (never run). The image
side and the prompt length are cut (``--resolution``, ``--text-tokens``) because bf16 matrix products
are slow on CPUs without bf16 instructions; the weights, adapters and optimizer state are full size,
so the memory figures are, except for activations, what the real model needs.

* Rollout step: one CFG transformer pass for a group of G (``velocity(..., guidance_scale=4.5)``: the
  batch doubles to 2G rows), no grad.
* Training step: ``DGPOModule.backward_step`` on that group (K timesteps per sample, micro-batches of
  ``--micro-batch-size``), gradient clipping, AdamW step.
* Memory: per phase, the peak resident set since the phase began (Linux ``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``; ``null`` where that is not allowed), and the run's peak: the
  largest of those and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (which the reset lowers too);
  parameter, buffer, adapter and optimizer-state bytes.

    OMP_NUM_THREADS=2 python benchmarks/bench_real_size_cpu.py [--resolution 64] [--text-tokens 16]

Writes ``--out``.md/.json (default ``benchmarks/results/bench_real_size_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GIB = 2**30


def load_gpu_bench():
    """``benchmarks/bench_sd3_gpu.py`` as a module (its configs and builders)."""
    spec = importlib.util.spec_from_file_location("bench_sd3_gpu", HERE / "bench_sd3_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ memory


def max_rss_gib() -> float:
    """Peak resident set of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; ``False`` where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phase_peak(fn: Callable[[], Any]) -> tuple[float | None, float, Any]:
    """``(peak RSS GiB while fn ran or None, seconds, fn())``."""
    can_reset = reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    hwm = _status_kib("VmHWM") if can_reset else None
    return (None if hwm is None else hwm * 1024 / GIB), seconds, out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------- measuring


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = load_gpu_bench()
    from dgpo_lightning.algo import group_advantages
    from dgpo_lightning.objectives import GroupBatch

    torch.manual_seed(args.seed)
    load_start = os.getloadavg()[0]
    rss_start = max_rss_gib()
    overrides = {"num_layers": args.num_layers} if args.num_layers else None
    build_peak, build_seconds, backbone = phase_peak(
        lambda: bench.build_backbone(
            args.config, args.resolution, "cpu", torch.bfloat16, text_tokens=args.text_tokens, overrides=overrides
        )
    )
    denoiser = backbone.denoiser
    base_params = sum(p.numel() for p in denoiser.parameters())
    base_bytes = tensor_bytes(denoiser.parameters())
    buffer_bytes = tensor_bytes(denoiser.buffers())
    module, optimizer = bench.build_module(backbone, args)
    trainable = list(module.trainable_parameters())
    lora_bytes = tensor_bytes(trainable)
    G = args.group_size
    prompts = [bench.PROMPT] * G
    cond = backbone.encode_prompts(prompts)
    backbone.encode_prompts([backbone.negative_prompt])
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(G, *backbone.latent_shape(), generator=generator)
    t = torch.full((G,), 0.75)

    def rollout_step():
        module.eval()
        with torch.no_grad():
            return backbone.velocity(x, t, cond, guidance_scale=args.guidance_scale)

    rollout_peak, rollout_seconds, v = phase_peak(rollout_step)
    rewards = torch.rand(G, generator=generator)
    group_index = torch.zeros(G, dtype=torch.long)
    batch = GroupBatch(
        latents=x, prompts=prompts, advantages=group_advantages(rewards, group_index), rewards=rewards, group_index=group_index
    )

    def train_step():
        module.train()
        return bench.training_step(module, optimizer, batch)

    train_peak, train_seconds, loss = phase_peak(train_step)
    optimizer_bytes = tensor_bytes(v2 for state in optimizer.state.values() for v2 in state.values() if torch.is_tensor(v2))
    grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in trainable)
    config = {k: list(v2) if isinstance(v2, tuple) else v2 for k, v2 in dict(denoiser.config).items() if not k.startswith("_")}
    return {
        "config": args.config,
        "transformer_config": config,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bfloat16 base, float32 LoRA",
        "resolution": args.resolution,
        "latent_shape": list(backbone.latent_shape()),
        "image_tokens": (args.resolution // bench.VAE_SCALE_FACTOR // 2) ** 2,
        "text_tokens": backbone._pipe.text_tokens,
        "group_size": G,
        "rollout_rows": 2 * G if args.guidance_scale != 1.0 else G,
        "guidance_scale": args.guidance_scale,
        "timesteps_per_sample": args.timesteps_per_sample,
        "micro_batch_size": args.micro_batch_size or G,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank,
        "transformer_params": base_params,
        "transformer_params_with_pos_table": base_params + denoiser.pos_embed.pos_embed.numel(),
        "trainable_params": sum(p.numel() for p in trainable),
        "bytes": {
            "transformer_parameters": base_bytes,
            "transformer_buffers": buffer_bytes,
            "lora_parameters": lora_bytes,
            "lora_dtypes": sorted({str(p.dtype) for p in trainable}),
            "adamw_state": optimizer_bytes,
        },
        "seconds": {"build": build_seconds, "rollout_step": rollout_seconds, "train_step": train_seconds},
        "peak_rss_gib": {
            "process_start": rss_start,
            "build": build_peak,
            "rollout_step": rollout_peak,
            "train_step": train_peak,
            # Resetting VmHWM also resets what getrusage reports for this process, so the run's peak
            # is the largest of the phase peaks and the last ru_maxrss.
            "process": max([max_rss_gib(), rss_start] + [p for p in (build_peak, rollout_peak, train_peak) if p is not None]),
        },
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "rollout_velocity_finite": bool(torch.isfinite(v).all()),
        "loss": float(loss),
        "loss_finite": bool(torch.isfinite(loss)),
        "lora_grads_finite": bool(grads_finite),
    }


def markdown(r: dict[str, Any], command: str) -> str:
    b, s, m = r["bytes"], r["seconds"], r["peak_rss_gib"]

    def gib(value):
        return "n/a" if value is None else f"{value:.2f} GiB"

    return "\n".join([
        f"# {r['config']} at its published size on the CPU (bf16, random weights)",
        "",
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on **{r['device']}**, torch {r['torch']}, with",
        f"`{command}`.",
        "",
        f"- transformer: `SD3Transformer2DModel`, {r['transformer_params'] / 1e9:.3f} B parameters "
        f"({r['transformer_params_with_pos_table'] / 1e9:.3f} B with the positional table, the released count), "
        f"{r['transformer_config']['num_layers']} blocks, width "
        f"{r['transformer_config']['num_attention_heads'] * r['transformer_config']['attention_head_dim']}; {r['dtype']}",
        f"- LoRA rank {r['lora_rank']}, alpha {r['lora_alpha']}: {r['trainable_params'] / 1e6:.1f} M trainable "
        f"({', '.join(b['lora_dtypes'])}); gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}",
        f"- reduced sizes for CPU time: {r['resolution']}² images → latents {'×'.join(map(str, r['latent_shape']))} "
        f"({r['image_tokens']} image tokens), {r['text_tokens']} text tokens (random embeddings of width {r['transformer_config']['joint_attention_dim']}; "
        "the real pipeline feeds 77 + 256)",
        f"- rollout step: one CFG {r['guidance_scale']} transformer pass for a group of {r['group_size']} "
        f"({r['rollout_rows']} rows); training step: DGPO on that group, K = {r['timesteps_per_sample']}, micro-batch "
        f"{r['micro_batch_size']}, AdamW",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| transformer parameters (bf16) / buffers | {b['transformer_parameters'] / GIB:.2f} GiB / "
        f"{b['transformer_buffers'] / GIB:.2f} GiB |",
        f"| LoRA parameters / AdamW state (fp32) | {b['lora_parameters'] / GIB:.3f} GiB / {b['adamw_state'] / GIB:.3f} GiB |",
        f"| build (random init in bf16) | {s['build']:.1f} s, peak RSS {gib(m['build'])} |",
        f"| rollout step (one CFG forward) | {s['rollout_step']:.1f} s, peak RSS {gib(m['rollout_step'])} |",
        f"| DGPO LoRA training step | {s['train_step']:.1f} s, peak RSS {gib(m['train_step'])} |",
        f"| run peak RSS (largest phase peak, ru_maxrss) | {gib(m['process'])} |",
        f"| loss / LoRA grads finite | {r['loss']:.4g} ({r['loss_finite']}) / {r['lora_grads_finite']} |",
        "",
        f"Seconds measure this CPU's bf16 matrix products, not a GPU's (see bench_sd3_gpu.py for those), on a "
        f"machine shared with other jobs: 1-minute load average {r['load_average_1min']['start']:.1f} at the start, "
        f"{r['load_average_1min']['end']:.1f} at the end, for {torch.get_num_threads()} threads.",
        "",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd35_medium", help="a bench_sd3_gpu.py config (sd35_medium, sd35_large, tiny)")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer blocks of the same widths (tests)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=16, help="prompt length fed to the transformer (real: 333)")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--timesteps-per-sample", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--lora-rank", type=int, default=64, help="alpha is 2 x rank")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "bench_real_size_cpu"), help="writes OUT.md and OUT.json ('' = don't)")
    args = parser.parse_args(argv)
    if args.group_size < 2:
        parser.error("--group-size must be >= 2")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/bench_real_size_cpu.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    result["command"] = command.strip()
    load_gpu_bench().write_results(result, markdown(result, result["command"]), args.out)
    return result


if __name__ == "__main__":
    main()
