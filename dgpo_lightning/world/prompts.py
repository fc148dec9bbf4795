"""Generate the embedded world's GenEval-format prompt files (``prompts/{train,validation,test}.jsonl``).

``python -m dgpo_lightning.world.prompts`` rewrites the three files; the output is deterministic.

The full combinatorial set of the six GenEval tasks over the world's classes and colours is split so
that the held-out splits measure generalisation to combinations never seen in training. Each held-out
prompt goes to exactly one of ``test`` and ``validation`` (alternately, in generation order, test
first), so recipes and budgets tuned on validation are reported on prompts the tuning never saw:

- colors / color_attr: the (colour, class) pairs with ``(colour_index + class_index) % 3 == 0`` are
  held out (each colour loses one class, each class two colours). Training prompts never contain a
  held-out pair; the test holds every held-out ``colors`` prompt, every ``color_attr`` prompt whose
  two pairs are both held out, and every other one of those with exactly one held-out pair.
- counting: (class, count) pairs (circle, 4), (square, 2), (triangle, 3) are held out.
- position: the (A, relation, B) triples with ``(pair_index + relation_index) % 3 == 0`` are held out.
- two_object: the ordered pairs (circle, triangle) and (triangle, square) are held out.
- single_object has only one prompt per class; the three prompts are in all three splits.

Every class, colour, count and relation still appears in training.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from dgpo_lightning.world.scene import CLASSES, COLORS, PLURALS, PROMPT_DIR, RELATIONS, SPLITS, validate_metadata

NUMBERS = {2: "two", 3: "three", 4: "four"}
COUNTS = (2, 3, 4)

HELD_OUT_COUNTS = {("circle", 4), ("square", 2), ("triangle", 3)}
HELD_OUT_TWO_OBJECT = {("circle", "triangle"), ("triangle", "square")}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def held_out_colour_pair(colour: str, cls: str) -> bool:
    return (list(COLORS).index(colour) + CLASSES.index(cls)) % 3 == 0


def held_out_position(pair_index: int, relation: str) -> bool:
    return (pair_index + RELATIONS.index(relation)) % 3 == 0


class HeldOutSplits:
    """Prompt splits filled in generation order: ``add(record, held_out)`` puts a trained combination in
    ``train`` and sends held-out ones alternately to ``test`` and ``validation`` (test first), so the
    two held-out splits never share a prompt. Used by the image and the video world."""

    def __init__(self, names: tuple[str, ...] = ("train", "validation", "test")):
        self.splits: dict[str, list[dict]] = {name: [] for name in names}
        self._held = 0

    def add(self, record: dict, held_out: bool) -> None:
        if not held_out:
            self.splits["train"].append(record)
            return
        self.splits["test" if self._held % 2 == 0 else "validation"].append(record)
        self._held += 1


def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    validate_metadata(record)
    return record


def generate() -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}`` lists of GenEval metadata records."""
    held_out_splits = HeldOutSplits(SPLITS)
    splits, add = held_out_splits.splits, held_out_splits.add
    ordered_pairs = list(itertools.permutations(CLASSES, 2))

    for cls in CLASSES:
        record = _record("single_object", [{"class": cls, "count": 1}], f"a photo of {article(cls)} {cls}")
        for split in SPLITS:
            splits[split].append(record)

    for a, b in ordered_pairs:
        record = _record(
            "two_object",
            [{"class": a, "count": 1}, {"class": b, "count": 1}],
            f"a photo of {article(a)} {a} and {article(b)} {b}",
        )
        add(record, (a, b) in HELD_OUT_TWO_OBJECT)

    for cls in CLASSES:
        for n in COUNTS:
            record = _record(
                "counting",
                [{"class": cls, "count": n}],
                f"a photo of {NUMBERS[n]} {PLURALS[cls]}",
                exclude=[{"class": cls, "count": n + 1}],
            )
            add(record, (cls, n) in HELD_OUT_COUNTS)

    for cls in CLASSES:
        for colour in COLORS:
            record = _record(
                "colors",
                [{"class": cls, "count": 1, "color": colour}],
                f"a photo of {article(colour)} {colour} {cls}",
            )
            add(record, held_out_colour_pair(colour, cls))

    for pair_index, (a, b) in enumerate(ordered_pairs):
        for relation in RELATIONS:
            # GenEval order: the target B is clause 0, A (with the relation) is clause 1.
            record = _record(
                "position",
                [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                f"a photo of {article(a)} {a} {relation} {article(b)} {b}",
            )
            add(record, held_out_position(pair_index, relation))

    one_held_out = 0
    for a, b in ordered_pairs:
        for colour_a, colour_b in itertools.permutations(COLORS, 2):
            record = _record(
                "color_attr",
                [{"class": a, "count": 1, "color": colour_a}, {"class": b, "count": 1, "color": colour_b}],
                f"a photo of {article(colour_a)} {colour_a} {a} and {article(colour_b)} {colour_b} {b}",
            )
            pairs_held_out = held_out_colour_pair(colour_a, a) + held_out_colour_pair(colour_b, b)
            if pairs_held_out == 1:
                # every other prompt with exactly one held-out pair; the rest are in no split
                if one_held_out % 2 == 0:
                    add(record, True)
                one_held_out += 1
            else:
                add(record, pairs_held_out == 2)
    return splits


def write(directory: Path = PROMPT_DIR) -> dict[str, int]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``directory``; returns the line counts."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, records in generate().items():
        with (directory / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        counts[split] = len(records)
    return counts


if __name__ == "__main__":
    for split, count in write().items():
        print(f"{split}: {count} prompts")
