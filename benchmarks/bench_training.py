"""DGPO vs Flow-GRPO on the CPU, side by side in one run: rollout images/s, training samples/s, and
Lightning's overhead per optimizer step over a bare PyTorch loop of the same step.

(a) Rollouts: DGPO's 10-step deterministic ODE (``ode_dpm``) vs Flow-GRPO's 10-step flow-SDE with
    the trajectory and per-step log-probs kept (what Flow-GRPO trains on). Measured twice: sampling
    only (``sample_latents``) and the whole rollout (``generate_groups``: sampling + decoding + the
    ``geneval_partial`` reward + advantages).
(b) Training: one optimizer step of DGPO vs one of Flow-GRPO on a batch of the same whole groups,
    through ``DGPOModule.backward_step`` (the configured objective's loss and backward), with the
    settings of ``experiments/base/world_dgpo.yaml`` and ``world_flow_grpo.yaml``.
(c) Lightning overhead: median wall time per optimizer step of ``Trainer.fit`` on fixed batches vs a
    bare loop that calls the same module methods with the same optimizer (target <= 1.10x).

The embedded world's shipped base checkpoint is used when it exists; otherwise a random model
(``--random-arch tiny``: ``world.backbone.tiny_backbone``, the default; ``shipped``: the shipped
architecture, ``build_backbone()``). Speed does not depend on the weights. All timings use
``torch.set_num_threads(--threads)`` (default 1), warm-up iterations, and interleave the compared
variants within each repeat so drifts in machine load hit both alike. Not a test.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training.py [--random-arch tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if TYPE_CHECKING:
    from dgpo_lightning.objectives import GroupBatch

RESULTS = Path(__file__).resolve().parent / "results"

# experiments/base/world_dgpo.yaml and world_flow_grpo.yaml
DGPO_SETTINGS = dict(algorithm="dgpo", beta=30.0, t_min=0.3, timesteps_per_sample=1, lr=3e-5)
FLOW_GRPO_SETTINGS = dict(algorithm="flow_grpo", clip_range=1e-4, kl_beta=0.04, timesteps_per_sample=2, lr=3e-5)


# ---------------------------------------------------------------------------------------- helpers


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def prepare_model(random_arch: str, workdir: Path) -> tuple[str | None, str]:
    """``(model_path, description)``: the shipped base when it exists, else a random world model on disk."""
    from dgpo_lightning.world.backbone import BASE_CHECKPOINT, build_backbone, save_backbone, tiny_backbone

    if (BASE_CHECKPOINT / "unet").is_dir() and random_arch != "force-tiny":
        return str(BASE_CHECKPOINT), f"embedded world, shipped base checkpoint ({BASE_CHECKPOINT})"
    torch.manual_seed(0)
    if random_arch == "shipped":
        backbone, what = build_backbone(), "embedded world, shipped architecture with random weights (build_backbone; no checkpoint found)"
    else:
        backbone, what = tiny_backbone(), "embedded world, tiny_backbone with random weights (no shipped checkpoint found)"
    path = save_backbone(backbone, workdir / "world")
    return str(path), what


def describe(model_path: str | None) -> str:
    from dgpo_lightning.world.backbone import load_backbone

    backbone = load_backbone(model_path)
    params = sum(p.numel() for p in backbone.denoiser.parameters())
    text = sum(p.numel() for p in backbone.text_encoder.parameters())
    shape = "x".join(map(str, backbone.latent_shape()))
    return f"UNet {params / 1e6:.3f} M params, text encoder {text / 1e6:.3f} M, latents {shape}, CFG {backbone.default_guidance_scale}"


class _FakeStrategy:
    """No ``block_backward_sync``: one process, nothing to synchronise."""


class _FakeTrainer:
    """What ``backward_step`` reads from ``self.trainer`` outside ``Trainer.fit`` (the optimizer step
    that seeds the step's timestep and noise draws)."""

    def __init__(self):
        self.strategy = _FakeStrategy()
        self.global_step = 0
        self.current_epoch = 0


def bare_module(model_path: str | None, **settings: Any):
    """A configured ``DGPOModule`` usable without a Trainer, with its AdamW optimizer."""
    from dgpo_lightning.module import DGPOModule

    module = DGPOModule(backbone="world", model_path=model_path, **settings)
    module.configure_model()
    module.train()
    module._trainer = _FakeTrainer()
    module.manual_backward = lambda loss: loss.backward()  # what Strategy.backward does on one CPU process
    return module, module.configure_optimizers()


def bare_step(module, optimizer, batch: GroupBatch) -> torch.Tensor:
    """``DGPOModule.training_step`` without Lightning: zero grads, the algorithm's step (forward and
    backward, ``module.backward_step``), gradient-norm clip, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = module.backward_step(batch)
    if module.hparams.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), module.hparams.grad_clip)
    optimizer.step()
    module._trainer.global_step += 1
    return loss


# ------------------------------------------------------------------------------------ (a) rollouts


def bench_rollouts(model_path, records, args) -> tuple[dict[str, Any], dict[str, Any]]:
    """Images/s of ODE vs SDE rollouts; also returns the last rollout of each (training batches)."""
    from dgpo_lightning.data.rollout import generate_groups, sample_latents
    from dgpo_lightning.rewards.base import build_weighted
    from dgpo_lightning.sampling.seeds import member_seeds
    from dgpo_lightning.sampling.settings import SamplerSettings
    from dgpo_lightning.world.backbone import load_backbone

    backbone = load_backbone(model_path)
    reward = build_weighted({"geneval_partial": 1.0})
    n_images = len(records) * args.group_size
    prompts = [r["prompt"] for r in records for _ in range(args.group_size)]
    variants = {
        "dgpo": dict(settings=SamplerSettings("ode_dpm", num_steps=args.steps, shift=3.0), keep_trajectory=False),
        "flow_grpo": dict(settings=SamplerSettings("sde", num_steps=args.steps, shift=3.0, noise_level=0.7), keep_trajectory=True),
    }

    def sample_only(name: str, seed: int) -> float:
        v = variants[name]
        seeds = member_seeds(seed, range(len(records)), args.group_size)
        start = time.perf_counter()
        out = sample_latents(
            backbone, prompts, seeds, v["settings"], batch_size=args.rollout_batch_size, return_trajectory=v["keep_trajectory"],
        )
        seconds = time.perf_counter() - start
        assert (out.log_probs is not None) == v["settings"].stochastic
        return seconds

    last: dict[str, Any] = {}

    def full_rollout(name: str, seed: int) -> float:
        v = variants[name]
        start = time.perf_counter()
        last[name] = generate_groups(
            backbone, records, args.group_size, reward, seed=seed, settings=v["settings"],
            keep_trajectory=v["keep_trajectory"], batch_size=args.rollout_batch_size,
        )
        return time.perf_counter() - start

    times: dict[str, dict[str, list[float]]] = {kind: {n: [] for n in variants} for kind in ("sampling", "rollout")}
    for name in variants:  # warm-up
        sample_only(name, 0)
        full_rollout(name, 0)
    for repeat in range(args.repeats):
        for name in variants:  # interleaved
            times["sampling"][name].append(sample_only(name, repeat + 1))
            times["rollout"][name].append(full_rollout(name, repeat + 1))
    result: dict[str, Any] = {"images": n_images, "steps": args.steps, "repeats": args.repeats, "variants": {}}
    for name, v in variants.items():
        sampling, rollout = median(times["sampling"][name]), median(times["rollout"][name])
        result["variants"][name] = {
            "sampler": v["settings"].sampler,
            "keeps": "trajectory + log-probs" if v["keep_trajectory"] else "final latents",
            "sampling_seconds": sampling,
            "sampling_images_per_s": n_images / sampling,
            "rollout_seconds": rollout,
            "rollout_images_per_s": n_images / rollout,
            "all_sampling_seconds": times["sampling"][name],
            "all_rollout_seconds": times["rollout"][name],
        }
        traj = last[name].trajectory
        result["variants"][name]["stored_bytes_per_image"] = int(
            last[name].latents[0].numel() * 4 + (traj[0].numel() * 4 + last[name].log_probs[0].numel() * 4 if traj is not None else 0)
        )
    d, f = result["variants"]["dgpo"], result["variants"]["flow_grpo"]
    result["dgpo_over_flow_grpo"] = {
        "sampling": d["sampling_images_per_s"] / f["sampling_images_per_s"],
        "rollout": d["rollout_images_per_s"] / f["rollout_images_per_s"],
    }
    return result, last


# ------------------------------------------------------------------------------- (b) training steps


def training_batch(rollout, groups: int) -> GroupBatch:
    """The first ``groups`` groups of a rollout as one batch (group order fixed, so both algorithms
    train on the same prompts)."""
    labels = rollout.group_index.unique()[:groups]
    return rollout.batches(groups, groups=labels, seed=0)[0]


def bench_steps(model_path, rollouts, args) -> dict[str, Any]:
    modules = {
        "dgpo": bare_module(model_path, **DGPO_SETTINGS),
        "flow_grpo": bare_module(model_path, **FLOW_GRPO_SETTINGS),
    }
    batches = {name: training_batch(rollouts[name], args.groups_per_batch) for name in modules}
    assert batches["dgpo"].prompts == batches["flow_grpo"].prompts, "both algorithms must see the same groups"
    n = len(batches["dgpo"])

    def timed(name: str) -> float:
        module, optimizer = modules[name]
        start = time.perf_counter()
        loss = bare_step(module, optimizer, batches[name])
        seconds = time.perf_counter() - start
        assert torch.isfinite(loss)
        return seconds

    for name in modules:
        for _ in range(args.warmup):
            timed(name)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.repeats * args.steps_per_repeat):
        for name in modules:  # interleaved
            times[name].append(timed(name))
    out: dict[str, Any] = {"samples_per_step": n, "groups_per_step": args.groups_per_batch, "variants": {}}
    for name, (module, _) in modules.items():
        hp = module.hparams
        seconds = median(times[name])
        # velocity evaluations per sample per step: reference (no grad) + online (with backward)
        k = hp.timesteps_per_sample
        ref_passes = k if (name == "dgpo" or hp.kl_beta > 0) else 0
        out["variants"][name] = {
            "settings": {key: hp[key] for key in ("timesteps_per_sample", "beta", "t_min", "kl_beta", "clip_range")},
            "seconds_per_step": seconds,
            "samples_per_s": n / seconds,
            "forward_passes_per_sample": {"reference_no_grad": ref_passes, "online_with_backward": k},
            "all_seconds": times[name],
        }
    d, f = out["variants"]["dgpo"], out["variants"]["flow_grpo"]
    out["dgpo_over_flow_grpo"] = d["samples_per_s"] / f["samples_per_s"]
    return out


# ------------------------------------------------------------------------------ (c) Lightning overhead


def bench_overhead(model_path, rollout, args) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from dgpo_lightning.module import DGPOModule

    labels = rollout.group_index.unique()
    groups = [rollout.batches(args.groups_per_batch, groups=labels[i : i + args.groups_per_batch], seed=0)[0]
              for i in range(0, labels.numel() - args.groups_per_batch + 1, args.groups_per_batch)]
    steps = args.warmup + args.steps_per_repeat
    batches = [groups[i % len(groups)] for i in range(steps)]

    def loader() -> DataLoader:
        return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)

    class StepClock(L.Callback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx >= args.warmup:
                self.stamps.append(time.perf_counter())

    def lightning_run(seed: int) -> tuple[list[float], float]:
        module = DGPOModule(backbone="world", model_path=model_path, seed=seed, **DGPO_SETTINGS)
        clock = StepClock()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=args.workdir, callbacks=[clock],
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader())
        total = time.perf_counter() - start
        assert trainer.global_step == steps
        # intervals between consecutive batch ends: the whole loop (fetch, hooks, step, logging)
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])], total

    def bare_run(seed: int) -> tuple[list[float], float]:
        start = time.perf_counter()
        module, optimizer = bare_module(model_path, seed=seed, **DGPO_SETTINGS)
        stamps = []
        for index, batch in enumerate(loader()):
            if index == args.warmup:
                stamps.append(time.perf_counter())
            bare_step(module, optimizer, batch)
            if index >= args.warmup:
                stamps.append(time.perf_counter())
        total = time.perf_counter() - start
        return [b - a for a, b in zip(stamps, stamps[1:])], total

    lightning_run(0), bare_run(0)  # warm-up (imports, allocator)
    per_repeat = []
    for repeat in range(args.repeats):
        runs = [("lightning", lightning_run), ("bare", bare_run)]
        if repeat % 2:  # alternate which goes first
            runs.reverse()
        row = {}
        for name, fn in runs:
            intervals, total = fn(repeat + 1)
            row[name] = {"median_step_seconds": median(intervals), "total_seconds": total}
        row["ratio"] = row["lightning"]["median_step_seconds"] / row["bare"]["median_step_seconds"]
        per_repeat.append(row)
    light = median([r["lightning"]["median_step_seconds"] for r in per_repeat])
    bare = median([r["bare"]["median_step_seconds"] for r in per_repeat])
    return {
        "samples_per_step": len(batches[0]),
        "timed_steps_per_run": args.steps_per_repeat,
        "warmup_steps_per_run": args.warmup,
        "repeats": args.repeats,
        "lightning_median_step_seconds": light,
        "bare_median_step_seconds": bare,
        "ratio_of_medians": light / bare,
        "median_paired_ratio": median([r["ratio"] for r in per_repeat]),
        "lightning_median_fit_seconds": median([r["lightning"]["total_seconds"] for r in per_repeat]),
        "bare_median_loop_seconds": median([r["bare"]["total_seconds"] for r in per_repeat]),
        "target": 1.10,
        "per_repeat": per_repeat,
    }


# ----------------------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    env, a, b, c = result["environment"], result["rollout"], result["training"], result["overhead"]
    ad, af = a["variants"]["dgpo"], a["variants"]["flow_grpo"]
    bd, bf = b["variants"]["dgpo"], b["variants"]["flow_grpo"]
    verdict = "meets" if c["ratio_of_medians"] <= c["target"] else "misses"
    lines = [
        "# Training benchmark: DGPO vs Flow-GRPO on the embedded world (CPU)",
        "",
        f"Measured {env['date']} with `{env['command']}`.",
        "",
        f"- model: {result['model']}; {result['model_details']}",
        f"- machine: {env['machine']}, torch {env['torch']} ({env['threads']} thread), lightning {env['lightning']}, "
        f"Python {env['python']}",
        f"- **the machine was shared** with other jobs (load average {env['load_before'][0]:.1f} before, "
        f"{env['load_after'][0]:.1f} after, on {env['cpus']} cores): absolute numbers are noisy; the ratios are "
        "measured side by side in one run with the compared variants interleaved, so they are the robust part.",
        f"- group size G = {result['group_size']}, {result['prompts']} prompts per rollout, "
        f"{a['steps']} sampler steps (shift 3), medians over {a['repeats']} repeats after warm-up",
        "",
        "## (a) Rollouts: images/s",
        "",
        f"{a['images']} images per rollout (sampler batch {result['rollout_batch_size']}). *Sampling*: the sampler "
        "alone (`sample_latents`); *rollout*: `generate_groups` (sampling, decoding, the `geneval_partial` reward, "
        "advantages).",
        "",
        "| algorithm | sampler | keeps | sampling images/s | rollout images/s | stored bytes/image |",
        "|---|---|---|---|---|---|",
        f"| DGPO | {ad['sampler']} (10-step DPM-Solver++ 2M) | {ad['keeps']} | {ad['sampling_images_per_s']:.1f} | "
        f"{ad['rollout_images_per_s']:.1f} | {ad['stored_bytes_per_image']:,} |",
        f"| Flow-GRPO | {af['sampler']} (10-step flow-SDE, a = 0.7) | {af['keeps']} | {af['sampling_images_per_s']:.1f} | "
        f"{af['rollout_images_per_s']:.1f} | {af['stored_bytes_per_image']:,} |",
        f"| **DGPO / Flow-GRPO** | | | **{a['dgpo_over_flow_grpo']['sampling']:.2f}×** | "
        f"**{a['dgpo_over_flow_grpo']['rollout']:.2f}×** | |",
        "",
        "## (b) Training: samples/s of one optimizer step",
        "",
        f"The same {b['groups_per_step']} whole group(s) ({b['samples_per_step']} samples) per step, each algorithm on "
        "its own rollout of them, through `DGPOModule.backward_step` (the configured objective) + grad clip + AdamW, "
        "settings of `experiments/base/world_dgpo.yaml` / `world_flow_grpo.yaml`.",
        "",
        "| algorithm | settings | forward passes / sample (ref no-grad + online w/ backward) | s / step | samples/s |",
        "|---|---|---|---|---|",
    ]
    for name, label, v in (("dgpo", "DGPO", bd), ("flow_grpo", "Flow-GRPO", bf)):
        s = v["settings"]
        settings = (
            f"K={s['timesteps_per_sample']} timestep(s) in [{s['t_min']}, 1], β={s['beta']}"
            if name == "dgpo"
            else f"K={s['timesteps_per_sample']} stored SDE transitions, clip {s['clip_range']}, KL {s['kl_beta']}"
        )
        fp = v["forward_passes_per_sample"]
        lines.append(
            f"| {label} | {settings} | {fp['reference_no_grad']} + {fp['online_with_backward']} | "
            f"{v['seconds_per_step'] * 1000:.1f} ms | {v['samples_per_s']:.1f} |"
        )
    lines += [
        f"| **DGPO / Flow-GRPO** | | | | **{b['dgpo_over_flow_grpo']:.2f}×** |",
        "",
        "## (c) Lightning overhead per optimizer step",
        "",
        f"DGPO steps on fixed batches ({c['samples_per_step']} samples each): `Trainer.fit` (CPU, no logger/checkpoint/"
        "progress bar; a callback stamps every batch end) vs a bare loop over the same `DataLoader` calling the same "
        f"module methods with the same AdamW. {c['warmup_steps_per_run']} warm-up + {c['timed_steps_per_run']} timed "
        f"steps per run, {c['repeats']} repeats (alternating which runs first), fresh module per run.",
        "",
        "| loop | median s / step | median whole run (incl. setup) |",
        "|---|---|---|",
        f"| Lightning `Trainer.fit` | {c['lightning_median_step_seconds'] * 1000:.2f} ms | {c['lightning_median_fit_seconds']:.2f} s |",
        f"| bare PyTorch loop | {c['bare_median_step_seconds'] * 1000:.2f} ms | {c['bare_median_loop_seconds']:.2f} s |",
        f"| **ratio** | **{c['ratio_of_medians']:.3f}×** (median of per-repeat ratios {c['median_paired_ratio']:.3f}×; "
        f"target ≤ {c['target']:.2f}×: {verdict}) | |",
        "",
        "Per repeat (Lightning / bare median step ms): "
        + ", ".join(
            f"{r['lightning']['median_step_seconds'] * 1000:.2f}/{r['bare']['median_step_seconds'] * 1000:.2f}"
            for r in c["per_repeat"]
        ),
        "",
    ]
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-arch", choices=["tiny", "shipped", "force-tiny"], default="tiny",
                        help="random model when the shipped checkpoint is missing (force-tiny: even when it exists)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="prompts (groups) per rollout")
    parser.add_argument("--groups-per-batch", type=int, default=1, help="whole groups per training step")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--rollout-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-repeat", type=int, default=10, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "bench_training"), help="writes OUT.md and OUT.json ('' = don't)")
    parser.add_argument("--note", action="append", default=[], help="extra note for the results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lightning

    from dgpo_lightning.data.prompts import draw_prompts, load_prompt_records

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        model_path, what = prepare_model(args.random_arch, Path(workdir))
        details = describe(model_path)
        print(f"model: {what}; {details}", flush=True)
        all_records = load_prompt_records("world:train")
        records = [all_records[i] for i in draw_prompts(all_records, args.prompts, seed=0)]
        print("(a) rollouts ...", flush=True)
        rollout, last = bench_rollouts(model_path, records, args)
        print("(b) training steps ...", flush=True)
        training = bench_steps(model_path, last, args)
        print("(c) Lightning overhead ...", flush=True)
        overhead = bench_overhead(model_path, last["dgpo"], args)
    result = {
        "model": what,
        "model_details": details,
        "group_size": args.group_size,
        "prompts": args.prompts,
        "rollout_batch_size": args.rollout_batch_size,
        "rollout": rollout,
        "training": training,
        "overhead": overhead,
        "notes": args.note,
        "environment": {
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
    }
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
