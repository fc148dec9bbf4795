"""The GenEval rewards: GenEval's correctness rules (:mod:`dgpo_lightning.rewards.geneval_rules`) over
a detector found by name.

The rules themselves, the :class:`Detection` type and the detector registry live in the leaf module
:mod:`~dgpo_lightning.rewards.geneval_rules` and are re-exported here. ``detector`` is a registered
name (``"world"``: the embedded world's programmatic detector, which the world registers), a spec
``{"kind": <registered name>, **options}`` such as ``{"kind": "mask2former", "model_path": ...,
"clip_path": ...}`` for real images (transformers Mask2Former instances + a CLIP colour classifier,
as GenEval's mmdet pipeline; see :mod:`dgpo_lightning.rewards.detectors`), or any callable
``images[B, 3, H, W] -> list[list[Detection]]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.rewards.base import register
from dgpo_lightning.rewards.geneval_rules import (  # noqa: F401  (re-exported: the rules' historic home)
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    POSITION_THRESHOLD,
    THRESHOLD,
    Detection,
    Detector,
    build_detector,
    check_metadata,
    detector_names,
    explain,
    geneval_ranking,
    image_correct,
    keep_detections,
    partial_credit,
    register_detector,
    relative_position,
    summarize,
)

# --------------------------------------------------------------------------- rewards


#: ``kind`` values of a detector spec that build :class:`~dgpo_lightning.rewards.detectors.Mask2FormerClipDetector`.
MASK2FORMER_KINDS = ("mask2former", "mask2former_clip")

DetectorSpec = str | Mapping[str, Any] | Detector


def resolve_detector(detector: DetectorSpec) -> Detector:
    """A detector callable from its spec, through the detector registry.

    A name (``"world"``: the embedded world's programmatic detector): the registered detector built
    without options. A mapping ``{"kind": name, **options}``: the detector registered as ``name``
    built with ``options`` (``kind: mask2former`` → a
    :class:`~dgpo_lightning.rewards.detectors.Mask2FormerClipDetector` from ``model_path``,
    ``clip_path``, ...; its weights load on its first call). A callable: returned as is.
    """
    if callable(detector):
        return detector
    if isinstance(detector, Mapping):
        name, options = detector.get("kind"), {key: value for key, value in detector.items() if key != "kind"}
    else:
        name, options = detector, {}
    if not isinstance(name, str) or name not in detector_names():
        raise ValueError(
            f"unknown detector {detector!r}: use a registered name ({', '.join(detector_names())}; 'world' is "
            "the embedded world's programmatic detector), a spec {'kind': <name>, **options} such as "
            "{'kind': 'mask2former', 'model_path': <Mask2Former instance-segmentation directory>, "
            "'clip_path': <CLIP directory>, ...} (real images: transformers Mask2Former with a CLIP colour "
            "classifier, as GenEval), or a callable images[B, 3, H, W] -> list[list[Detection]]"
        )
    return build_detector(name, **options)


class GenEvalReward:
    """``reward(images, prompts, metadata) -> Tensor[B]``: GenEval's 0/1 verdict or its partial credit."""

    def __init__(self, detector: DetectorSpec = "world", *, partial: bool = False):
        # Resolved now, so an unknown spec fails early; real detectors load their weights on first call.
        self.detector: Detector = resolve_detector(detector)
        self.partial = partial

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        name = "geneval_partial" if self.partial else "geneval"
        if metadata is None:
            raise ValueError(f"reward {name!r} needs per-prompt GenEval metadata (include/exclude clauses)")
        if len(metadata) != images.shape[0]:
            raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(metadata)} metadata records")
        for record in metadata:
            check_metadata(record)
        detections = self.detector(images)
        score = partial_credit if self.partial else (lambda m, d: float(image_correct(m, d)))
        scores = [score(m, d) for m, d in zip(metadata, detections)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register("geneval")
def geneval_reward(detector: DetectorSpec = "world") -> GenEvalReward:
    """GenEval's official 0/1 rule (extra objects are allowed outside the counting task)."""
    return GenEvalReward(detector, partial=False)


@register("geneval_partial")
def geneval_partial_reward(detector: DetectorSpec = "world") -> GenEvalReward:
    """GenEval partial credit (see :func:`partial_credit`)."""
    return GenEvalReward(detector, partial=True)
