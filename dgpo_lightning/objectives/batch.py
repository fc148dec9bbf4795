"""The typed batch every objective trains on: whole groups of one rollout."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dgpo_lightning.sampling.settings import SamplerSettings


@dataclass
class GroupBatch:
    """Whole groups of rollout samples (a group never spans two batches).

    Attributes:
        latents: ``[N, ...]`` final samples ``x0``.
        prompts: ``N`` prompt strings.
        advantages: ``[N]`` group-normalised advantages.
        rewards: ``[N]`` weighted rewards.
        group_index: ``[N]`` global group ids (the group's id in the epoch's prompt draw).
        settings: the resolved sampler settings the rollout used (Flow-GRPO's ratio needs the same).
        sigmas: ``[S + 1]`` the rollout's sampler schedule.
        trajectory: ``[N, S + 1, ...]`` states along the sampler path (objectives that ask for it).
        log_probs: ``[N, S]`` per-step log-probabilities (SDE rollouts that keep the trajectory).
    """

    latents: Tensor
    prompts: list[str]
    advantages: Tensor
    rewards: Tensor
    group_index: Tensor
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    sigmas: Tensor | None = None
    trajectory: Tensor | None = None
    log_probs: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        sizes = {"prompts": len(self.prompts), "advantages": self.advantages.shape[0], "rewards": self.rewards.shape[0],
                 "group_index": self.group_index.shape[0]}
        for name, tensor in (("trajectory", self.trajectory), ("log_probs", self.log_probs)):
            if tensor is not None:
                sizes[name] = tensor.shape[0]
        wrong = {name: size for name, size in sizes.items() if size != n}
        if wrong:
            raise ValueError(f"GroupBatch of {n} latents has fields of other lengths: {wrong}")

    def __len__(self) -> int:
        return int(self.latents.shape[0])


__all__ = ["GroupBatch"]
