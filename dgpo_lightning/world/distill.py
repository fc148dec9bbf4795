"""Distil the embedded world's base into a few-step (4-NFE) student by matching trajectory segments.

``python -m dgpo_lightning.world.distill --out DIR [--num-steps 4] [--minutes M | --steps N]``

The student has the base's architecture and starts from its weights; only the UNet trains (the text
encoder stays the teacher's). It samples with ``S`` Euler steps on the shifted schedule
``σ_0 = 1 > σ_1 > … > σ_S = 0`` (:func:`~dgpo_lightning.sampling.flow_sigmas`, shift 3), so its
``k``-th step is ``x_{k+1} = x_k − (σ_k − σ_{k+1})·v_s(x_k, σ_k)``. Each segment is taught the
teacher's own ODE solution over it: from the student's state ``x_k`` the teacher integrates
``σ_k → σ_{k+1}`` with DPM-Solver++ 2M in ``m`` sub-steps (the teacher's fine schedule
``flow_sigmas(S·m)`` restricted to the segment), giving ``y_k``, and

    L = mean_k ‖v_s(x_k, σ_k) − v̄_k‖²,     v̄_k = (x_k − y_k) / (σ_k − σ_{k+1}),

the segment's mean (secant) velocity: a student that fits it exactly lands where the teacher's
trajectory lands after each of its ``S`` steps. The states ``x_k`` come from the student's own
current ``S``-step rollout (no gradient), so it learns to correct its own errors instead of only the
teacher's states (exposure bias).

What this is and is not. TDM-R1 (Luo et al., arXiv 2603.07700) builds on Trajectory Distribution
Matching (TDM), which matches the *distribution* of the student's trajectory to the teacher's with a
learned fake score (no teacher ODE solves). This script is the simpler, documented alternative the
CPU budget affords: deterministic segment-wise trajectory regression to the teacher's ODE (in the
family of progressive / consistency-trajectory distillation), whose cost is ``S·m`` teacher passes
per sample. TDM-R1's own fake score (``model.algorithm: tdm_r1``) then keeps the student on the
teacher's distribution while it is reinforced.

Writes the EMA student (``save_backbone``) and ``distill.json`` (arguments, steps, time, history of the
held-out GenEval score at ``S`` Euler steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from dgpo_lightning.models.ema import ema_update_
from dgpo_lightning.sampling import flow_sigmas, ode_dpm, ode_euler
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone, save_backbone
from dgpo_lightning.world.pretrain import world_records
from dgpo_lightning.world.training import TaskBalancedPrompts


def segment_targets(teacher_velocity, states: Tensor, sigmas: Tensor, fine: Tensor, substeps: int) -> Tensor:
    """The teacher's ODE solution over each student segment.

    Args:
        teacher_velocity: ``(x [B, ...], t [B]) -> v``.
        states: ``[S, B, ...]`` student states ``x_k`` at ``σ_k`` (``k = 0..S-1``).
        sigmas: ``[S + 1]`` the student's schedule; ``fine``: ``[S·m + 1]`` the teacher's schedule with
            ``fine[k·m] = σ_k``.
        substeps: ``m``.

    Returns:
        ``[S, B, ...]`` the teacher's state ``y_k`` at ``σ_{k+1}`` reached from ``x_k`` (DPM-Solver++ 2M).
    """
    out = []
    for k in range(states.shape[0]):
        grid = fine[k * substeps : (k + 1) * substeps + 1]
        if not (math.isclose(float(grid[0]), float(sigmas[k]), abs_tol=1e-6) and math.isclose(float(grid[-1]), float(sigmas[k + 1]), abs_tol=1e-6)):
            raise ValueError("the teacher's fine schedule does not pass through the student's sigmas")
        out.append(ode_dpm(teacher_velocity, states[k], grid).sample)
    return torch.stack(out)


def segment_loss(student, states: Tensor, targets: Tensor, sigmas: Tensor, cond) -> Tensor:
    """``mean_k ‖v_s(x_k, σ_k) − (x_k − y_k)/(σ_k − σ_{k+1})‖²`` over all segments, one batched pass.

    Args: ``states``, ``targets``: ``[S, B, ...]``; ``sigmas``: ``[S + 1]``; ``cond``: the batch's
    conditioning (``B`` rows), repeated for the ``S`` segments.
    """
    s, b = states.shape[:2]
    gaps = (sigmas[:-1] - sigmas[1:]).to(states.dtype)
    mean_velocity = (states - targets) / gaps.view(s, 1, *([1] * (states.dim() - 2)))
    t = sigmas[:-1].to(states.dtype).repeat_interleave(b)
    cond_all = {key: value.repeat(s, *([1] * (value.dim() - 1))) for key, value in cond.items()}
    v = student.velocity(states.reshape(s * b, *states.shape[2:]), t, cond_all)
    return (v - mean_velocity.reshape(s * b, *states.shape[2:])).pow(2).mean()


def heldout_eval(model, num_steps: int, shift: float, images_per_prompt: int, seed: int = 1234) -> dict[str, float]:
    """GenEval summary of ``model`` on the TEST prompts with ``num_steps`` Euler steps."""
    from dgpo_lightning.evaluation import evaluate
    from dgpo_lightning.rewards.base import build

    model.eval()
    settings = SamplerSettings(sampler="ode_euler", num_steps=num_steps, shift=shift, guidance_scale=1.0)
    result = evaluate(model, world_records("world:test"), {"geneval": build("geneval")}, settings,
                      images_per_prompt=images_per_prompt, seed=seed)
    return result.summary["geneval"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dgpo_lightning.world.distill", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory of the EMA student")
    parser.add_argument("--teacher", default=None, help="teacher world checkpoint (default: the shipped base)")
    parser.add_argument("--init", default=None, help="start the student from this world checkpoint (default: the teacher)")
    parser.add_argument("--num-steps", type=int, default=4, help="the student's Euler steps (NFE)")
    parser.add_argument("--shift", type=float, default=3.0, help="schedule shift of student and teacher")
    parser.add_argument("--substeps", type=int, default=3, help="teacher DPM-Solver++ steps per student segment")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: until --minutes; 500 if neither)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-minutes", type=float, default=4.0)
    parser.add_argument("--eval-images", type=int, default=1)
    parser.add_argument("--final-eval-images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num_steps < 1 or args.substeps < 1:
        parser.error("--num-steps and --substeps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_backbone(args.teacher).eval().requires_grad_(False)
    student = copy.deepcopy(teacher) if args.init is None else load_backbone(args.init)
    student.denoiser.requires_grad_(True).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    sigmas = flow_sigmas(args.num_steps, shift=args.shift)
    fine = flow_sigmas(args.num_steps * args.substeps, shift=args.shift)
    optimizer = torch.optim.AdamW(student.denoiser.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = TaskBalancedPrompts(world_records("world:train"), generator)
    max_steps = args.steps if args.steps is not None else (None if args.minutes else 500)
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf
    history: list[dict[str, Any]] = []
    start = time.monotonic()

    def record(images: int) -> dict[str, float]:
        summary = heldout_eval(ema, args.num_steps, args.shift, images)
        entry = {"step": step, "minutes": (time.monotonic() - start) / 60, "loss": loss_avg, "images_per_prompt": images, "heldout": summary}
        history.append(entry)
        print(f"\n[step {step}, {entry['minutes']:.1f} min, loss {loss_avg}] held-out {args.num_steps}-step: "
              + "  ".join(f"{k}={v:.3f}" for k, v in summary.items()), flush=True)
        save_backbone(ema, out)
        info = {"args": vars(args), "steps": step, "minutes": entry["minutes"], "history": history}
        (out / "distill.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return summary

    step, loss_avg = 0, None
    with torch.no_grad():
        record(args.eval_images)  # the teacher's weights at S steps: the starting point
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, unit="step", mininterval=5.0)
    next_eval = time.monotonic() + 60 * args.eval_minutes
    while (max_steps is None or step < max_steps) and time.monotonic() < deadline:
        texts = [r["prompt"] for r in prompts.draw(args.batch_size)]
        with torch.no_grad():
            cond = teacher.encode_prompts(texts)
            noise = torch.randn((args.batch_size, *student.latent_shape()), generator=generator)
            student.denoiser.eval()
            # [S + 1, B, ...] states of the student's own rollout; segments start from the first S
            states = ode_euler(lambda x, t: student.velocity(x, t, cond), noise, sigmas, return_trajectory=True).trajectory[:-1]
            targets = segment_targets(lambda x, t: teacher.velocity(x, t, cond), states, sigmas, fine, args.substeps)
        student.denoiser.train()
        loss = segment_loss(student, states, targets, sigmas, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.denoiser.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema_update_(ema.parameters(), student.parameters(), min(args.ema, (1 + step) / (10 + step)))
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
        if time.monotonic() >= next_eval:
            with torch.no_grad():
                record(args.eval_images)
            next_eval = time.monotonic() + 60 * args.eval_minutes
    if progress is not None:
        progress.close()
    with torch.no_grad():
        record(args.final_eval_images)
    print(f"done: {step} steps in {history[-1]['minutes']:.1f} min; EMA student in {out}")


if __name__ == "__main__":
    main()
