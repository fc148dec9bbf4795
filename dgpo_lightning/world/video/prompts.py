"""Generate the video world's prompt files (``prompts/{train,validation,test}.jsonl``).

``python -m dgpo_lightning.world.video.prompts`` rewrites the three files; the output is deterministic.

Every prompt of the four tasks over the world's classes, colours, counts and motions is generated and
the held-out combinations below never appear in training; each held-out prompt goes to exactly one of
``validation`` and ``test`` (alternately, in generation order), so model selection on the validation
split does not see the test prompts:

- motion: the (class, direction) pairs with ``(class_index + direction_index) % 4 == 0``
  (circle-left, square-down, triangle-up);
- color_motion: the image world's held-out (colour, class) pairs (``(colour_index + class_index) % 3
  == 0``, :func:`dgpo_lightning.world.prompts.held_out_colour_pair`), in all four directions;
- relative_motion: (ordered class pair, apart/together) with ``(pair_index + motion_index) % 3 == 0``;
- counting: the image world's held-out (class, count) pairs (circle-4, square-2, triangle-3), in all
  four directions.

Every class, colour, count, direction and relative motion still appears in training.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from dgpo_lightning.world.prompts import HELD_OUT_COUNTS, NUMBERS, HeldOutSplits, article, held_out_colour_pair
from dgpo_lightning.world.scene import CLASSES, COLORS, PLURALS
from dgpo_lightning.world.video.scene import (
    DIRECTIONS,
    MAX_COUNT,
    PROMPT_DIR,
    RELATIVE_MOTIONS,
    SPLITS,
    prompt_file,
    validate_metadata,
)

COUNTS = tuple(range(2, MAX_COUNT + 1))
#: Words of the video prompts beyond the image world's vocabulary (the text encoder's extra tokens).
VIDEO_WORDS: tuple[str, ...] = ("video", "moving", "up", "down", "apart", "together")


def held_out_motion(cls: str, direction: str) -> bool:
    return (CLASSES.index(cls) + DIRECTIONS.index(direction)) % 4 == 0


def held_out_relative(pair_index: int, motion: str) -> bool:
    return (pair_index + RELATIVE_MOTIONS.index(motion)) % 3 == 0


def _record(tag: str, include: list[dict], motion: str, prompt: str, exclude: list[dict] | None = None) -> dict:
    record: dict[str, Any] = {"tag": tag, "include": include, "motion": motion}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    validate_metadata(record)
    return record


def generate() -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}`` lists of records."""
    held_out_splits = HeldOutSplits(SPLITS)
    splits, add = held_out_splits.splits, held_out_splits.add

    for cls in CLASSES:
        for direction in DIRECTIONS:
            add(
                _record("motion", [{"class": cls, "count": 1}], direction, f"a video of {article(cls)} {cls} moving {direction}"),
                held_out_motion(cls, direction),
            )
    for cls in CLASSES:
        for colour in COLORS:
            for direction in DIRECTIONS:
                record = _record(
                    "color_motion",
                    [{"class": cls, "count": 1, "color": colour}],
                    direction,
                    f"a video of {article(colour)} {colour} {cls} moving {direction}",
                )
                add(record, held_out_colour_pair(colour, cls))
    for pair_index, (a, b) in enumerate(itertools.permutations(CLASSES, 2)):
        for motion in RELATIVE_MOTIONS:
            record = _record(
                "relative_motion",
                [{"class": a, "count": 1}, {"class": b, "count": 1}],
                motion,
                f"a video of {article(a)} {a} and {article(b)} {b} moving {motion}",
            )
            add(record, held_out_relative(pair_index, motion))
    for cls in CLASSES:
        for n in COUNTS:
            for direction in DIRECTIONS:
                record = _record(
                    "counting",
                    [{"class": cls, "count": n}],
                    direction,
                    f"a video of {NUMBERS[n]} {PLURALS[cls]} moving {direction}",
                    exclude=[{"class": cls, "count": n + 1}],
                )
                add(record, (cls, n) in HELD_OUT_COUNTS)
    return splits


def write(directory: Path = PROMPT_DIR) -> dict[str, int]:
    """Write the three split files under ``directory``; returns the line counts."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, records in generate().items():
        with (directory / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        counts[split] = len(records)
    return counts


def read_records(spec: str | Path) -> list[dict]:
    """Records of a video prompt file, each validated (``"train"``/``"validation"``/``"test"`` or
    ``"world_video:<split>"``: a shipped split; anything else: a path to a ``.jsonl`` file).

    The data layer's reader (``data.prompts.read_prompt_file``) reads these files for training; this
    one is for the world's own scripts, which sit below the data layer.
    """
    text = str(spec)
    text = text[len("world_video:"):] if text.startswith("world_video:") else text
    path = prompt_file(text) if text in SPLITS else Path(text)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            validate_metadata(record, where=f"{path}:{number}")
            records.append(record)
    if not records:
        raise ValueError(f"prompt file {path} contains no prompts")
    return records


if __name__ == "__main__":
    for split, count in write().items():
        print(f"{split}: {count} prompts")
