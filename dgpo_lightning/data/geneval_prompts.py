"""GenEval-format training prompts: the benchmark's six task families, disjoint from its test file.

The RL codebases train GenEval on prompts written with GenEval's own templates and metadata schema
but drawn apart from the 553 evaluation prompts. This module writes such a set, seeded and
reproducible::

    python -m dgpo_lightning.data.geneval_prompts --out data/geneval/train.jsonl \\
        --per-task 2000 --exclude /data/geneval/evaluation_metadata.jsonl --seed 0

Facts used (GenEval, ``prompts/create_prompts.py`` and ``object_names.txt``): the 80 COCO classes in
GenEval's spelling; ten colours; the templates ``a photo of a(n) X`` (single_object), ``... X and
a(n) Y`` (two_object), ``a photo of <two|three|four> Xs`` with ``exclude`` at ``count + 1``
(counting, 2 to 4), ``a photo of a(n) <colour> X`` (colors, never "person"), ``a photo of a(n) X
<left of|right of|above|below> a(n) Y`` whose metadata lists Y first and gives X ``position:
[relation, 0]`` (position), and two distinct classes with two distinct colours (color_attr);
``a``/``an`` by the first letter, plurals with ``es`` after a final ``s``.

Every record passes :func:`~dgpo_lightning.rewards.geneval_rules.check_metadata`; a prompt whose
text, or whose metadata, equals one of an ``--exclude`` file is never written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dgpo_lightning.rewards.detectors import COLORS

#: The 80 COCO classes in GenEval's spelling and order (``object_names.txt``).
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: Classes that GenEval never gives a colour.
UNCOLOURED: frozenset[str] = frozenset({"person"})


def with_article(noun: str) -> str:
    """``"an apple"``, ``"a cat"`` (by the first letter, as GenEval writes them)."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def plural(noun: str) -> str:
    """``"buses"``, ``"cats"`` (``es`` after a final ``s``, as GenEval writes them)."""
    return noun + ("es" if noun.endswith("s") else "s")


def _colourable(classes: Sequence[str]) -> list[str]:
    return [c for c in classes if c not in UNCOLOURED]


def single_object(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    name = rng.choice(classes)
    return {"tag": "single_object", "include": [{"class": name, "count": 1}], "prompt": f"a photo of {with_article(name)}"}


def two_object(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    a, b = rng.sample(list(classes), 2)
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
    }


def counting(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    name, count = rng.choice(classes), rng.choice(sorted(NUMBER_WORDS))
    return {
        "tag": "counting",
        "include": [{"class": name, "count": count}],
        "exclude": [{"class": name, "count": count + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(name)}",
    }


def colors(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    name, color = rng.choice(_colourable(classes)), rng.choice(COLORS)
    return {
        "tag": "colors",
        "include": [{"class": name, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {name}",
    }


def position(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    a, b = rng.sample(list(classes), 2)
    relation = rng.choice(RELATIONS)
    return {
        "tag": "position",
        # B (the reference object) comes first; A's clause points at it.
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}",
    }


def color_attr(rng: random.Random, classes: Sequence[str]) -> dict[str, Any]:
    a, b = rng.sample(_colourable(classes), 2)
    color_a, color_b = rng.sample(list(COLORS), 2)
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}],
        "prompt": f"a photo of {with_article(color_a)} {a} and {with_article(color_b)} {b}",
    }


GENERATORS: dict[str, Callable[[random.Random, Sequence[str]], dict[str, Any]]] = {
    "single_object": single_object,
    "two_object": two_object,
    "counting": counting,
    "colors": colors,
    "position": position,
    "color_attr": color_attr,
}


def metadata_key(record: dict[str, Any]) -> str:
    """A canonical text of a record's clauses (what GenEval scores), independent of key order."""
    return json.dumps({"include": record.get("include"), "exclude": record.get("exclude") or []}, sort_keys=True)


def possible_prompts(task: str, classes: Sequence[str] = GENEVAL_CLASSES) -> int:
    """How many distinct prompts ``task``'s template can produce from ``classes``."""
    n, k = len(classes), len(_colourable(classes))
    return {
        "single_object": n,
        "two_object": n * (n - 1),
        "counting": n * len(NUMBER_WORDS),
        "colors": k * len(COLORS),
        "position": n * (n - 1) * len(RELATIONS),
        "color_attr": k * (k - 1) * len(COLORS) * (len(COLORS) - 1),
    }[task]


def generate_prompts(
    per_task: int | dict[str, int],
    *,
    seed: int = 0,
    exclude: Iterable[dict[str, Any]] = (),
    classes: Sequence[str] = GENEVAL_CLASSES,
    max_tries: int = 200,
) -> list[dict[str, Any]]:
    """Distinct GenEval-format records, ``per_task`` of each family (a dict sets each count).

    A family with fewer possible prompts than asked (``single_object`` has 80, fewer once excluded)
    gives all it can. Records whose prompt text or metadata occurs in ``exclude`` are skipped.
    Deterministic for a ``seed`` (Python's ``random.Random``; one stream per family, so changing
    one family's count leaves the others' prompts unchanged).
    """
    from dgpo_lightning.rewards.geneval_rules import check_metadata

    counts = {task: int(per_task) for task in TASKS} if not isinstance(per_task, dict) else dict(per_task)
    unknown = sorted(set(counts) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown GenEval task families {unknown}; choose from {', '.join(TASKS)}")
    banned_text, banned_meta = set(), set()
    for record in exclude:
        banned_text.add(str(record.get("prompt", "")).strip())
        if isinstance(record.get("include"), list):
            banned_meta.add(metadata_key(record))
    records: list[dict[str, Any]] = []
    for task_index, task in enumerate(TASKS):
        wanted = counts.get(task, 0)
        if wanted < 0:
            raise ValueError(f"per-task count for {task} must be >= 0, got {wanted}")
        rng = random.Random(f"{seed}:{task_index}")
        seen: set[str] = set()
        misses = 0
        target = min(wanted, possible_prompts(task, classes))
        while len(seen) < target and misses < max_tries * max(target, 1):
            record = GENERATORS[task](rng, classes)
            if record["prompt"] in seen or record["prompt"] in banned_text or metadata_key(record) in banned_meta:
                misses += 1
                continue
            check_metadata(record)
            seen.add(record["prompt"])
            records.append(record)
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from dgpo_lightning.data.prompts import read_prompt_file
    from dgpo_lightning.errors import ShortErrorsParser

    parser = ShortErrorsParser(
        prog="python -m dgpo_lightning.data.geneval_prompts",
        description="Write GenEval-format training prompts (six task families), disjoint from evaluation files.",
    )
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--per-task", type=int, default=1000, help="prompts per task family (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="FILE",
        help="a prompt file (GenEval evaluation_metadata.jsonl or .txt) whose prompts must not appear; repeatable",
    )
    args = parser.parse_args(argv)
    if not str(args.out).endswith(".jsonl"):
        parser.error(f"--out {args.out!r} must end in .jsonl (the GenEval metadata format)")
    if args.per_task < 0:
        parser.error(f"--per-task must be >= 0, got {args.per_task}")
    try:
        banned = [record for spec in args.exclude for record in read_prompt_file(spec).records]
    except (FileNotFoundError, ValueError) as error:  # a missing or malformed --exclude file
        parser.exit(2, f"error: --exclude: {error}\n")
    records = generate_prompts(args.per_task, seed=args.seed, exclude=banned)
    path = write_jsonl(records, args.out)
    by_tag: dict[str, int] = {}
    for record in records:
        by_tag[record["tag"]] = by_tag.get(record["tag"], 0) + 1
    summary = ", ".join(f"{tag} {by_tag.get(tag, 0)}" for tag in TASKS)
    print(f"wrote {len(records)} prompts to {path} ({summary}); {len(banned)} excluded prompts never used")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["GENEVAL_CLASSES", "TASKS", "generate_prompts", "main", "metadata_key", "plural", "possible_prompts", "with_article"]
