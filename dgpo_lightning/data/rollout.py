"""Online rollouts: sample G images per prompt with the current policy, score them, make advantages.

Plain PyTorch (no Lightning): the DataModule, the evaluation callback, the benchmarks and notebooks
all call these functions.
"""

from __future__ import annotations

import collections
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.algo import group_advantages
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.sampling import SampleOutput, flow_sigmas, get_sampler, initial_noise


def default_guidance_scale(backbone: Backbone) -> float:
    """The backbone's own CFG scale for sampling (``1.0``, i.e. no guidance, if it declares none)."""
    return float(getattr(backbone, "default_guidance_scale", 1.0))


def default_shift(backbone: Backbone) -> float:
    """The backbone's recommended schedule shift (SD3's 3.0 if it declares none)."""
    return float(getattr(backbone, "shift", 3.0))


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    sampler: str = "ode_dpm",
    num_steps: int = 10,
    shift: float | None = None,
    guidance_scale: float | None = None,
    noise_level: float = 0.7,
    batch_size: int = 64,
    return_trajectory: bool = False,
    progress: bool = False,
    description: str = "sampling",
) -> SampleOutput:
    """Sample one latent per ``(prompt, seed)``; results do not depend on ``batch_size``.

    The initial noise of sample ``i`` comes from ``seeds[i]`` alone and the SDE's per-step noise from
    ``seeds[i]`` offset by a constant, so any batch split gives the same samples.

    Returns:
        :class:`~dgpo_lightning.sampling.SampleOutput` with ``sample [N, C, H, W]``, ``trajectory
        [S + 1, N, C, H, W]`` when asked (always for ``sde`` with ``return_trajectory``) and
        ``log_probs [S, N]`` for ``sde``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sample_fn = get_sampler(sampler)
    scale = default_guidance_scale(backbone) if guidance_scale is None else float(guidance_scale)
    # The sampler state stays fp32 whatever the denoiser's dtype (backbones cast at the network's
    # boundary): Flow-GRPO's stored transitions and log-probs must match their fp32 recomputation.
    parameter = next(backbone.denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    shift = default_shift(backbone) if shift is None else float(shift)
    sigmas = flow_sigmas(num_steps, shift=shift, device=device)
    outputs: list[SampleOutput] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=description, unit="batch", leave=False)
    for start in starts:
        chunk_prompts = list(prompts[start : start + batch_size])
        chunk_seeds = list(seeds[start : start + batch_size])
        cond = backbone.encode_prompts(chunk_prompts)
        x_init = initial_noise(backbone.latent_shape(), chunk_seeds, device=device)

        def velocity_fn(x: Tensor, t: Tensor, cond=cond) -> Tensor:
            # Network in its own dtype (e.g. bf16), sampler state in fp32.
            return backbone.velocity(x.to(dtype), t.to(dtype), cond, guidance_scale=scale).to(x.dtype)

        kwargs: dict[str, Any] = {"return_trajectory": return_trajectory}
        if sampler == "sde":
            kwargs.update(noise_level=noise_level, noise_seeds=[s + SDE_SEED_OFFSET for s in chunk_seeds])
        outputs.append(sample_fn(velocity_fn, x_init, sigmas, **kwargs))
    return SampleOutput(
        sample=torch.cat([o.sample for o in outputs]),
        trajectory=torch.cat([o.trajectory for o in outputs], dim=1) if return_trajectory else None,
        log_probs=torch.cat([o.log_probs for o in outputs], dim=1) if outputs[0].log_probs is not None else None,
    )


#: Keeps the SDE's step noise independent of the initial noise drawn from the same seed.
SDE_SEED_OFFSET = 1_000_003


def sample_seeds(seed: int, count: int) -> list[int]:
    """``count`` distinct per-sample seeds derived from one run/epoch seed."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def group_member_seeds(seed: int, group_ids: Sequence[int], group_size: int) -> list[int]:
    """Seed of member ``j`` of group ``g``, a function of ``(seed, g, j)`` only: a group gets the
    same images whichever rank or batch it lands in."""
    return [sample_seeds(int(seed) * 1_000_003 + int(g), group_size)[j] for g in group_ids for j in range(group_size)]


def evaluation_plan(
    records: Sequence[Mapping[str, Any]], seed: int, images_per_prompt: int, min_images_per_task: int = 0
) -> list[tuple[int, int]]:
    """``(record index, image seed)`` of every held-out image, prompt by prompt.

    Prompt ``i`` of task ``τ`` (its GenEval ``tag``) gets
    ``n_i = max(images_per_prompt, ceil(min_images_per_task / |prompts of τ|))`` images, so a task
    with few prompts is not scored from a handful of images; image ``j`` is seeded by
    ``(seed, i, j)`` (:func:`group_member_seeds`), so raising ``n_i`` only adds images.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    if min_images_per_task < 0:
        raise ValueError(f"min_images_per_task must be >= 0, got {min_images_per_task}")
    tags = [str(record.get("tag", "")) for record in records]
    prompts_per_task = collections.Counter(tags)
    plan = []
    for index, tag in enumerate(tags):
        count = max(images_per_prompt, math.ceil(min_images_per_task / prompts_per_task[tag]))
        plan += [(index, image_seed) for image_seed in group_member_seeds(seed, [index], count)]
    return plan


@dataclass
class Rollout:
    """One epoch's rollouts, kept as whole groups.

    Attributes:
        latents: ``[N, C, H, W]`` final samples ``x0``.
        prompts, metadata: per sample (``metadata[i]`` may be ``None``).
        rewards: ``[N]`` weighted reward; ``reward_components`` per named reward.
        advantages: ``[N]`` group-normalised advantages.
        group_index: ``[N]`` group label (the group's id in the epoch's prompt draw).
        sigmas: ``[S + 1]`` sampler schedule.
        trajectory: ``[N, S + 1, C, H, W]`` states along the sampler path (only when kept).
        log_probs: ``[N, S]`` per-step log-probabilities (SDE only).
        guidance_scale, noise_level: the sampler settings (Flow-GRPO's ratio needs the same ones).
        seconds: wall-clock time of sampling + scoring.
        dropped_groups: groups removed because a reward failed on one of their images.
    """

    latents: Tensor
    prompts: list[str]
    metadata: list[Any]
    rewards: Tensor
    reward_components: dict[str, Tensor]
    advantages: Tensor
    group_index: Tensor
    sigmas: Tensor
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    guidance_scale: float = 1.0
    noise_level: float = 0.0
    seconds: float = 0.0
    dropped_groups: list[int] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return int(self.group_index.unique().numel())

    def informative_groups(self) -> Tensor:
        """Labels of groups whose rewards are not all equal (the others carry no preference)."""
        labels = self.group_index.unique()
        spread = torch.stack([self.rewards[self.group_index == g].std(unbiased=False) for g in labels])
        return labels[spread > 0]

    def stats(self) -> dict[str, float]:
        """Scalars for logging: reward mean/std per component, zero-std group fraction, timing."""
        out = {
            "rollout/reward_mean": self.rewards.mean().item(),
            "rollout/reward_std": self.rewards.std(unbiased=False).item(),
            "rollout/zero_std_group_frac": 1.0 - self.informative_groups().numel() / max(self.num_groups, 1),
            "rollout/seconds": self.seconds,
            "rollout/images": float(self.rewards.numel()),
            "rollout/dropped_groups": float(len(self.dropped_groups)),
        }
        for name, values in self.reward_components.items():
            out[f"rollout/{name}"] = values.mean().item()
        return out

    def batches(self, groups_per_batch: int, *, groups: Tensor | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """Batches of whole groups in a seeded random order.

        Args:
            groups_per_batch: groups per batch (the last batch may hold fewer).
            groups: labels to serve (default: all groups).
            seed: order of the groups.
        """
        labels = self.group_index.unique() if groups is None else groups
        order = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(int(seed)))]
        out = []
        for start in range(0, order.numel(), groups_per_batch):
            chosen = order[start : start + groups_per_batch]
            index = torch.isin(self.group_index, chosen).nonzero().flatten()
            batch: dict[str, Any] = {
                "latents": self.latents[index],
                "prompts": [self.prompts[i] for i in index.tolist()],
                "advantages": self.advantages[index],
                "rewards": self.rewards[index],
                "group_index": self.group_index[index],
                "sigmas": self.sigmas,
                "guidance_scale": self.guidance_scale,
                "noise_level": self.noise_level,
            }
            if self.trajectory is not None:
                batch["trajectory"] = self.trajectory[index]
            if self.log_probs is not None:
                batch["log_probs"] = self.log_probs[index]
            out.append(batch)
        return out


def score_images(
    reward: WeightedReward, images: Tensor, prompts: Sequence[str], metadata: Sequence[Any], *, batch_size: int = 256
) -> dict[str, Tensor]:
    """Each component reward on every image, ``[N]`` per name; non-finite scores are kept (as NaN/inf)
    so the caller can report and drop the affected groups. Wrong shapes raise, naming the reward."""
    parts: dict[str, list[Tensor]] = {name: [] for name in reward.rewards}
    for start in range(0, images.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        for name, fn in reward.rewards.items():
            scores = fn(images[chunk], list(prompts[chunk]), list(metadata[chunk]))
            expected = images[chunk].shape[0]
            if not isinstance(scores, Tensor) or scores.shape != (expected,):
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(f"reward {name!r} returned {shape}, expected a tensor of shape ({expected},)")
            parts[name].append(scores.detach().float().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def generate_groups(
    backbone: Backbone,
    records: Sequence[Mapping[str, Any]],
    group_size: int,
    reward: WeightedReward,
    *,
    seed: int,
    group_ids: Sequence[int] | None = None,
    sampler: str = "ode_dpm",
    num_steps: int = 10,
    shift: float | None = None,
    guidance_scale: float | None = None,
    noise_level: float = 0.7,
    advantage_std: str = "group",
    keep_trajectory: bool = False,
    batch_size: int = 64,
    progress: bool = False,
) -> Rollout:
    """Sample ``group_size`` images for each prompt record, score them and compute advantages.

    Member ``j`` of group ``g`` starts from noise seeded by ``(seed, g, j)`` (``group_ids`` default to
    ``0..P-1``; pass global ids so results do not depend on how groups are spread over ranks). Rewards are the
    weighted sum of ``reward``'s components; groups where any component is non-finite for any
    member are reported with a warning and dropped (never silently zeroed).

    Returns:
        A :class:`Rollout` on the CPU.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs a preference), got {group_size}")
    start_time = time.perf_counter()
    prompts = [str(r["prompt"]) for r in records for _ in range(group_size)]
    metadata = [r if ("include" in r or "tag" in r) else None for r in records for _ in range(group_size)]
    group_ids = list(range(len(records))) if group_ids is None else [int(g) for g in group_ids]
    if len(group_ids) != len(records) or len(set(group_ids)) != len(group_ids):
        raise ValueError(f"need {len(records)} distinct group ids, got {group_ids}")
    group_index = torch.tensor(group_ids, dtype=torch.long).repeat_interleave(group_size)
    output = sample_latents(
        backbone,
        prompts,
        group_member_seeds(seed, group_ids, group_size),
        sampler=sampler,
        num_steps=num_steps,
        shift=shift,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        batch_size=batch_size,
        return_trajectory=keep_trajectory,
        progress=progress,
        description="rollout",
    )
    latents = output.sample
    images = backbone.decode(latents)
    components = score_images(reward, images, prompts, metadata)
    total = sum(reward.weights[name] * values for name, values in components.items())

    bad = ~torch.isfinite(total)
    dropped = sorted(set(group_index[bad].tolist()))
    keep = ~torch.isin(group_index, torch.tensor(dropped, dtype=torch.long))
    if dropped:
        names = [n for n, v in components.items() if not bool(torch.isfinite(v).all())]
        bad_prompts = sorted({prompts[i] for i in bad.nonzero().flatten().tolist()})
        warnings.warn(
            f"reward(s) {names} returned non-finite scores for {int(bad.sum())} image(s); "
            f"skipping {len(dropped)} group(s) (prompts: {bad_prompts[:5]})",
            stacklevel=2,
        )
        if not bool(keep.any()):
            raise RuntimeError("every rollout group had a non-finite reward; check the reward models")
    index = keep.nonzero().flatten()
    rewards = total[index]
    advantages = group_advantages(rewards, group_index[index], std=advantage_std)
    trajectory = output.trajectory.transpose(0, 1)[index.to(latents.device)].cpu() if keep_trajectory else None
    log_probs = output.log_probs.transpose(0, 1)[index.to(latents.device)].cpu() if output.log_probs is not None else None
    return Rollout(
        latents=latents[index.to(latents.device)].cpu(),
        prompts=[prompts[i] for i in index.tolist()],
        metadata=[metadata[i] for i in index.tolist()],
        rewards=rewards,
        reward_components={name: values[index] for name, values in components.items()},
        advantages=advantages,
        group_index=group_index[index],
        sigmas=flow_sigmas(num_steps, shift=default_shift(backbone) if shift is None else float(shift)),
        trajectory=trajectory,
        log_probs=log_probs,
        guidance_scale=default_guidance_scale(backbone) if guidance_scale is None else float(guidance_scale),
        noise_level=noise_level if sampler == "sde" else 0.0,
        seconds=time.perf_counter() - start_time,
        dropped_groups=dropped,
    )


__all__ = [
    "Rollout",
    "default_guidance_scale",
    "default_shift",
    "generate_groups",
    "sample_latents",
    "sample_seeds",
    "score_images",
]
