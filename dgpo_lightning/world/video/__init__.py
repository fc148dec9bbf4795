"""The embedded video world: clips of the world's shapes moving on its grid, prompts with motion, a
programmatic reward from pixels and a tiny text-to-video flow model with its shipped checkpoint.

The scene/prompt names and the reward import eagerly (torch only): importing this package registers
the rewards ``world_video`` (strict) and ``world_video_partial`` (graded) in the rewards' registry.
The model names (diffusers) load on first use. ``"world_video:<split>"`` names the shipped prompt
splits (``train``, ``validation``, ``test``) wherever prompt files are read (``data.prompts``), and
the backbone registry names ``"world_video"`` by module string.
"""

from __future__ import annotations

import importlib
from typing import Any

from dgpo_lightning.world.video.reward import VideoWorldReward, score_clip
from dgpo_lightning.world.video.scene import (
    DIRECTIONS,
    FRAMES,
    MOTIONS,
    SPLITS,
    TAGS,
    Track,
    corrupt_metadata,
    prompt_file,
    render_clip,
    render_prompt,
    sample_clip,
    validate_metadata,
)

_LAZY = {
    "VideoWorldBackbone": "dgpo_lightning.world.video.backbone",
    "BASE_CHECKPOINT": "dgpo_lightning.world.video.backbone",
    "build_backbone": "dgpo_lightning.world.video.backbone",
    "load_backbone": "dgpo_lightning.world.video.backbone",
    "save_backbone": "dgpo_lightning.world.video.backbone",
    "tiny_backbone": "dgpo_lightning.world.video.backbone",
    "video_vocabulary": "dgpo_lightning.world.video.backbone",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DIRECTIONS",
    "FRAMES",
    "MOTIONS",
    "SPLITS",
    "TAGS",
    "Track",
    "VideoWorldReward",
    "corrupt_metadata",
    "prompt_file",
    "render_clip",
    "render_prompt",
    "sample_clip",
    "score_clip",
    "validate_metadata",
    *_LAZY,
]
