"""The video reward against hand-built clips whose right answer is known."""

from __future__ import annotations

import pytest
import torch

from dgpo_lightning.rewards.base import build
from dgpo_lightning.world.video.reward import MIN_TRAVEL, STEP_TOLERANCE, VideoWorldReward, motion_score
from dgpo_lightning.world.video.scene import FRAMES, Track, render_clip

STRICT, PARTIAL = VideoWorldReward(), VideoWorldReward(partial=True)


def record(tag, motion, include, **extra):
    return {"tag": tag, "motion": motion, "include": include, "prompt": f"a video of {tag} {motion}", **extra}


def circle(motion, color=None):
    clause = {"class": "circle", "count": 1, **({"color": color} if color else {})}
    return record("color_motion" if color else "motion", motion, [clause])


def scores(clips, records):
    videos = torch.stack(clips)
    prompts = [r["prompt"] for r in records]
    return STRICT(videos, prompts, records).tolist(), PARTIAL(videos, prompts, records).tolist()


LEFT = Track("circle", "red", 1.0, 2.0, 0.0, -1.0)  # column 2 → 1
#: The reward reads any number of frames; the temporal rules (steps back, a missing middle frame, a
#: colour switch half-way) are tested on 4-frame clips, the shipped FRAMES on the others.
LONG = 4


def test_a_clip_moving_left_scores_one_on_left_and_zero_on_the_other_directions():
    clip = render_clip([LEFT])
    records = [circle(m) for m in ("left", "right", "up", "down")] + [circle("left", "red"), circle("left", "blue")]
    strict, partial = scores([clip] * len(records), records)
    assert strict == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert partial[0] == 1.0 and partial[4] == 1.0 and all(p < 1 for p in partial[1:4] + partial[5:])
    # Wrong direction: present and same colour in every frame, no motion credit: (1 + 1 + 0) / 3.
    assert partial[1] == pytest.approx(2 / 3, abs=1e-5)


def test_a_static_object_or_a_jump_back_is_not_motion():
    still = render_clip([Track("circle", "red", 1.0, 1.0)])
    strict, _ = scores([still] * 4, [circle(m) for m in ("left", "right", "up", "down")])
    assert strict == [0.0] * 4
    # Frames reordered so the object goes back by a third of a cell half-way: net travel still left.
    clip = render_clip([LEFT], frames=LONG)[[0, 2, 1, 3]]
    strict, partial = scores([clip], [circle("left")])
    assert strict == [0.0] and 0.5 < partial[0] < 1


def test_colour_change_across_frames_fails_identity():
    red = render_clip([LEFT], frames=LONG)
    blue = render_clip([Track("circle", "blue", 1.0, 2.0, 0.0, -1.0)], frames=LONG)
    switched = torch.cat([red[:2], blue[2:]])
    strict, partial = scores([switched, switched, red], [circle("left"), circle("left", "red"), circle("left")])
    assert strict == [0.0, 0.0, 1.0]
    # Unnamed colour: the circle is present in every frame (P = 1), its colour in 2 of 4 (I = 1/2);
    # the two red frames still move left but travel only a third of a cell (M = (1/3 cell) / (1/2 cell)).
    assert partial[0] == pytest.approx((1 + 0.5 + 2 / 3) / 3, abs=0.03)


def test_a_missing_frame_fails_presence():
    clip = render_clip([LEFT], frames=LONG)
    clip[2] = 0
    strict, partial = scores([clip], [circle("left")])
    assert strict == [0.0] and partial[0] == pytest.approx((0.75 + 0.75 + 1.0) / 3, abs=1e-5)


def test_relative_motion_apart_and_together():
    apart = render_clip([Track("circle", "green", 1.0, 0.5, 0.0, -0.5), Track("square", "blue", 1.0, 1.5, 0.0, 0.5)])
    together = apart.flip(0)  # played backwards
    pair = [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]
    records = [record("relative_motion", m, pair) for m in ("apart", "together")]
    strict, _ = scores([apart, apart, together, together], records + records)
    assert strict == [1.0, 0.0, 0.0, 1.0]
    # One object only: the pair is not there.
    lone = render_clip([Track("circle", "green", 1.0, 0.5, 0.0, -0.5)])
    assert scores([lone], records[:1])[0] == [0.0]


def test_counting_needs_the_exact_count_in_every_frame():
    squares = [Track("square", c, float(r), 0.0, 0.0, 1.0) for c, r in (("red", 0), ("blue", 1), ("white", 2))]
    clip = render_clip(squares, frames=LONG)

    def counting(n):
        return record("counting", "right", [{"class": "square", "count": n}], exclude=[{"class": "square", "count": n + 1}])
    strict, _ = scores([clip] * 3, [counting(3), counting(2), counting(4)])
    assert strict == [1.0, 0.0, 0.0]
    dropped = clip.clone()
    dropped[1] = render_clip(squares[:2], frames=LONG)[1]  # one square vanishes in frame 1
    assert scores([dropped], [counting(3)])[0] == [0.0]
    wrong_way = scores([clip.flip(0)], [counting(3)])[0]
    assert wrong_way == [0.0]


def test_motion_score_thresholds():
    travel = MIN_TRAVEL
    assert motion_score([0, travel / 3, 2 * travel / 3, travel], [0, 0, 0, 0], MIN_TRAVEL) == (True, 1.0)
    assert motion_score([0, 0.9 * travel], [0, 0], MIN_TRAVEL)[0] is False
    assert motion_score([0, -STEP_TOLERANCE - 0.01, travel + 2], [0, 0, 0], MIN_TRAVEL) == (False, 0.5)
    assert motion_score([0, travel], [0, 0.6 * travel], MIN_TRAVEL) == (False, 0.5)
    assert motion_score([3.0], [0.0], MIN_TRAVEL) == (False, 0.0)


def test_registered_rewards_and_input_checks():
    clip = render_clip([LEFT])[None]
    meta = [circle("left")]
    assert build("world_video")(clip, ["p"], meta).tolist() == [1.0]
    assert build("world_video_partial")(clip, ["p"], meta).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"videos \[B, F, 3, H, W\]"):
        STRICT(clip[:, 0], ["p"], meta)
    with pytest.raises(ValueError, match="needs the video world's prompt records"):
        STRICT(clip, ["p"], None)
    with pytest.raises(ValueError, match="'motion' must be one of"):
        STRICT(clip, ["p"], [{**meta[0], "motion": "sideways"}])
    assert clip.shape[1] == FRAMES


def test_an_empty_clip_scores_zero_on_every_task_and_both_rewards():
    from dgpo_lightning.world.video.prompts import read_records

    records = read_records("test")
    empty = [torch.zeros(FRAMES, 3, 32, 32)] * len(records)
    strict, partial = scores(empty, records)
    assert strict == [0.0] * len(records) and partial == [0.0] * len(records)


def test_the_rewards_registry_finds_the_video_rewards_by_name_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from dgpo_lightning.rewards import available, build\n"
            "names = available()\n"
            "assert 'world_video' in names and 'world_video_partial' in names, names\n"
            "print(type(build('world_video_partial')).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
