"""The one place that derives seeds: rollouts, held-out images, SDE step noise and training draws.

Every random number the training loop uses is a function of the run seed and a position (epoch,
group, member, optimizer step), never of an RNG's history, so a resumed run repeats exactly what
an uninterrupted one does and a group gets the same images whichever rank or batch holds it.

The formulas below are the project's since its first version (changing one changes every measured
number); they chain integers with a large prime and draw per-sample seeds from a seeded generator.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

import torch

#: Prime used to chain a seed with a position: ``chain(seed, p) = seed · 1_000_003 + p``.
MIX = 1_000_003
#: Second multiplier of the training generator (keeps step and salt from colliding).
_SALT_MIX = 65_537


def chain(seed: int, position: int) -> int:
    """``seed · 1_000_003 + position``: a seed for ``position`` (an epoch, a group) under ``seed``."""
    return int(seed) * MIX + int(position)


def draw_seeds(seed: int, count: int) -> list[int]:
    """``count`` per-sample seeds drawn from one seed (non-negative, below ``2**62``)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def rollout_seed(seed: int, epoch: int) -> int:
    """Seed of rollout epoch ``epoch`` (its prompt draw, batch order and image noise)."""
    return chain(seed, epoch)


def resample_seed(seed: int, epoch: int, attempt: int) -> int:
    """Seed of epoch ``epoch``'s ``attempt``-th resampled rollout (``attempt`` 0: :func:`rollout_seed`).

    A rollout without any group of unequal rewards is drawn again (fresh prompts and noise); the
    retries are a function of ``(seed, epoch, attempt)`` only, so a resumed run resamples exactly as
    an uninterrupted one. Kept below ``2**40`` so that chaining group ids onto it stays in 64 bits.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if attempt == 0:
        return rollout_seed(seed, epoch)
    return int(draw_seeds(rollout_seed(seed, epoch), attempt)[attempt - 1]) % 2**40


def member_seeds(seed: int, group_ids: Sequence[int], group_size: int) -> list[int]:
    """Seed of member ``j`` of group ``g``, group-major: a function of ``(seed, g, j)`` only.

    Used for rollouts (``seed`` = :func:`rollout_seed`) and for held-out images (``seed`` = the
    evaluation seed, one "group" per prompt), so raising ``group_size`` only adds images.
    """
    return [draw_seeds(chain(seed, g), group_size)[j] for g in group_ids for j in range(group_size)]


def sde_noise_seeds(sample_seeds: Sequence[int]) -> list[int]:
    """Seeds of the SDE's per-step noise, independent of the initial noise of the same samples."""
    return [int(s) + MIX for s in sample_seeds]


def training_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """CPU generator of optimizer step ``step``'s draws for ``salt`` (a group id): timesteps, noise."""
    return torch.Generator().manual_seed(chain(seed, step) * _SALT_MIX + int(salt))


def evaluation_plan(
    records: Sequence[Mapping[str, Any]], seed: int, images_per_prompt: int, min_images_per_task: int = 0
) -> list[tuple[int, int]]:
    """``(record index, image seed)`` of every held-out image, prompt by prompt.

    Prompt ``i`` of task ``τ`` (its GenEval ``tag``) gets
    ``n_i = max(images_per_prompt, ceil(min_images_per_task / |prompts of τ|))`` images, so a task
    with few prompts is not scored from a handful of images; image ``j`` is seeded by
    ``(seed, i, j)`` (:func:`member_seeds`), so raising ``n_i`` only adds images.
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
        plan += [(index, image_seed) for image_seed in member_seeds(seed, [index], count)]
    return plan


__all__ = ["MIX", "chain", "draw_seeds", "evaluation_plan", "member_seeds", "resample_seed", "rollout_seed", "sde_noise_seeds", "training_generator"]
