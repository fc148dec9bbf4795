"""The video world's programmatic reward: the world detector on every frame plus temporal rules.

``world_video`` (strict 0/1) and ``world_video_partial`` (graded) are registered in the rewards'
registry when this module is imported; the registry names this module by string
(``rewards.base.REWARD_PROVIDERS``), so a config can name the rewards without importing anything
first while the rewards layer never imports the world (which sits above it).

A reward call takes videos ``[B, F, 3, H, W]`` in ``[0, 1]``, the prompts and the prompt records
(:mod:`dgpo_lightning.world.video.scene` schema). Every frame is read by
:func:`dgpo_lightning.world.detector.detect_batch`; detections are kept as GenEval keeps them
(:func:`~dgpo_lightning.rewards.geneval_rules.keep_detections`: confidence > 0.3, > 0.9 for
``counting``). Positions are box centres in pixels (x right, y down). Per task, a clip is correct
(strict score 1) when all three criteria hold:

* presence ``P``: every frame has an object of each named class (counting: exactly ``count`` of
  them, the exclude clause included);
* identity ``I``: the object keeps its colour in every frame: a named colour, else the colour of
  its first-frame detection (the colour found in most frames; counting: the sorted list of colours
  is the first frame's, non-empty, in every frame);
* motion ``M``: with ``u`` the unit vector of the direction and ``p_f`` the tracked position
  (counting: the mean position of the class's objects), the travel ``(p_{F−1} − p_0)·u`` is at
  least ``MIN_TRAVEL`` (half a cell; drawn clips travel one cell), no step goes back by more than
  ``STEP_TOLERANCE`` along ``u``, and the sideways drift ``max_f |(p_f − p_0)·u⊥|`` is at most half
  the travel. ``relative_motion`` applies the same test to the centre distance of the two objects
  (``apart``: it grows by ≥ ``MIN_TRAVEL``; ``together``: it shrinks).

The graded score is ``(P̄ + Ī + M̄) / 3`` with ``P̄`` / ``Ī`` the fraction of frames (averaged over
clauses; counting: ``min(n, N) / max(n, N)`` per frame for ``P̄``) meeting the criterion, and
``M̄ = clamp(travel / MIN_TRAVEL, 0, 1)``, halved when a step goes back or the drift is too large,
measured on the frames where the object was found. Each part is 1 exactly when its strict criterion
holds, so the graded score is 1 exactly when the strict one is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.rewards.base import register
from dgpo_lightning.rewards.geneval_rules import Detection, keep_detections
from dgpo_lightning.world.detector import detect_batch
from dgpo_lightning.world.video.scene import DIRECTION_STEP, GRID, validate_metadata

#: Pixels at 32×32 (scaled with the frame size): half a cell of travel, 1 px of backward jitter.
MIN_TRAVEL = 32 / GRID / 2
STEP_TOLERANCE = 1.0
DRIFT_FRACTION = 0.5


def _centre(detection: Detection) -> tuple[float, float]:
    x0, y0, x1, y1 = detection.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def motion_score(values: Sequence[float], drift: Sequence[float], min_travel: float) -> tuple[bool, float]:
    """Strict verdict and graded score of a 1-D trajectory ``values`` (positions along the required
    direction, one per frame found) with sideways positions ``drift``.

    ``strict``: ``values[-1] − values[0] ≥ min_travel``, every step ``≥ −STEP_TOLERANCE`` and
    ``max |drift − drift[0]| ≤ DRIFT_FRACTION · travel``; graded: ``clamp(travel / min_travel, 0,
    1)``, halved when a step or the drift fails. Fewer than two frames: ``(False, 0)``.
    """
    if len(values) < 2:
        return False, 0.0
    travel = values[-1] - values[0]
    steady = all(b - a >= -STEP_TOLERANCE for a, b in zip(values, values[1:]))
    straight = max((abs(d - drift[0]) for d in drift), default=0.0) <= DRIFT_FRACTION * max(travel, 0.0)
    progress = min(max(travel / min_travel, 0.0), 1.0)
    graded = progress if steady and straight else 0.5 * progress
    return travel >= min_travel and steady and straight, graded


def _track(frames: Sequence[Mapping[str, list[Detection]]], clause: Mapping[str, Any]):
    """``(presence [F] bool, identity [F] bool, positions {frame: (x, y)})`` of one clause's object."""
    cls, colour = clause["class"], clause.get("color")
    found = [frame.get(cls, []) for frame in frames]
    presence = [bool(f) for f in found]
    if colour is None:  # the colour seen in most frames, ties broken by the first frame's best
        seen = Counter(c for f in found for c in {d.color for d in f})
        first = next((f[0].color for f in found if f), None)
        colour = max(seen, key=lambda c: (seen[c], c == first)) if seen else None
    picks = [next((d for d in f if d.color == colour), None) for f in found]
    identity = [p is not None for p in picks]
    positions = {i: _centre(p) for i, p in enumerate(picks) if p is not None}
    return presence, identity, positions


def _directional(positions: Mapping[int, tuple[float, float]], direction: str, min_travel: float) -> tuple[bool, float]:
    d_row, d_col = DIRECTION_STEP[direction]
    ordered = [positions[i] for i in sorted(positions)]
    along = [x * d_col + y * d_row for x, y in ordered]
    across = [x * d_row + y * d_col for x, y in ordered]  # the perpendicular axis (up to sign)
    return motion_score(along, across, min_travel)


def score_clip(metadata: Mapping[str, Any], frames: Sequence[Sequence[Detection]], *, size: int = 32) -> tuple[bool, float, dict]:
    """``(strict, graded, parts)`` for one clip's per-frame detections (see the module docstring)."""
    tag, motion = metadata["tag"], metadata["motion"]
    kept = [keep_detections(f, tag) for f in frames]
    n_frames = len(kept)
    min_travel = MIN_TRAVEL * size / 32
    if tag == "counting":
        clause = metadata["include"][0]
        want = clause["count"]
        found = [f.get(clause["class"], []) for f in kept]
        counts = [len(f) for f in found]
        presence = [min(n, want) / max(n, want) if max(n, want) else 1.0 for n in counts]
        palettes = [sorted(str(d.color) for d in f) for f in found]
        # The first frame's colours, in a frame that shows the class at all (empty frames keep nothing).
        identity = [bool(p) and p == palettes[0] for p in palettes]
        exact = {i: f for i, f in enumerate(found) if len(f) == want}
        means = {i: (sum(_centre(d)[0] for d in f) / want, sum(_centre(d)[1] for d in f) / want) for i, f in exact.items()}
        moved, graded_motion = _directional(means, motion, min_travel)
        p_ok, i_ok = all(n == want for n in counts), all(identity)
        p_bar, i_bar = sum(presence) / n_frames, sum(identity) / n_frames
    else:
        tracks = [_track(kept, clause) for clause in metadata["include"]]
        p_ok = all(all(t[0]) for t in tracks)
        i_ok = all(all(t[1]) for t in tracks)
        p_bar = sum(sum(t[0]) for t in tracks) / (n_frames * len(tracks))
        i_bar = sum(sum(t[1]) for t in tracks) / (n_frames * len(tracks))
        if tag == "relative_motion":
            (_, _, a), (_, _, b) = tracks
            common = sorted(set(a) & set(b))
            distance = [((a[i][0] - b[i][0]) ** 2 + (a[i][1] - b[i][1]) ** 2) ** 0.5 for i in common]
            sign = 1.0 if motion == "apart" else -1.0
            moved, graded_motion = motion_score([sign * d for d in distance], [0.0] * len(distance), min_travel)
        else:
            moved, graded_motion = _directional(tracks[0][2], motion, min_travel)
    strict = p_ok and i_ok and moved
    graded = 1.0 if strict else min((p_bar + i_bar + graded_motion) / 3, 1.0 - 1e-6)
    return strict, graded, {"presence": p_bar, "identity": i_bar, "motion": graded_motion}


class VideoWorldReward:
    """``reward(videos [B, F, 3, H, W], prompts, metadata) -> Tensor[B]``: strict 0/1 or graded."""

    def __init__(self, *, partial: bool = False):
        self.partial = partial

    @property
    def name(self) -> str:
        return "world_video_partial" if self.partial else "world_video"

    def __call__(
        self, videos: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"reward {self.name!r}: expected videos [B, F, 3, H, W] in [0, 1], got {tuple(videos.shape)}")
        if metadata is None:
            raise ValueError(f"reward {self.name!r} needs the video world's prompt records (tag, motion, include)")
        batch, frames = videos.shape[:2]
        if len(metadata) != batch or len(prompts) != batch:
            raise ValueError(f"reward {self.name!r}: {batch} videos, {len(prompts)} prompts, {len(metadata)} records")
        for record in metadata:
            validate_metadata(record)
        detections = detect_batch(videos.reshape(batch * frames, *videos.shape[2:]))
        scores = []
        for i, record in enumerate(metadata):
            strict, graded, _ = score_clip(record, detections[i * frames : (i + 1) * frames], size=videos.shape[-1])
            scores.append(graded if self.partial else float(strict))
        return torch.tensor(scores, dtype=torch.float32, device=videos.device)


@register("world_video")
def world_video_reward() -> VideoWorldReward:
    """Strict 0/1: presence, identity and motion in every frame."""
    return VideoWorldReward(partial=False)


@register("world_video_partial")
def world_video_partial_reward() -> VideoWorldReward:
    """Graded ``(P̄ + Ī + M̄) / 3``, 1 exactly when the strict reward is 1."""
    return VideoWorldReward(partial=True)
