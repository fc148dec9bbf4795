"""GenEval's rules on hand-built detection lists, the partial credit, the summary and the registered rewards."""

import math
import random

import numpy as np
import pytest
import torch

from dgpo_lightning.rewards import available, build
from dgpo_lightning.rewards.base import check_scores
from dgpo_lightning.rewards.geneval import (
    Detection,
    check_metadata,
    explain,
    geneval_ranking,
    image_correct,
    keep_detections,
    partial_credit,
    relative_position,
    summarize,
)


def det(cls, score=0.95, box=(0, 0, 8, 8), color=None):
    return Detection(cls, score, tuple(float(v) for v in box), color)


def at(cls, x, y, size=8, **kwargs):
    """A detection whose box has its top-left corner at (x, y)."""
    return det(cls, box=(x, y, x + size, y + size), **kwargs)


SINGLE = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "triangle", "count": 3}],
    "exclude": [{"class": "triangle", "count": 4}],
    "prompt": "a photo of three triangles",
}
RED_CIRCLE = {
    "tag": "colors",
    "include": [{"class": "circle", "count": 1, "color": "red"}],
    "prompt": "a photo of a red circle",
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    "prompt": "a photo of a red circle and a blue square",
}
LEFT_OF = {
    "tag": "position",
    "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a circle left of a square",
}


# --------------------------------------------------------------------------- detections kept


def test_thresholds_are_strict_and_task_dependent():
    found = [det("circle", s) for s in (0.3, 0.31, 0.95, 0.5, 0.9)]
    assert [d.score for d in keep_detections(found, "colors")["circle"]] == [0.95, 0.9, 0.5, 0.31]
    assert [d.score for d in keep_detections(found, "counting")["circle"]] == [0.95]
    assert keep_detections([det("circle", 0.2)], "colors") == {}


def test_at_most_16_per_class_most_confident_first():
    found = [det("square", 0.31 + 0.03 * i) for i in range(20)] + [det("circle", 0.5)]
    kept = keep_detections(found, "two_object")
    assert len(kept["square"]) == 16 and len(kept["circle"]) == 1
    assert [d.score for d in kept["square"]] == sorted((d.score for d in found[4:20]), reverse=True)


# --------------------------------------------------------------------------- position rule


def test_relative_position_by_hand():
    b = at("square", 20, 10)
    assert relative_position(at("circle", 4, 10), b) == {"left of"}
    assert relative_position(at("circle", 36, 10), b) == {"right of"}
    assert relative_position(at("circle", 20, -6), b) == {"above"}
    assert relative_position(at("circle", 20, 26), b) == {"below"}
    # One-cell diagonal: revised offset (−8.4, −8.4) / 14.14 = −0.59 on both axes.
    assert relative_position(at("circle", 10, 0), b) == {"left of", "above"}
    # Offset within the margin 0.1·(8 + 8) = 1.6 on both axes: no relation at all.
    assert relative_position(at("circle", 18.5, 11), b) == set()


def test_position_margin_decides_near_the_threshold():
    # Boxes 10 wide → margin 2. Offset (−10, −h): dx = −8 / sqrt(100 + h²) < −0.5 iff h < 12.49;
    # without the margin dx = −10 / sqrt(100 + h²) would still pass at h = 13.
    b = det("square", box=(20, 20, 30, 30))
    assert "left of" in relative_position(det("circle", box=(10, 8, 20, 18)), b)  # h = 12
    assert "left of" not in relative_position(det("circle", box=(10, 7, 20, 17)), b)  # h = 13
    assert -10 / math.hypot(10, 13) < -0.5


# --------------------------------------------------------------------------- the official verdict


def test_single_and_two_objects():
    assert image_correct(SINGLE, [det("circle", 0.5)])
    assert not image_correct(SINGLE, [det("circle", 0.3)])
    assert not image_correct(SINGLE, [det("square")])
    two = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}
    assert image_correct(two, [det("circle"), det("square"), det("square", 0.8)])  # extras are fine outside counting
    assert not image_correct(two, [det("circle"), det("circle")])


def test_counting_threshold_and_exclude_clause():
    triangles = lambda *scores: [det("triangle", s) for s in scores]  # noqa: E731
    assert image_correct(COUNTING, triangles(0.95, 0.95, 0.95))
    assert not image_correct(COUNTING, triangles(0.95, 0.95, 0.95, 0.95))  # four ≥ exclude count
    assert image_correct(COUNTING, triangles(0.95, 0.95, 0.95, 0.85))  # the fourth is below 0.9
    assert not image_correct(COUNTING, triangles(0.95, 0.95, 0.85))  # only two above 0.9
    relaxed = dict(COUNTING, tag="two_object")  # the same clauses outside the counting task use 0.3
    assert image_correct(relaxed, triangles(0.95, 0.95, 0.85))
    assert not image_correct(relaxed, triangles(0.95, 0.95, 0.95, 0.85))
    _, reasons = explain(COUNTING, triangles(0.95, 0.95, 0.95, 0.95))
    assert reasons == ["expected triangle<4, found 4"]


def test_colour_is_checked_on_the_most_confident_objects():
    assert image_correct(RED_CIRCLE, [det("circle", 0.9, color="red"), det("circle", 0.6, color="blue")])
    assert not image_correct(RED_CIRCLE, [det("circle", 0.9, color="blue"), det("circle", 0.6, color="red")])
    assert not image_correct(RED_CIRCLE, [det("circle", 0.9, color=None)])
    assert image_correct(COLOR_ATTR, [det("circle", color="red"), det("square", color="blue")])
    assert not image_correct(COLOR_ATTR, [det("circle", color="blue"), det("square", color="red")])
    two_red = {"tag": "colors", "include": [{"class": "circle", "count": 2, "color": "red"}], "prompt": "x"}
    assert not image_correct(two_red, [det("circle", 0.9, color="red"), det("circle", 0.8, color="blue")])


def test_position_clause():
    square = at("square", 20, 10)
    assert image_correct(LEFT_OF, [square, at("circle", 4, 10)])
    assert not image_correct(LEFT_OF, [square, at("circle", 36, 10)])
    assert not image_correct(LEFT_OF, [square, at("circle", 19, 10)])  # overlapping: no relation
    # Knight's move (−10, −20): dx = −8.4 / 22.4 = −0.38, not left of.
    assert not image_correct(LEFT_OF, [square, at("circle", 10, -10)])
    # Only the most confident circle is judged.
    assert not image_correct(LEFT_OF, [square, at("circle", 36, 10, score=0.9), at("circle", 4, 10, score=0.5)])


def test_position_needs_every_pair_and_a_matched_target():
    two_left = {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["left of", 0]}],
        "prompt": "x",
    }
    square = at("square", 20, 10)
    assert image_correct(two_left, [square, at("circle", 4, 10), at("circle", 4, 24)])
    assert not image_correct(two_left, [square, at("circle", 4, 10), at("circle", 36, 10)])
    red_target = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "red"},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "x",
    }
    correct, reasons = explain(red_target, [at("square", 20, 10, color="blue"), at("circle", 4, 10)])
    assert not correct and any("no target for circle" in r for r in reasons)
    assert image_correct(red_target, [at("square", 20, 10, color="red"), at("circle", 4, 10)])


# --------------------------------------------------------------------------- ties, as GenEval's code breaks them


def _insertion_argsort(scores):
    """The ascending argsort numpy 1.23 (GenEval's pinned version) runs on ≤ 16 elements: a plain
    insertion sort, written here from its definition (an element moves left past strictly greater keys only)."""
    order = list(range(len(scores)))
    for i in range(1, len(order)):
        j = i
        while j > 0 and scores[order[j - 1]] > scores[order[j]]:
            order[j - 1], order[j] = order[j], order[j - 1]
            j -= 1
    return np.array(order, dtype=np.int64)


def _reference_relations(a, b):
    """GenEval's box rule, vectorised with numpy over the two axes."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # [object, corner, axis]
    centres, sizes = boxes.mean(axis=1), np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centres[0] - centres[1]
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - 0.1 * sizes.sum(axis=0), 0.0)
    if (np.abs(shrunk) < 1e-3).all():
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    named = (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
    return {name for name, holds in named if holds}


def _reference_verdict(metadata, detections, argsort=_insertion_argsort):
    """GenEval's procedure re-computed independently of the module: per class, ``argsort(scores)[::-1]``,
    threshold, cap 16; include clauses in order (count, colour count, position against the target's
    matched objects); any exclude clause that holds fails the image."""
    threshold = 0.9 if metadata["tag"] == "counting" else 0.3
    objects = {}
    for cls in dict.fromkeys(d.cls for d in detections):
        listed = [d for d in detections if d.cls == cls]
        scores = np.array([d.score for d in listed])
        ordering = argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > threshold][:16]
        if len(ordering):
            objects[cls] = [listed[i] for i in ordering]
    groups, correct = [], True
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])[: clause["count"]]
        matched = len(found) >= clause["count"]
        if matched and "color" in clause:
            matched = [d.color for d in found].count(clause["color"]) >= clause["count"]
        if matched and "position" in clause:
            relation, target = clause["position"]
            matched = groups[target] is not None and all(
                relation in _reference_relations(a, b) for a in found for b in groups[target]
            )
        groups.append(found if matched else None)
        correct = correct and matched
    for clause in metadata.get("exclude", []):
        if len(objects.get(clause["class"], [])) >= clause["count"]:
            correct = False
    return correct


def test_the_reference_sort_is_numpy_stable_argsort_and_the_ranking_its_reverse():
    rng = np.random.default_rng(0)
    for length in range(1, 40):
        scores = rng.choice([1.0, 0.95, 0.5], size=length)
        stable = np.argsort(scores, kind="stable")
        if length <= 16:
            assert np.array_equal(_insertion_argsort(scores), stable)
        assert geneval_ranking(scores.tolist()) == stable[::-1].tolist()
    assert geneval_ranking([1.0, 0.5, 1.0, 1.0]) == [3, 2, 0, 1]  # the later of equal scores first


def test_ties_pick_the_later_listed_detection_by_hand():
    red, blue = det("circle", 1.0, color="red"), det("circle", 1.0, color="blue")
    assert not image_correct(RED_CIRCLE, [red, blue]) and image_correct(RED_CIRCLE, [blue, red])
    assert keep_detections([red, blue], "colors")["circle"] == [blue, red]
    square, right, left = at("square", 20, 10, score=1.0), at("circle", 36, 10, score=1.0), at("circle", 4, 10, score=1.0)
    assert image_correct(LEFT_OF, [square, right, left]) and not image_correct(LEFT_OF, [square, left, right])
    # The target's tie too: the circle is left of the later-listed square only.
    near, far = at("square", 0, 10, score=1.0), at("square", 20, 10, score=1.0)
    circle = at("circle", 4, 24, score=1.0)
    verdicts = [image_correct(LEFT_OF, [a, b, circle]) for a, b in [(near, far), (far, near)]]
    assert verdicts == [True, False]
    assert verdicts == [_reference_verdict(LEFT_OF, [a, b, circle]) for a, b in [(near, far), (far, near)]]
    blue_square, red_square = det("square", 1.0, color="blue"), det("square", 1.0, color="red")
    mixed = [det("circle", 1.0, color="red"), blue_square, red_square]
    assert not image_correct(COLOR_ATTR, mixed) and image_correct(COLOR_ATTR, mixed[:1] + mixed[:0:-1])
    # Partial credit reads the same ranking: count term 0 (two circles), colour term of the later one.
    assert partial_credit(RED_CIRCLE, [red, blue]) == 0.0 and partial_credit(RED_CIRCLE, [blue, red]) == 0.5


def _tied_case(rng, record):
    """Detections for ``record`` with many equal scores: classes and colours of its clauses (and
    others), boxes on a 3 × 3 grid of 32 px images, most scores exactly 1.0 as the world detector gives."""
    classes = [c["class"] for c in record["include"]] + ["circle", "square", "triangle"]
    colours = [c["color"] for c in record["include"] if "color" in c] + ["red", "blue", "green"]
    detections = []
    for _ in range(rng.randrange(1, 7)):
        row, col = rng.randrange(3), rng.randrange(3)
        x, y = col * 32 / 3 + rng.uniform(0, 3), row * 32 / 3 + rng.uniform(0, 3)
        score = rng.choice([1.0, 1.0, 1.0, 1.0, 0.95, 0.5, 0.2])
        detections.append(det(rng.choice(classes), score, (x, y, x + 8, y + 8), rng.choice(colours)))
    return detections


def test_verdicts_agree_with_genevals_procedure_on_tied_detections():
    from dgpo_lightning.data.prompts import load_prompt_records

    records = load_prompt_records("world:train") + load_prompt_records("world:test")
    rng = random.Random(1)
    order_mattered = []
    for _ in range(4000):
        record = rng.choice(records)
        detections = _tied_case(rng, record)
        expected = _reference_verdict(record, detections)
        assert image_correct(record, detections) == expected, (record, detections)
        # Keeping the first-listed of equal scores (the old rule) would have changed this verdict.
        first_listed = _reference_verdict(record, detections, argsort=lambda s: np.argsort(-s, kind="stable")[::-1])
        if first_listed != expected:
            order_mattered.append(record["tag"])
    # Ties really decided verdicts, in each task that reads more than counts.
    assert len(order_mattered) > 100 and {"colors", "position", "color_attr"} <= set(order_mattered)


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("target", [1, 2])
def test_a_position_on_a_later_or_its_own_clause_is_refused(target):
    record = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", target]},
            {"class": "triangle", "count": 1},
        ],
        "prompt": "x",
    }
    message = r"include\[1\] \('circle'\): position \['left of', %d\] must point at an earlier include clause" % target
    with pytest.raises(ValueError, match=message):
        check_metadata(record)
    with pytest.raises(ValueError, match=message):
        image_correct(record, [])
    with pytest.raises(ValueError, match=message):
        build("geneval", detector=lambda images: [[]])(torch.zeros(1, 3, 32, 32), ["x"], [record])
    record["include"][1]["position"] = ["left of", 0]
    check_metadata(record)  # an earlier target is fine


# --------------------------------------------------------------------------- partial credit


def test_partial_credit_by_hand():
    triangles = lambda n, s=0.95: [det("triangle", s) for _ in range(n)]  # noqa: E731
    assert partial_credit(COUNTING, triangles(3)) == 1.0
    assert partial_credit(COUNTING, triangles(2)) == pytest.approx(((1 - 1 / 3) + 1) / 2)
    assert partial_credit(COUNTING, triangles(4)) == pytest.approx(((1 - 1 / 3) + 0) / 2)
    assert partial_credit(COUNTING, triangles(7)) == 0.0  # count term floors at 0
    assert partial_credit(RED_CIRCLE, [det("circle", color="blue")]) == 0.5
    assert partial_credit(COLOR_ATTR, [det("circle", color="red"), det("square", color="green")]) == 0.75
    assert partial_credit(LEFT_OF, [at("square", 20, 10), at("circle", 36, 10)]) == 0.75
    assert partial_credit(LEFT_OF, [at("square", 20, 10), at("circle", 4, 10)]) == 1.0
    assert partial_credit(SINGLE, []) == 0.0
    assert partial_credit(SINGLE, [det("circle"), det("circle")]) == 0.0  # one asked, two found


def test_partial_credit_is_bounded_and_full_only_when_correct():
    from dgpo_lightning.data.prompts import load_prompt_records

    records = load_prompt_records("world:train")
    rng = random.Random(0)
    full = 0
    for _ in range(3000):
        record = rng.choice(records)
        detections = [
            det(
                rng.choice(["circle", "square", "triangle"]),
                rng.choice([0.2, 0.5, 0.95]),
                (x := rng.randrange(0, 24), y := rng.randrange(0, 24), x + 8, y + 8),
                rng.choice(["red", "green", "blue", "yellow", "purple", "white"]),
            )
            for _ in range(rng.randrange(0, 5))
        ]
        score = partial_credit(record, detections)
        assert 0.0 <= score <= 1.0
        if score == 1.0:
            full += 1
            assert image_correct(record, detections), (record, detections)
    assert full > 20  # the implication was exercised


# --------------------------------------------------------------------------- summary


def test_summary_is_the_unweighted_mean_of_tasks():
    tags = ["counting"] * 3 + ["position"]
    summary = summarize(tags, [True, True, False, False], prompt_ids=[0, 0, 1, 2])
    assert summary["counting"] == pytest.approx(2 / 3) and summary["position"] == 0.0
    assert summary["overall"] == pytest.approx(1 / 3)  # the image mean would be 0.5
    assert summary["prompt_any_correct"] == pytest.approx(1 / 3)
    assert "prompt_any_correct" not in summarize(tags, [1, 1, 0, 0])
    with pytest.raises(ValueError, match="4 tags but 3"):
        summarize(tags, [True] * 3)
    with pytest.raises(ValueError, match="no images"):
        summarize([], [])
    with pytest.raises(ValueError, match="prompt ids"):
        summarize(tags, [True] * 4, prompt_ids=[0])


# --------------------------------------------------------------------------- rewards


def test_rewards_are_registered_and_score_through_any_detector():
    assert {"geneval", "geneval_partial"} <= set(available())
    canned = [[det("circle", color="red")], [det("circle", color="blue")], []]
    detector = lambda images: canned[: images.shape[0]]  # noqa: E731
    images = torch.zeros(3, 3, 32, 32)
    records = [RED_CIRCLE] * 3
    strict = build("geneval", detector=detector)(images, ["a photo of a red circle"] * 3, records)
    partial = build("geneval_partial", detector=detector)(images, ["a photo of a red circle"] * 3, records)
    assert torch.equal(check_scores("geneval", strict, 3), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(partial, torch.tensor([1.0, 0.5, 0.0]))


def test_reward_errors():
    reward = build("geneval", detector=lambda images: [[]] * images.shape[0])
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="needs per-prompt GenEval metadata"):
        reward(images, ["a", "b"])
    with pytest.raises(ValueError, match="'include' list"):
        reward(images, ["a", "b"], [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match="2 images but 1 metadata"):
        reward(images, ["a", "b"], [SINGLE])
    with pytest.raises(ValueError, match="unknown detector 'yolo'.*'kind': 'mask2former'.*or a callable"):
        build("geneval", detector="yolo")
    with pytest.raises(ValueError, match="pass model_path"):
        build("geneval", detector="mask2former")  # a bare name is the spec without options


def test_default_detector_is_the_world_detector():
    from dgpo_lightning.world.scene import render_prompt

    generator = torch.Generator().manual_seed(0)
    records = [SINGLE, COUNTING, RED_CIRCLE, COLOR_ATTR, LEFT_OF]
    images = torch.stack([render_prompt(r, generator) for r in records])
    scores = build("geneval")(images, [r["prompt"] for r in records], records)
    assert torch.equal(scores, torch.ones(5))
    # Against other prompts: no triangles in the first image (count 0, exclude holds → 0.5); no circle
    # in the three triangles (0); a red circle without a square (square 0, circle 1 but no target → 0.25).
    wrong = [COUNTING, SINGLE, LEFT_OF, COUNTING, COUNTING]
    prompts = [r["prompt"] for r in wrong]
    assert torch.equal(build("geneval")(images, prompts, wrong), torch.zeros(5))
    assert torch.equal(build("geneval_partial")(images, prompts, wrong), torch.tensor([0.5, 0.0, 0.25, 0.5, 0.5]))
