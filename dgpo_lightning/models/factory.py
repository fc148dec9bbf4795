"""Backbones by name, so configs can say ``backbone: world`` or ``backbone: sd3``.

A registry of loaders ``loader(path, **options) -> Backbone``. The built-in ones are named in
:data:`BUILTIN_BACKBONES` as ``"module:function"`` strings and imported on first use: the models
layer never imports the world (which sits above it) to find the world's backbone, and callers need
not import anything first. Other backbones join with :func:`register_backbone`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

#: Built-in loaders, ``name -> "module:function"``; each function takes ``(path, **options)``.
BUILTIN_BACKBONES: dict[str, str] = {
    "world": "dgpo_lightning.world.backbone:load_backbone",
    "sd3": "dgpo_lightning.models.sd3:load_backbone",  # SD3 and SD3.5 Medium/Large
    "flux": "dgpo_lightning.models.flux:load_backbone",  # FLUX.1 dev (guidance-distilled) and schnell
    "qwen_image": "dgpo_lightning.models.qwen_image:load_backbone",
    "sana": "dgpo_lightning.models.sana:load_backbone",
    "z_image": "dgpo_lightning.models.z_image:load_backbone",
    "wan": "dgpo_lightning.models.wan:load_backbone",  # Wan 2.1 text-to-video
    "world_video": "dgpo_lightning.world.video.backbone:load_backbone",  # the embedded video world
}

#: Kept for callers that list the built-in names.
BACKBONES = tuple(BUILTIN_BACKBONES)

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_backbone(name: str, loader: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``loader(path, **options) -> Backbone`` under ``name`` (a built-in name is refused)."""
    if name in BUILTIN_BACKBONES or _LOADERS.get(name, loader) is not loader:
        raise ValueError(f"backbone {name!r} is already registered")
    _LOADERS[name] = loader
    return loader


def available_backbones() -> list[str]:
    """Names :func:`load_backbone` accepts."""
    return sorted({*BUILTIN_BACKBONES, *_LOADERS})


def _loader(kind: str) -> Callable[..., Any]:
    if kind in _LOADERS:
        return _LOADERS[kind]
    if kind in BUILTIN_BACKBONES:
        module, _, attribute = BUILTIN_BACKBONES[kind].partition(":")
        return getattr(importlib.import_module(module), attribute)
    raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(available_backbones())}")


def load_backbone(kind: str, path: str | None = None, **options: Any):
    """Load a backbone implementing :class:`~dgpo_lightning.models.backbone.Backbone`.

    Args:
        kind: ``"world"`` (the embedded model; ``path=None`` is its shipped base checkpoint), a
            diffusers pipeline family (``"sd3"``, ``"flux"``, ``"qwen_image"``, ``"sana"``,
            ``"z_image"``: a pipeline directory or cached hub id, ``path`` required), or a name
            added with :func:`register_backbone`.
        path: checkpoint directory or hub id.
        **options: backbone-specific options (all diffusers ones: ``resolution``, ``torch_dtype``,
            ``offload_text_encoders``, ``prompt_cache_size``; FLUX: ``guidance``,
            ``max_sequence_length``; Z-Image: ``turbo``; see each class).
    """
    return _loader(kind)(path, **options)
