"""GenEval's rules on hand-built detection lists, the partial credit, the summary and the registered rewards."""

import math
import random

import pytest
import torch

from dgpo_lightning.rewards import available, build
from dgpo_lightning.rewards.base import check_scores
from dgpo_lightning.rewards.geneval import (
    Detection,
    explain,
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
    from dgpo_lightning.world.scene import load_prompts, prompt_file

    records = load_prompts(prompt_file("train"))
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
    with pytest.raises(ValueError, match="'kind': 'mask2former'.*or a callable"):
        build("geneval", detector="mask2former")  # a bare name is not a spec


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
