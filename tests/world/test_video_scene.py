"""The video world's renderer and clip sampler: motion is really in the pixels, identity is kept."""

from __future__ import annotations

import pytest
import torch

from dgpo_lightning.world.scene import COLORS, GRID, SceneObject, render
from dgpo_lightning.world.video.prompts import read_records
from dgpo_lightning.world.video.scene import (
    DIRECTION_STEP,
    FRAMES,
    Track,
    corrupt_metadata,
    min_distance,
    render_clip,
    sample_clip,
    validate_metadata,
)

CELL = 32 / GRID


def centroid(frame: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted centre ``(x, y)`` of a frame's foreground, in pixels (pixel centres at +0.5)."""
    weight = frame.sum(0)
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    return float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum())


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_a_moving_square_travels_one_cell_in_its_direction_in_the_pixels(direction):
    d_row, d_col = DIRECTION_STEP[direction]
    track = Track("square", "red", 1.0 - 0.5 * d_row, 1.0 - 0.5 * d_col, float(d_row), float(d_col))
    clip = render_clip([track])
    assert clip.shape == (FRAMES, 3, 32, 32) and clip.min() >= 0 and clip.max() <= 1
    centres = [centroid(f) for f in clip]
    for f, (x, y) in enumerate(centres):
        # Expected centre from the cell coordinates alone: (col + 0.5) · 32/3 (a square's centroid is its
        # centre), to the 4× supersampling's quarter-pixel grid.
        row, col = track.at(f, FRAMES)
        assert x == pytest.approx((col + 0.5) * CELL, abs=0.15) and y == pytest.approx((row + 0.5) * CELL, abs=0.15)
    step = CELL / (FRAMES - 1)
    for (x0, y0), (x1, y1) in zip(centres, centres[1:]):
        # Two centres, each to the quarter-pixel grid.
        assert (x1 - x0, y1 - y0) == (pytest.approx(d_col * step, abs=0.3), pytest.approx(d_row * step, abs=0.3))


def test_first_frame_of_a_grid_aligned_clip_is_the_image_worlds_render():
    tracks = [Track("circle", "blue", 0.0, 0.0, 0.0, 1.0), Track("triangle", "yellow", 2.0, 2.0, -1.0, 0.0)]
    clip = render_clip(tracks)
    image = render([SceneObject("circle", "blue", 0, 0), SceneObject("triangle", "yellow", 2, 2)])
    torch.testing.assert_close(clip[0], image, atol=1e-6, rtol=0)
    last = render([SceneObject("circle", "blue", 0, 1), SceneObject("triangle", "yellow", 1, 2)])
    torch.testing.assert_close(clip[-1], last, atol=1e-6, rtol=0)


def test_jittered_identity_is_constant_across_frames():
    clip = render_clip([Track("circle", "green", 1.0, 0.0, 0.0, 1.0)], generator=torch.Generator().manual_seed(3))
    areas = clip.sum(dim=(1, 2, 3))
    torch.testing.assert_close(areas, areas[:1].expand(FRAMES), rtol=2e-3, atol=0)  # same size in every frame
    for frame in clip:
        brightest = frame.flatten(1)[:, frame.sum(0).flatten().argmax()]
        torch.testing.assert_close(brightest, torch.tensor(COLORS["green"]), atol=1e-6, rtol=0)


def test_render_refuses_touching_or_off_grid_tracks():
    with pytest.raises(ValueError, match="closer than one cell"):
        render_clip([Track("circle", "red", 1.0, 0.0, 0.0, 1.0), Track("square", "blue", 1.0, 1.5)])
    with pytest.raises(ValueError, match="leaves the grid"):
        render_clip([Track("circle", "red", 1.0, 1.5, 0.0, 1.0)])


@pytest.mark.parametrize("split", ["train", "test"])
def test_sampled_clips_satisfy_their_records(split):
    generator = torch.Generator().manual_seed(0)
    for record in read_records(split):
        for _ in range(3):
            tracks = sample_clip(record, generator)
            assert len(tracks) == sum(c["count"] for c in record["include"])
            assert min_distance(tracks) >= 1 - 1e-6
            for track in tracks:
                assert all(0 <= v <= GRID - 1 for f in (0, FRAMES - 1) for v in track.at(f, FRAMES))
            if record["tag"] == "relative_motion":
                a, b = tracks
                gap = [max(abs(p - q) for p, q in zip(a.at(f, FRAMES), b.at(f, FRAMES))) for f in (0, FRAMES - 1)]
                assert (gap[1] > gap[0]) == (record["motion"] == "apart") and abs(gap[1] - gap[0]) == pytest.approx(1.0)
                assert [t.cls for t in tracks] == [c["class"] for c in record["include"]]
            else:
                d_row, d_col = DIRECTION_STEP[record["motion"]]
                assert all((t.d_row, t.d_col) == (d_row, d_col) for t in tracks)
                colour = record["include"][0].get("color")
                assert colour is None or all(t.color == colour for t in tracks)


def test_corrupted_records_change_one_thing_and_stay_renderable():
    generator = torch.Generator().manual_seed(1)
    for record in read_records("train"):
        bad = corrupt_metadata(record, generator)
        validate_metadata({**bad, "exclude": []})
        assert bad["prompt"] == record["prompt"]
        changed = (bad["motion"] != record["motion"]) + (bad["include"] != record["include"])
        assert changed == 1


def test_validate_metadata_names_the_problem():
    good = {"tag": "motion", "motion": "left", "include": [{"class": "circle", "count": 1}], "prompt": "p"}
    validate_metadata(good)
    with pytest.raises(ValueError, match="'motion' must be one of"):
        validate_metadata({**good, "motion": "apart"})
    with pytest.raises(ValueError, match="unknown class"):
        validate_metadata({**good, "include": [{"class": "cat", "count": 1}]})
    with pytest.raises(ValueError, match="different classes"):
        validate_metadata({**good, "tag": "relative_motion", "motion": "apart", "include": [{"class": "circle", "count": 1}] * 2})
