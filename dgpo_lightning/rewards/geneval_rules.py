"""GenEval's correctness rules over detections, the :class:`Detection` type and the detector registry.

A leaf module (standard library only): every detector (the embedded world's, the Mask2Former one)
and every consumer of the rules (rewards, evaluation) imports it, and it imports none of them.

The rules follow the GenEval benchmark (djghosh13/geneval, ``evaluation/evaluate_images.py`` and
``evaluation/summary_scores.py``):

- detections of each class are ranked by confidence (ties: see :func:`geneval_ranking`), those
  strictly above 0.3 (0.9 for the ``counting`` task) are kept, at most 16 per class, without
  overlap suppression;
- include clauses are evaluated in order; one takes the ``count`` best-ranked detections of its
  class (fewer → wrong); with a colour, all of them must have that colour; with
  ``position: [relation, j]``, every taken object must stand in ``relation`` to every object taken
  by the EARLIER clause ``j`` (which must have matched), by GenEval's box rule with a margin of
  0.1·(d_A + d_B) and ±0.5 thresholds on the normalised offset;
- an exclude clause fails the image when its class has ≥ ``count`` kept detections;
- a task score is the fraction of correct images; overall is the unweighted mean of task scores.

Detectors are found by name in a registry (:func:`register_detector`, :func:`build_detector`); the
modules that provide the built-in ones are named by string in :data:`DETECTOR_PROVIDERS`, so this
layer never imports the world (which sits above the rewards) to find the world's detector.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # annotations only: the rules themselves never touch tensors
    from torch import Tensor

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


Detector = Callable[["Tensor"], list[list[Detection]]]


# --------------------------------------------------------------------------- ranking and keeping


def geneval_ranking(scores: Sequence[float]) -> list[int]:
    """Indices of ``scores`` best first, with ties broken as GenEval's code breaks them.

    GenEval ranks one class's detections with ``np.argsort(scores)[::-1]``: numpy's default
    (``"quicksort"``) ascending argsort, reversed. In GenEval's pinned environment (numpy 1.23.1)
    that sort is a scalar introsort which sorts any run of at most 16 elements by insertion sort,
    which is stable: equal scores come out in ascending index order, and the reversal then puts
    the detection listed LATER first. This function applies that rule for any length, deterministically:
    decreasing score, and among equal scores decreasing index (= ``np.argsort(s, kind="stable")[::-1]``).

    Caveats on numpy itself: for more than 16 detections of one class numpy 1.23's partitioning is
    not stable, and numpy ≥ 1.25 (AVX-512) / ≥ 2.0 (AVX2) dispatch the default argsort to SIMD
    sorts whose tie order differs even for 4 elements (numpy 2.4 on AVX2:
    ``np.argsort([1., 1., .5, .5])`` is ``[3, 2, 1, 0]``). So GenEval's own script re-run in a newer
    environment can break ties differently; the pinned environment is the reference here.
    """
    return sorted(range(len(scores)), key=lambda i: (scores[i], i), reverse=True)


def keep_detections(detections: Sequence[Detection], tag: str | None) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps, best first: above the task's threshold, ≤ 16.

    Ranking is per class as in GenEval (:func:`geneval_ranking`); the relative order of one class's
    detections in the mixed input list is its listing order.
    """
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:
        # Dropping low scores before ranking gives the same order as GenEval's rank-then-threshold
        # (the ranking is a total order), and keeps NaN scores out of the sort keys.
        if detection.score > threshold:
            by_class.setdefault(detection.cls, []).append(detection)
    return {
        cls: [found[i] for i in geneval_ranking([d.score for d in found])[:MAX_OBJECTS]]
        for cls, found in by_class.items()
    }


# --------------------------------------------------------------------------- position rule


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` relative to ``b`` by GenEval's box rule (empty when they overlap too much).

    Centres c, box sizes d; offset = c_a − c_b; per axis the offset shrinks towards 0 by the margin
    0.1·(d_a + d_b); if both shrunk components are below 1e-3 there is no relation, else
    (dx, dy) = shrunk / ‖offset‖ and dx < −0.5 → left of, dx > 0.5 → right of, dy < −0.5 → above,
    dy > 0.5 → below (y grows downward).
    """
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


# --------------------------------------------------------------------------- metadata


def check_metadata(metadata: Any) -> None:
    """Raise ``ValueError`` unless ``metadata`` is a record GenEval's rules can score.

    It needs an ``include`` list of clauses, and every ``position: [relation, j]`` must point at an
    EARLIER include clause (``0 <= j <`` its own index): GenEval evaluates the clauses in order and
    reads the target's matched objects, so a clause pointing at itself or a later one could never
    be satisfied.
    """
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("include"), list):
        raise ValueError(
            "GenEval scoring needs each prompt's metadata with an 'include' list of clauses "
            f"(GenEval jsonl schema), got {metadata!r}"
        )
    for kind in ("include", "exclude"):
        for index, clause in enumerate(metadata.get(kind) or []):
            count = clause.get("count") if isinstance(clause, Mapping) else None
            if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
                raise ValueError(f"{kind}[{index}] must be an object with a 'class' name and a 'count', got {clause!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{kind}[{index}] ({clause['class']!r}): count must be a positive integer, got {count!r}")
    for index, clause in enumerate(metadata["include"]):
        if "position" not in clause:
            continue
        position = clause["position"]
        target = position[1] if isinstance(position, (list, tuple)) and len(position) == 2 else None
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
            raise ValueError(
                f"include[{index}] ({clause.get('class')!r}): position {position!r} must point at an earlier "
                f"include clause (target index 0..{index - 1}); GenEval evaluates clauses in order, so a "
                "position on a later clause or on its own can never be rewarded"
            )


# --------------------------------------------------------------------------- verdicts


def explain(metadata: Mapping[str, Any], detections: Sequence[Detection]) -> tuple[bool, list[str]]:
    """GenEval's verdict on one image and the reasons it failed (empty when correct)."""
    check_metadata(metadata)
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
                targets = matched_groups[target]  # an earlier clause (check_metadata)
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
    count ``max(0, 1 − |n − f| / n)``; colour (if asked) the fraction of the ``n`` best-ranked
    detections with that colour; position (if asked) 1 when every one of them stands in the
    relation to every top detection of the target clause, else 0. An exclude clause scores 1 when
    it does not hold, 0 when it does. Unlike the official rule, extra detections cost credit (the
    count term wants exactly ``n``), and the position term does not require the target's colour.
    """
    check_metadata(metadata)
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


# --------------------------------------------------------------------------- detector registry

#: ``factory(**options) -> Detector`` by name.
_DETECTORS: dict[str, Callable[..., Detector]] = {}

#: The modules that register the built-in detectors when imported. Named by string and imported on
#: first lookup, so that the rules never import the layers that provide detectors.
DETECTOR_PROVIDERS: dict[str, str] = {
    "world": "dgpo_lightning.world.detector",
    "mask2former": "dgpo_lightning.rewards.detectors",
    "mask2former_clip": "dgpo_lightning.rewards.detectors",
}


def register_detector(name: str, factory: Callable[..., Detector]) -> Callable[..., Detector]:
    """Register ``factory(**options) -> Detector`` under ``name``; returns ``factory``.

    Registering the same factory again (a module imported twice) is a no-op; another factory under
    a taken name is refused.
    """
    existing = _DETECTORS.get(name)
    if existing is not None and existing is not factory:
        raise ValueError(f"detector {name!r} is registered twice ({existing!r} and {factory!r})")
    _DETECTORS[name] = factory
    return factory


def detector_names() -> list[str]:
    """Names :func:`build_detector` accepts (the built-in providers are imported to list theirs)."""
    for module in sorted(set(DETECTOR_PROVIDERS.values())):
        importlib.import_module(module)
    return sorted(_DETECTORS)


def build_detector(name: str, **options: Any) -> Detector:
    """The detector registered as ``name``, built with ``options``.

    A built-in name whose provider module is not imported yet is imported first (it registers
    itself); unknown names and options the factory rejects raise ``ValueError``.
    """
    if name not in _DETECTORS and name in DETECTOR_PROVIDERS:
        importlib.import_module(DETECTOR_PROVIDERS[name])
    if name not in _DETECTORS:
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(detector_names())}")
    try:
        return _DETECTORS[name](**options)
    except TypeError as error:
        raise ValueError(f"detector {name!r} with options {options!r}: {error}") from error
