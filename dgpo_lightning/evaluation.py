"""Held-out evaluation: plan → sample → decode → score → aggregate → grid.

Used by Lightning's validation/test loops and by ``python -m dgpo_lightning.evaluate`` alike.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

from dgpo_lightning.sampling.seeds import member_seeds


def evaluation_plan(
    records: Sequence[Mapping[str, Any]], seed: int, images_per_prompt: int, min_images_per_task: int = 0
) -> list[tuple[int, int]]:
    """``(record index, image seed)`` of every held-out image, prompt by prompt.

    Prompt ``i`` of task ``τ`` (its GenEval ``tag``) gets
    ``n_i = max(images_per_prompt, ceil(min_images_per_task / |prompts of τ|))`` images, so a task
    with few prompts is not scored from a handful of images; image ``j`` is seeded by
    ``(seed, i, j)`` (:func:`~dgpo_lightning.sampling.seeds.member_seeds`), so raising ``n_i`` only
    adds images.
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
