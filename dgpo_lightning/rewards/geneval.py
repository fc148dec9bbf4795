"""GenEval's correctness rules over any object detector, and the GenEval rewards.

The rules follow the GenEval benchmark (djghosh13/geneval, ``evaluation/evaluate_images.py`` and
``evaluation/summary_scores.py``):

- detections of each class are sorted by confidence, those strictly above 0.3 (0.9 for the
  ``counting`` task) are kept, at most 16 per class, without overlap suppression;
- an include clause takes the ``count`` most confident detections of its class (fewer → wrong);
  with a colour, all of them must have that colour; with ``position: [relation, j]``, every taken
  object must stand in ``relation`` to every object taken by clause ``j`` (which must have matched),
  using GenEval's box rule with a margin of 0.1·(d_A + d_B) and ±0.5 thresholds on the normalised
  offset;
- an exclude clause fails the image when its class has ≥ ``count`` kept detections;
- a task score is the fraction of correct images; overall is the unweighted mean of task scores.

The rules only see :class:`Detection` lists, so the embedded world's programmatic detector and a
real one share them. ``detector`` is ``"world"``, a spec ``{"kind": "mask2former", "model_path": ...,
"clip_path": ...}`` for real images (transformers Mask2Former instances + a CLIP colour classifier, as
GenEval's mmdet pipeline; see :mod:`dgpo_lightning.rewards.detectors`), or any callable
``images[B, 3, H, W] -> list[list[Detection]]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.rewards.base import register

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence in ``(0, 1]``, box ``(x0, y0, x1, y1)`` in pixels
    (x to the right, y downward) and its colour name (``None`` when unknown)."""

    cls: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


Detector = Callable[[Tensor], list[list[Detection]]]


def keep_detections(detections: Sequence[Detection], tag: str | None) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps: sorted by confidence, above the task's threshold, ≤ 16."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):  # stable: ties keep input order
        if detection.score > threshold and len(kept.setdefault(detection.cls, [])) < MAX_OBJECTS:
            kept[detection.cls].append(detection)
    return {cls: found for cls, found in kept.items() if found}


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` relative to ``b`` by GenEval's box rule (empty when they overlap too much)."""
    centre_a = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    centre_b = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    dims_a = (abs(a.box[2] - a.box[0]), abs(a.box[3] - a.box[1]))
    dims_b = (abs(b.box[2] - b.box[0]), abs(b.box[3] - b.box[1]))
    offset = [ca - cb for ca, cb in zip(centre_a, centre_b)]
    revised = [
        math.copysign(max(abs(o) - POSITION_THRESHOLD * (da + db), 0.0), o) if o else 0.0
        for o, da, db in zip(offset, dims_a, dims_b)
    ]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _all_related(objects: Sequence[Detection], targets: Sequence[Detection], relation: str) -> bool:
    return all(relation in relative_position(obj, target) for obj in objects for target in targets)


def explain(metadata: Mapping[str, Any], detections: Sequence[Detection]) -> tuple[bool, list[str]]:
    """GenEval's verdict on one image and the reasons it failed (empty when correct)."""
    _check_metadata(metadata)
    kept = keep_detections(detections, metadata.get("tag"))
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        taken = kept.get(cls, [])[:count]
        matched = len(taken) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(taken)}")
        else:
            if "color" in clause:
                hits = sum(d.color == clause["color"] for d in taken)
                if hits < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {cls}>={count}, found {hits}")
            if "position" in clause and matched:
                relation, target = clause["position"]
                targets = matched_groups[target] if target < len(matched_groups) else None
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                elif not _all_related(taken, targets, relation):
                    matched = False
                    reasons.append(f"expected {cls} {relation} target")
        matched_groups.append(taken if matched else None)
    for clause in metadata.get("exclude", []):
        found = len(kept.get(clause["class"], []))
        if found >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {found}")
    return not reasons, reasons


def image_correct(metadata: Mapping[str, Any], detections: Sequence[Detection]) -> bool:
    """GenEval's official 0/1 verdict for one image."""
    return explain(metadata, detections)[0]


def partial_credit(metadata: Mapping[str, Any], detections: Sequence[Detection]) -> float:
    """A dense score in ``[0, 1]``: the mean over clauses of per-clause scores.

    An include clause of ``n`` objects with ``f`` kept detections scores the mean of its terms:
    count ``max(0, 1 − |n − f| / n)``; colour (if asked) the fraction of the ``n`` most confident
    detections with that colour; position (if asked) 1 when every one of them stands in the
    relation to every top detection of the target clause, else 0. An exclude clause scores 1 when
    it does not hold, 0 when it does. Unlike the official rule, extra detections cost credit (the
    count term wants exactly ``n``), and the position term does not require the target's colour.
    """
    _check_metadata(metadata)
    kept = keep_detections(detections, metadata.get("tag"))
    include = metadata["include"]
    scores = []
    for clause in include:
        cls, count = clause["class"], clause["count"]
        found = kept.get(cls, [])
        taken = found[:count]
        terms = [max(0.0, 1.0 - abs(count - len(found)) / count)]
        if "color" in clause:
            terms.append(sum(d.color == clause["color"] for d in taken) / count)
        if "position" in clause:
            relation, target = clause["position"]
            target_clause = include[target]
            targets = kept.get(target_clause["class"], [])[: target_clause["count"]]
            ok = len(taken) == count and len(targets) == target_clause["count"]
            terms.append(float(ok and _all_related(taken, targets, relation)))
        scores.append(sum(terms) / len(terms))
    for clause in metadata.get("exclude", []):
        scores.append(float(len(kept.get(clause["class"], [])) < clause["count"]))
    return sum(scores) / len(scores)


def summarize(
    tags: Sequence[str], correct: Sequence[bool | float], prompt_ids: Sequence[Any] | None = None
) -> dict[str, float]:
    """GenEval's summary: per-task mean correctness, ``overall`` = unweighted mean of the task scores
    present, and with ``prompt_ids`` also ``prompt_any_correct`` (fraction of prompts with ≥ 1 correct image)."""
    if len(tags) != len(correct):
        raise ValueError(f"{len(tags)} tags but {len(correct)} correctness values")
    if not tags:
        raise ValueError("nothing to summarize: no images")
    by_task: dict[str, list[float]] = {}
    for tag, value in zip(tags, correct):
        by_task.setdefault(tag, []).append(float(value))
    summary = {tag: sum(values) / len(values) for tag, values in by_task.items()}
    summary["overall"] = sum(summary.values()) / len(summary)
    if prompt_ids is not None:
        if len(prompt_ids) != len(tags):
            raise ValueError(f"{len(tags)} tags but {len(prompt_ids)} prompt ids")
        any_correct: dict[Any, bool] = {}
        for prompt_id, value in zip(prompt_ids, correct):
            any_correct[prompt_id] = any_correct.get(prompt_id, False) or bool(value)
        summary["prompt_any_correct"] = sum(any_correct.values()) / len(any_correct)
    return summary


# --------------------------------------------------------------------------- rewards


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("include"), list):
        raise ValueError(
            "GenEval scoring needs each prompt's metadata with an 'include' list of clauses "
            f"(GenEval jsonl schema), got {metadata!r}"
        )


#: ``kind`` values of a detector spec that build :class:`~dgpo_lightning.rewards.detectors.Mask2FormerClipDetector`.
MASK2FORMER_KINDS = ("mask2former", "mask2former_clip")

DetectorSpec = str | Mapping[str, Any] | Detector


def resolve_detector(detector: DetectorSpec) -> Detector:
    """A detector callable from its spec.

    ``"world"``: the embedded world's programmatic detector. A mapping with ``kind: mask2former``:
    a :class:`~dgpo_lightning.rewards.detectors.Mask2FormerClipDetector` built from the mapping's
    other keys (``model_path``, ``clip_path``, ...; weights load on its first call). A callable:
    returned as is.
    """
    if callable(detector):
        return detector
    if detector == "world":
        from dgpo_lightning.world.detector import detect_batch

        return detect_batch
    if isinstance(detector, Mapping) and detector.get("kind") in MASK2FORMER_KINDS:
        from dgpo_lightning.rewards.detectors import Mask2FormerClipDetector

        options = {key: value for key, value in detector.items() if key != "kind"}
        try:
            return Mask2FormerClipDetector(**options)
        except TypeError as error:
            raise ValueError(f"detector spec {dict(detector)!r}: {error}") from error
    raise ValueError(
        f"unknown detector {detector!r}: use 'world' (the embedded world's programmatic detector), "
        "{'kind': 'mask2former', 'model_path': <Mask2Former instance-segmentation directory>, "
        "'clip_path': <CLIP directory>, ...} (real images: transformers Mask2Former with a CLIP colour "
        "classifier, as GenEval), or a callable images[B, 3, H, W] -> list[list[Detection]]"
    )


class GenEvalReward:
    """``reward(images, prompts, metadata) -> Tensor[B]``: GenEval's 0/1 verdict or its partial credit."""

    def __init__(self, detector: DetectorSpec = "world", *, partial: bool = False):
        self._detector_spec = detector
        self._detector: Detector | None = None
        self.partial = partial
        if not (isinstance(detector, str) and detector == "world"):
            # Fails early on an unknown spec; real detectors load their weights on first call anyway.
            self._detector = resolve_detector(detector)

    @property
    def detector(self) -> Detector:
        if self._detector is None:  # "world" is resolved on first use: its modules load lazily
            self._detector = resolve_detector(self._detector_spec)
        return self._detector

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        name = "geneval_partial" if self.partial else "geneval"
        if metadata is None:
            raise ValueError(f"reward {name!r} needs per-prompt GenEval metadata (include/exclude clauses)")
        if len(metadata) != images.shape[0]:
            raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(metadata)} metadata records")
        for record in metadata:
            _check_metadata(record)
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
