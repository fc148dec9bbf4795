"""The embedded text-to-image world: scenes and prompts, detector, tiny flow model and its shipped checkpoint.

The scene/prompt names import eagerly (torch only); the model names (diffusers) load on first use,
so the renderer and the detector stay cheap to import. The world sits above the rewards: its detector
registers itself in the rewards' detector registry as ``"world"`` (``dgpo_lightning.world.detector``),
and the backbone registry (``models.factory``) names ``"world"`` by module string; neither lower layer
imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

from dgpo_lightning.world.scene import (
    CLASSES,
    COLORS,
    RELATIONS,
    TAGS,
    SceneObject,
    corrupt_metadata,
    prompt_file,
    render,
    render_prompt,
    sample_scene,
    validate_metadata,
)

_LAZY = {
    "detect": "dgpo_lightning.world.detector",
    "detect_batch": "dgpo_lightning.world.detector",
    "world_detector": "dgpo_lightning.world.detector",
    "WorldTextEncoder": "dgpo_lightning.world.model",
    "world_vocabulary": "dgpo_lightning.world.model",
    "WorldBackbone": "dgpo_lightning.world.backbone",
    "BASE_CHECKPOINT": "dgpo_lightning.world.backbone",
    "build_backbone": "dgpo_lightning.world.backbone",
    "load_backbone": "dgpo_lightning.world.backbone",
    "save_backbone": "dgpo_lightning.world.backbone",
    "tiny_backbone": "dgpo_lightning.world.backbone",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASSES",
    "COLORS",
    "RELATIONS",
    "TAGS",
    "SceneObject",
    "corrupt_metadata",
    "prompt_file",
    "render",
    "render_prompt",
    "sample_scene",
    "validate_metadata",
    *_LAZY,
]
