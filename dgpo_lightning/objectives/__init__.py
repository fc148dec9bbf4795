"""Training objectives as plug-ins (plain torch, no Lightning): DGPO and the paper's baselines.

``model.algorithm: NAME`` picks one from the registry; ``build(name, settings, **options)`` makes it.
"""

from __future__ import annotations

import importlib
from typing import Any

from dgpo_lightning.objectives.base import (
    Auxiliary,
    AuxiliarySetup,
    Objective,
    RolloutNeeds,
    StepOutput,
    TrainContext,
    TrainingSettings,
    _REGISTRY,
    micro_batched_backward,
    register,
)
from dgpo_lightning.objectives.batch import GroupBatch

#: The registry's entries: importing each module registers its objective.
BUILTIN = ("dgpo", "flow_grpo", "diffusion_dpo", "diffusion_nft", "tdm_r1")


def _load_builtin() -> None:
    for name in BUILTIN:
        importlib.import_module(f"dgpo_lightning.objectives.{name}")


def available() -> list[str]:
    """Names of the registered objectives."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> type[Objective]:
    """The objective class called ``name`` (``ValueError`` naming the known ones otherwise)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"model.algorithm={name!r} is not a known objective; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, settings: TrainingSettings, **options: Any) -> Objective:
    """Instantiate objective ``name`` with the shared settings and its own options."""
    return get(name)(settings, **options)


__all__ = [
    "Auxiliary",
    "AuxiliarySetup",
    "BUILTIN",
    "GroupBatch",
    "Objective",
    "RolloutNeeds",
    "StepOutput",
    "TrainContext",
    "TrainingSettings",
    "available",
    "build",
    "get",
    "micro_batched_backward",
    "register",
]
