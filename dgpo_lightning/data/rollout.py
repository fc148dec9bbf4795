"""Online rollouts: sample G images per prompt with the current policy, score them, make advantages.

Plain PyTorch (no Lightning): the DataModule, the evaluation callback, the benchmarks and notebooks
all call these functions.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.algo import group_advantages
from dgpo_lightning.models.backbone import Backbone
from dgpo_lightning.objectives.batch import GroupBatch
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.sampling import SampleOutput, get_sampler, initial_noise
from dgpo_lightning.sampling.seeds import member_seeds, sde_noise_seeds
from dgpo_lightning.sampling.settings import SamplerSettings


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings = SamplerSettings(),
    *,
    batch_size: int = 64,
    return_trajectory: bool = False,
    progress: bool = False,
    description: str = "sampling",
) -> SampleOutput:
    """Sample one latent per ``(prompt, seed)``; results do not depend on ``batch_size``.

    The initial noise of sample ``i`` comes from ``seeds[i]`` alone and the SDE's per-step noise from
    :func:`~dgpo_lightning.sampling.seeds.sde_noise_seeds`, so any batch split gives the same samples.
    ``settings`` left unresolved (``shift`` / ``guidance_scale`` ``None``) take the backbone's defaults.

    Returns:
        :class:`~dgpo_lightning.sampling.SampleOutput` with ``sample [N, C, H, W]``, ``trajectory
        [S + 1, N, C, H, W]`` when asked and ``log_probs [S, N]`` for ``sde``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    settings = settings.resolve(backbone)
    sample_fn = get_sampler(settings.sampler)
    scale = settings.guidance_scale
    # The sampler state stays fp32 whatever the denoiser's dtype (backbones cast at the network's
    # boundary): Flow-GRPO's stored transitions and log-probs must match their fp32 recomputation.
    parameter = next(backbone.denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    sigmas = settings.sigmas(device)
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
        if settings.stochastic:
            kwargs.update(noise_level=settings.noise_level, noise_seeds=sde_noise_seeds(chunk_seeds))
        outputs.append(sample_fn(velocity_fn, x_init, sigmas, **kwargs))
    return SampleOutput(
        sample=torch.cat([o.sample for o in outputs]),
        trajectory=torch.cat([o.trajectory for o in outputs], dim=1) if return_trajectory else None,
        log_probs=torch.cat([o.log_probs for o in outputs], dim=1) if outputs[0].log_probs is not None else None,
    )


@dataclass
class Rollout:
    """One epoch's rollouts, kept as whole groups.

    Attributes:
        latents: ``[N, C, H, W]`` final samples ``x0``.
        prompts, metadata: per sample (``metadata[i]`` may be ``None``).
        rewards: ``[N]`` weighted reward; ``reward_components`` per named reward.
        advantages: ``[N]`` group-normalised advantages.
        group_index: ``[N]`` group label (the group's id in the epoch's prompt draw).
        settings: the resolved sampler settings (Flow-GRPO's ratio needs the same ones).
        sigmas: ``[S + 1]`` sampler schedule.
        trajectory: ``[N, S + 1, C, H, W]`` states along the sampler path (only when kept).
        log_probs: ``[N, S]`` per-step log-probabilities (SDE only).
        seconds: wall-clock time of sampling + scoring.
        dropped_groups: groups removed because a reward failed on one of their images.
        sampling_seconds: time spent sampling and decoding.
        scoring_seconds: time spent inside the rewards (overlapping sampling when overlapped).
        reward_wait_seconds: time sampling stood still waiting for rewards.
    """

    latents: Tensor
    prompts: list[str]
    metadata: list[Any]
    rewards: Tensor
    reward_components: dict[str, Tensor]
    advantages: Tensor
    group_index: Tensor
    settings: SamplerSettings
    sigmas: Tensor
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None
    seconds: float = 0.0
    dropped_groups: list[int] = field(default_factory=list)
    sampling_seconds: float = 0.0
    scoring_seconds: float = 0.0
    reward_wait_seconds: float = 0.0

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
            "rollout/sampling_seconds": self.sampling_seconds,
            "rollout/scoring_seconds": self.scoring_seconds,
            "rollout/reward_wait_seconds": self.reward_wait_seconds,
            "rollout/images": float(self.rewards.numel()),
            "rollout/dropped_groups": float(len(self.dropped_groups)),
        }
        for name, values in self.reward_components.items():
            out[f"rollout/{name}"] = values.mean().item()
        return out

    def batches(self, groups_per_batch: int, *, groups: Tensor | None = None, seed: int = 0) -> list[GroupBatch]:
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
            out.append(
                GroupBatch(
                    latents=self.latents[index],
                    prompts=[self.prompts[i] for i in index.tolist()],
                    advantages=self.advantages[index],
                    rewards=self.rewards[index],
                    group_index=self.group_index[index],
                    settings=self.settings,
                    sigmas=self.sigmas,
                    trajectory=None if self.trajectory is None else self.trajectory[index],
                    log_probs=None if self.log_probs is None else self.log_probs[index],
                )
            )
        return out


@torch.no_grad()
def generate_groups(
    backbone: Backbone,
    records: Sequence[Mapping[str, Any]],
    group_size: int,
    reward: WeightedReward,
    *,
    seed: int,
    group_ids: Sequence[int] | None = None,
    settings: SamplerSettings = SamplerSettings(),
    advantage_std: str = "group",
    advantage_clip: float | None = None,
    keep_trajectory: bool = False,
    batch_size: int = 64,
    overlap_scoring: bool = True,
    progress: bool = False,
) -> Rollout:
    """Sample ``group_size`` images for each prompt record, score them and compute advantages.

    Images are sampled, decoded and scored ``batch_size`` at a time; with ``overlap_scoring`` the
    rewards of one chunk are computed while the next is sampled (same numbers as without).

    Member ``j`` of group ``g`` starts from noise seeded by ``(seed, g, j)`` (``group_ids`` default to
    ``0..P-1``; pass global ids so results do not depend on how groups are spread over ranks). Rewards are the
    weighted sum of ``reward``'s components, normalised into advantages with ``advantage_std`` and
    clipped to ``±advantage_clip`` when given (the official recipe: 5); groups where any component is non-finite for any
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
    settings = settings.resolve(backbone)
    seeds = member_seeds(seed, group_ids, group_size)
    output, components, timing = _sample_and_score(
        backbone, prompts, seeds, metadata, reward, settings,
        batch_size=batch_size, keep_trajectory=keep_trajectory, overlap=overlap_scoring, progress=progress,
    )
    latents = output.sample
    total = reward.total(components)

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
    advantages = group_advantages(rewards, group_index[index], std=advantage_std, clip=advantage_clip)
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
        settings=settings,
        sigmas=settings.sigmas(),
        trajectory=trajectory,
        log_probs=log_probs,
        seconds=time.perf_counter() - start_time,
        dropped_groups=dropped,
        **timing,
    )


def _sample_and_score(
    backbone: Backbone,
    prompts: Sequence[str],
    seeds: Sequence[int],
    metadata: Sequence[Any],
    reward: WeightedReward,
    settings: SamplerSettings,
    *,
    batch_size: int,
    keep_trajectory: bool,
    overlap: bool,
    progress: bool,
) -> tuple[SampleOutput, dict[str, Tensor], dict[str, float]]:
    """Sample, decode and score ``batch_size`` images at a time.

    With ``overlap`` the rewards of chunk k are computed in a worker thread while chunk k + 1 is
    sampled (a remote reward waits on the network, a local one runs beside the sampler; torch
    releases the GIL in both); without it the same chunks are scored in turn. Chunks, and therefore
    every number, are the same either way. Returns the samples, the reward components ``[N]`` and
    the timings ``sampling_seconds`` (sampling + decoding), ``scoring_seconds`` (inside the rewards)
    and ``reward_wait_seconds`` (the time sampling stood still waiting for scores).
    """
    from concurrent.futures import ThreadPoolExecutor

    scoring_seconds = 0.0

    def score(images: Tensor, chunk: slice) -> dict[str, Tensor]:
        nonlocal scoring_seconds
        started = time.perf_counter()
        try:
            with torch.no_grad():  # grad mode is per thread: the worker does not inherit the caller's
                return reward.components(
                    images, prompts[chunk], metadata[chunk], batch_size=256, allow_non_finite=True
                )
        finally:
            scoring_seconds += time.perf_counter() - started

    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="rollout", unit="batch", leave=False)
    outputs: list[SampleOutput] = []
    pending: list[Any] = []  # futures (overlap) or finished components
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards") if overlap else None
    sampling_seconds = wait_seconds = 0.0
    try:
        for start in starts:
            chunk = slice(start, start + batch_size)
            started = time.perf_counter()
            output = sample_latents(
                backbone, prompts[chunk], seeds[chunk], settings, batch_size=batch_size, return_trajectory=keep_trajectory
            )
            images = backbone.decode(output.sample)
            sampling_seconds += time.perf_counter() - started
            outputs.append(output)
            if pool is not None:
                pending.append(pool.submit(score, images, chunk))
            else:
                started = time.perf_counter()
                pending.append(score(images, chunk))
                wait_seconds += time.perf_counter() - started
        started = time.perf_counter()
        parts = [part.result() for part in pending] if pool is not None else pending
        wait_seconds += time.perf_counter() - started
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    output = SampleOutput(
        sample=torch.cat([o.sample for o in outputs]),
        trajectory=torch.cat([o.trajectory for o in outputs], dim=1) if keep_trajectory else None,
        log_probs=torch.cat([o.log_probs for o in outputs], dim=1) if outputs[0].log_probs is not None else None,
    )
    components = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    timing = {"sampling_seconds": sampling_seconds, "scoring_seconds": scoring_seconds, "reward_wait_seconds": wait_seconds}
    return output, components, timing


__all__ = ["Rollout", "generate_groups", "sample_latents"]
