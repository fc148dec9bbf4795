"""Backbones behind one protocol (see :mod:`dgpo_lightning.models.backbone`).

:class:`~dgpo_lightning.models.sd3.SD3Backbone` wraps a diffusers Stable Diffusion 3/3.5 pipeline;
:mod:`dgpo_lightning.models.lora` adds, disables (reference), folds, saves and loads peft adapters;
:mod:`dgpo_lightning.models.testing` builds tiny random stand-ins offline;
:mod:`dgpo_lightning.models.factory` finds backbones by name (``register_backbone``), and
:mod:`dgpo_lightning.models.mask2former` holds the Mask2Former inference head. diffusers,
transformers and peft are imported only when those are used.
"""

from dgpo_lightning.models.backbone import (
    Backbone,
    Conditioning,
    concat_conditioning,
    index_conditioning,
    repeat_conditioning,
)
from dgpo_lightning.models.sd3 import SD3Backbone

__all__ = [
    "Backbone",
    "Conditioning",
    "SD3Backbone",
    "concat_conditioning",
    "index_conditioning",
    "repeat_conditioning",
]
