"""Clips of the embedded video world: the image world's shapes moving across its 3×3 grid.

A clip is ``[F, 3, size, size]`` in ``[0, 1]`` (``F = FRAMES = 2`` frames of 32×32 by default, the
shipped model's; the renderer and the reward take any ``F``), each
frame drawn like an image of :mod:`dgpo_lightning.world.scene` (same classes, palette, object size,
anti-aliased coverage ``scene._coverage``), with every object on a straight track. An object's size
and jitter are drawn once per clip, so identity (class, colour, size) is constant across frames and
only the position changes, linearly from the first frame to the last.

Positions are continuous *cell coordinates* ``(row, col)`` in ``[0, 2]`` (cell centres at 0, 1, 2;
the pixel centre is ``(col + 0.5) · size / 3``), so a track may move by fractions of a cell. Tracks
keep a Chebyshev distance ≥ 1 cell from each other in every frame: drawn objects never touch
(≤ 9 px objects in 10.7 px cells), and the world detector reads every frame of a sampled clip.

Prompt records are GenEval-style (``tag``, ``include`` clauses with ``class``/``count``/optional
``color``, optional ``exclude``) plus a top-level ``motion``:

* ``motion``: one object (``include[0]``) moves ``left``/``right``/``up``/``down``, by one cell;
* ``color_motion``: the same with the object's colour named;
* ``relative_motion``: two objects of different classes on one row or column move ``apart``
  (centre distance 1 → 2 cells) or ``together`` (2 → 1 cells);
* ``counting``: exactly ``count`` objects of one class, all moving one cell in the direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dgpo_lightning.world.scene import (
    CLASSES,
    COLORS,
    GRID,
    OBJECT_SIZE,
    POSITION_JITTER,
    SIZE_JITTER,
    SUPERSAMPLE,
    _coverage,
    check_record_header,
    random_choice,
)

#: Frames of the shipped clips. The shipped model runs the image UNet once per frame, so a rollout
#: costs F image rollouts; two frames (before/after) keep a 16-clip group near 2 image groups on one
#: thread. The renderer and the reward take any number of frames.
FRAMES = 2
SIZE = 32
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Unit displacement (d_row, d_col) per direction, in cells; row 0 is the top.
DIRECTION_STEP: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
RELATIVE_MOTIONS: tuple[str, ...] = ("apart", "together")
MOTIONS: tuple[str, ...] = DIRECTIONS + RELATIVE_MOTIONS
TAGS: tuple[str, ...] = ("motion", "color_motion", "relative_motion", "counting")
MAX_COUNT = 4
#: Total travel of a moving object over the clip, in cells (10.7 px at 32×32).
TRAVEL = 1.0

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class Track:
    """One shape moving linearly from cell coordinates ``(row, col)`` (first frame) by
    ``(d_row, d_col)`` cells (at the last frame)."""

    cls: str
    color: str
    row: float
    col: float
    d_row: float = 0.0
    d_col: float = 0.0

    def at(self, frame: int, frames: int) -> tuple[float, float]:
        """``(row, col)`` in frame ``frame`` of ``frames``."""
        fraction = frame / (frames - 1) if frames > 1 else 0.0
        return self.row + fraction * self.d_row, self.col + fraction * self.d_col


def min_distance(tracks: Sequence[Track], frames: int = FRAMES) -> float:
    """Smallest Chebyshev distance (cells) between two tracks over the frames (``inf`` for < 2)."""
    best = math.inf
    for f in range(frames):
        points = [t.at(f, frames) for t in tracks]
        for i in range(len(points)):
            for j in range(i + 1, len(points)):
                best = min(best, max(abs(points[i][0] - points[j][0]), abs(points[i][1] - points[j][1])))
    return best


# --------------------------------------------------------------------------- rendering


def render_clip(
    tracks: Sequence[Track], *, frames: int = FRAMES, size: int = SIZE, generator: torch.Generator | None = None
) -> Tensor:
    """Render ``tracks`` to a clip ``[frames, 3, size, size]`` in ``[0, 1]`` (black background).

    With a ``generator`` each object's size and centre offset are jittered as in
    :func:`dgpo_lightning.world.scene.render`, once per clip (three uniform draws per track, in
    track order).
    """
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")
    for track in tracks:
        if track.color not in COLORS:
            raise ValueError(f"unknown colour {track.color!r}; known: {', '.join(COLORS)}")
        if track.cls not in CLASSES:
            raise ValueError(f"unknown class {track.cls!r}; known: {', '.join(CLASSES)}")
        for f in (0, frames - 1):
            row, col = track.at(f, frames)
            if not (-1e-6 <= row <= GRID - 1 + 1e-6 and -1e-6 <= col <= GRID - 1 + 1e-6):
                raise ValueError(f"{track} leaves the grid (cell coordinates in [0, {GRID - 1}])")
    if len(tracks) > 1 and min_distance(tracks, frames) < 1 - 1e-6:
        raise ValueError("two tracks come closer than one cell: their shapes would touch")
    scale = size / 32.0
    cell = size / GRID
    offsets = (torch.arange(size * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    jitters = []
    for _ in tracks:
        side, jx, jy = OBJECT_SIZE, 0.0, 0.0
        if generator is not None:
            u = torch.rand(3, generator=generator).tolist()
            side += SIZE_JITTER * (2 * u[0] - 1)
            jx, jy = POSITION_JITTER * (2 * u[1] - 1), POSITION_JITTER * (2 * u[2] - 1)
        jitters.append((side, jx, jy))
    clip = torch.zeros(frames, 3, size, size)
    for track, (side, jx, jy) in zip(tracks, jitters):
        # All frames of one track at once: centres [F, 1, 1] broadcast against the sample grid.
        points = [track.at(f, frames) for f in range(frames)]
        cx = torch.tensor([(col + 0.5) * cell + jx * scale for _, col in points]).view(-1, 1, 1)
        cy = torch.tensor([(row + 0.5) * cell + jy * scale for row, _ in points]).view(-1, 1, 1)
        mask = _coverage(track.cls, cx, cy, side * scale, xs, ys).float()  # [F, S·size, S·size]
        cover = torch.nn.functional.avg_pool2d(mask[:, None], SUPERSAMPLE)  # [F, 1, size, size]
        colour = torch.tensor(COLORS[track.color]).view(1, 3, 1, 1)
        clip = clip * (1 - cover) + cover * colour
    return clip.clamp_(0, 1)


# --------------------------------------------------------------------------- metadata


def validate_metadata(metadata: Any, *, where: str = "") -> None:
    """Raise ``ValueError`` unless ``metadata`` is a video record this world can render.

    Checks the tag, the prompt text, the ``motion`` (a direction for ``motion``/``color_motion``/
    ``counting``, ``apart``/``together`` for ``relative_motion``) and the clauses per tag: one
    clause (``count`` 1; with a ``color`` exactly for ``color_motion``), two clauses of different
    classes (count 1) for ``relative_motion``, one clause with ``count`` in 2..4 (and an optional
    ``exclude`` of ``count + 1``) for ``counting``.
    """
    fail = check_record_header(metadata, TAGS, where=where, tags_label="the video world's tags")
    tag = metadata.get("tag")
    motion = metadata.get("motion")
    allowed = RELATIVE_MOTIONS if tag == "relative_motion" else DIRECTIONS
    if motion not in allowed:
        fail(f"{tag}: 'motion' must be one of {', '.join(allowed)}, got {motion!r}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        fail("record needs a non-empty 'include' list of clauses")
    for i, clause in enumerate(include):
        if not isinstance(clause, Mapping):
            fail(f"include[{i}] must be an object with 'class' and 'count'")
        unknown = set(clause) - {"class", "count", "color"}
        if unknown:
            fail(f"include[{i}] has unknown keys {sorted(unknown)}")
        if clause.get("class") not in CLASSES:
            fail(f"include[{i}]: unknown class {clause.get('class')!r}; this world knows {', '.join(CLASSES)}")
        count = clause.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            fail(f"include[{i}]: count must be a positive integer, got {count!r}")
        if "color" in clause and clause["color"] not in COLORS:
            fail(f"include[{i}]: unknown colour {clause['color']!r}; this world knows {', '.join(COLORS)}")
    expected = 2 if tag == "relative_motion" else 1
    if len(include) != expected:
        fail(f"{tag} needs {expected} include clause(s), got {len(include)}")
    if tag == "counting":
        if not 2 <= include[0]["count"] <= MAX_COUNT:
            fail(f"counting: count must be in 2..{MAX_COUNT}, got {include[0]['count']}")
    elif any(c["count"] != 1 for c in include):
        fail(f"{tag}: every clause has count 1")
    if tag == "color_motion" and "color" not in include[0]:
        fail("color_motion: include[0] needs a 'color'")
    if tag == "relative_motion" and include[0]["class"] == include[1]["class"]:
        fail("relative_motion: the two objects must be of different classes (they are told apart by class)")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        fail("'exclude' must be a list of clauses")
    for i, clause in enumerate(exclude):
        if not (isinstance(clause, Mapping) and clause.get("class") in CLASSES and isinstance(clause.get("count"), int)):
            fail(f"exclude[{i}] must be an object with a known 'class' and an integer 'count'")
        needed = sum(c["count"] for c in include if c["class"] == clause["class"])
        if needed >= clause["count"]:
            fail(f"exclude[{i}] ({clause['count']}+ {clause['class']}) contradicts the include clauses")


def prompt_file(split: str) -> Path:
    """Path of a shipped split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the video world's shipped splits: {', '.join(SPLITS)}")
    return PROMPT_DIR / f"{split}.jsonl"


# --------------------------------------------------------------------------- clip sampling


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _directed_track(cls: str, colour: str, direction: str, generator: torch.Generator | None) -> Track:
    """A track moving ``TRAVEL`` cells in ``direction``, start uniform where it stays on the grid."""
    d_row, d_col = (TRAVEL * s for s in DIRECTION_STEP[direction])
    span = GRID - 1 - TRAVEL
    along = _uniform(0.0, span, generator)
    across = _uniform(0.0, GRID - 1, generator)
    if d_row:
        row = along if d_row > 0 else GRID - 1 - along
        return Track(cls, colour, row, across, d_row, 0.0)
    col = along if d_col > 0 else GRID - 1 - along
    return Track(cls, colour, across, col, 0.0, d_col)


def sample_clip(metadata: Mapping[str, Any], generator: torch.Generator | None = None) -> list[Track]:
    """Random tracks satisfying ``metadata`` (validated first). Unnamed colours are uniform."""
    validate_metadata(metadata)
    tag, motion, include = metadata["tag"], metadata["motion"], metadata["include"]
    colour_names = list(COLORS)

    def colour_of(clause: Mapping[str, Any]) -> str:
        return clause.get("color") or random_choice(colour_names, generator)

    if tag in ("motion", "color_motion"):
        clause = include[0]
        return [_directed_track(clause["class"], colour_of(clause), motion, generator)]
    if tag == "relative_motion":
        # Centre distance 1 → 2 cells ("apart") or 2 → 1 ("together"): both move half a cell, or one
        # of them a whole cell while the other stands still.
        mode = int(torch.randint(3, (1,), generator=generator))
        near = [(0.5, 1.5), (1.0, 2.0), (0.0, 1.0)][mode]
        far = (0.0, 2.0)
        start, end = (near, far) if motion == "apart" else (far, near)
        order = torch.randperm(2, generator=generator).tolist()  # which clause takes the low coordinate
        vertical = bool(torch.randint(2, (1,), generator=generator))
        across = _uniform(0.0, GRID - 1, generator)
        colours = [colour_of(c) for c in include]
        tracks = []
        for slot, index in enumerate(order):
            a, b = start[slot], end[slot]
            if vertical:
                tracks.append(Track(include[index]["class"], colours[index], a, across, b - a, 0.0))
            else:
                tracks.append(Track(include[index]["class"], colours[index], across, a, 0.0, b - a))
        return [tracks[order.index(i)] for i in range(2)]  # clause order
    # counting: distinct grid cells whose neighbour in the direction is on the grid, all moving together.
    clause = include[0]
    d_row, d_col = DIRECTION_STEP[motion]
    cells = [
        (r, c) for r in range(GRID) for c in range(GRID) if 0 <= r + d_row < GRID and 0 <= c + d_col < GRID
    ]
    chosen = torch.randperm(len(cells), generator=generator)[: clause["count"]].tolist()
    return [
        Track(clause["class"], colour_of(clause), float(cells[i][0]), float(cells[i][1]), TRAVEL * d_row, TRAVEL * d_col)
        for i in chosen
    ]


def corrupt_metadata(metadata: Mapping[str, Any], generator: torch.Generator | None = None) -> dict:
    """A copy of ``metadata`` with one attribute changed (the caption text is kept), as
    :func:`dgpo_lightning.world.scene.corrupt_metadata` for images: motion/counting get another
    direction (counting: or a count off by one), color_motion another colour or direction,
    relative_motion the opposite motion. Clips drawn from it disagree with the caption.
    """
    validate_metadata(metadata)
    record = {key: value for key, value in metadata.items() if key != "exclude"}
    include = [dict(clause) for clause in metadata["include"]]
    tag, motion = metadata["tag"], metadata["motion"]
    other_direction = random_choice([d for d in DIRECTIONS if d != motion], generator) if motion in DIRECTIONS else None
    if tag == "motion":
        record["motion"] = other_direction
    elif tag == "color_motion":
        if bool(torch.randint(2, (1,), generator=generator)):
            include[0]["color"] = random_choice([c for c in COLORS if c != include[0]["color"]], generator)
        else:
            record["motion"] = other_direction
    elif tag == "relative_motion":
        record["motion"] = "together" if motion == "apart" else "apart"
    else:
        if bool(torch.randint(2, (1,), generator=generator)):
            count = include[0]["count"]
            include[0]["count"] = count + 1 if count == 2 else (count - 1 if count == MAX_COUNT else count + random_choice((-1, 1), generator))
        else:
            record["motion"] = other_direction
    record["include"] = include
    return record


def render_prompt(
    metadata: Mapping[str, Any], generator: torch.Generator | None = None, *, frames: int = FRAMES, size: int = SIZE
) -> Tensor:
    """``render_clip(sample_clip(metadata, generator), generator=generator)`` → ``[F, 3, size, size]``."""
    return render_clip(sample_clip(metadata, generator), frames=frames, size=size, generator=generator)
