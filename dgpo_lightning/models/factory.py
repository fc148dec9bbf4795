"""Backbones by name, so configs can say ``backbone: world`` or ``backbone: sd3``."""

from __future__ import annotations

from typing import Any

BACKBONES = ("world", "sd3")


def load_backbone(kind: str, path: str | None = None, **options: Any):
    """Load a backbone implementing :class:`~dgpo_lightning.models.backbone.Backbone`.

    Args:
        kind: ``"world"`` (the embedded model; ``path=None`` is its shipped base checkpoint) or
            ``"sd3"`` (a Stable Diffusion 3/3.5 pipeline directory or hub id; ``path`` required).
        path: checkpoint directory or hub id.
        **options: backbone-specific options (SD3: ``resolution``, ``torch_dtype``).
    """
    if kind == "world":
        from dgpo_lightning.world.backbone import load_backbone as load_world

        return load_world(path, **options)
    if kind == "sd3":
        if not path:
            raise ValueError("model.backbone=sd3 needs model.model_path: a local SD3/3.5 pipeline directory or hub id")
        from dgpo_lightning.models.sd3 import SD3Backbone

        return SD3Backbone.from_pretrained(path, **options)
    raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")
