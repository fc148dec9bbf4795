"""Scenes of the embedded world: coloured shapes on a 3×3 grid, rendered to small RGB images.

An image is ``[3, size, size]`` in ``[0, 1]`` on a black background. Each object sits in its own
cell of a 3×3 grid; its size (≈ 8 px at 32×32) and position (± 0.5 px) are jittered from a
``torch.Generator``. Edges are anti-aliased by 4× supersampling.

Prompts use GenEval's metadata schema (``tag``, ``include``/``exclude`` clauses with ``class``,
``count``, optional ``color`` and ``position: [relation, target_clause_index]``);
:func:`sample_scene` draws a random scene that satisfies such a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.10),
    "blue": (0.10, 0.20, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.65, 0.10, 0.85),
    "white": (0.95, 0.95, 0.95),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GRID = 3
#: Objects per scene cannot exceed the number of grid cells.
MAX_OBJECTS = GRID * GRID

OBJECT_SIZE = 8.0  # px at 32×32; scaled with the image size
SIZE_JITTER = 1.0  # object size ∈ [8 − 1, 8 + 1] px
POSITION_JITTER = 0.5  # centre offset ∈ [−0.5, 0.5] px per axis (keeps ≥ 0.6 px between neighbours)
SUPERSAMPLE = 4

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
#: The shipped prompt splits (``prompts/<split>.jsonl``; :mod:`dgpo_lightning.world.prompts`).
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class SceneObject:
    """One shape in grid cell ``(row, col)``; row 0 is the top, column 0 the left."""

    cls: str
    color: str
    row: int
    col: int


# --------------------------------------------------------------------------- rendering


def _coverage(cls: str, cx: float, cy: float, side: float, xs: Tensor, ys: Tensor) -> Tensor:
    """Boolean mask of the supersampled points inside the shape centred at ``(cx, cy)``."""
    half = side / 2
    dx, dy = xs - cx, ys - cy
    if cls == "circle":
        return dx * dx + dy * dy <= half * half
    if cls == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if cls == "triangle":  # apex up, base at the bottom; its bounding box is side × side
        depth = dy + half  # 0 at the apex, side at the base
        return (depth >= 0) & (depth <= side) & (dx.abs() <= depth / 2)
    raise ValueError(f"unknown class {cls!r}; known: {', '.join(CLASSES)}")


def render(
    objects: Sequence[SceneObject], *, size: int = 32, generator: torch.Generator | None = None
) -> Tensor:
    """Render ``objects`` to an image ``[3, size, size]`` in ``[0, 1]`` (black background).

    With a ``generator``, each object's size and centre are jittered (uniform, see
    ``SIZE_JITTER``/``POSITION_JITTER``); without one, objects are drawn at their canonical size and
    cell centre.
    """
    cells = [(o.row, o.col) for o in objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a grid cell: {cells}")
    scale = size / 32.0
    cell = size / GRID
    # Coordinates of the supersampled points (pixel (i, j) covers [j, j+1) × [i, i+1)).
    offsets = (torch.arange(size * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    image = torch.zeros(3, size, size)
    for obj in objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; known: {', '.join(COLORS)}")
        if not (0 <= obj.row < GRID and 0 <= obj.col < GRID):
            raise ValueError(f"cell ({obj.row}, {obj.col}) is outside the {GRID}×{GRID} grid")
        side, jx, jy = OBJECT_SIZE, 0.0, 0.0
        if generator is not None:
            u = torch.rand(3, generator=generator).tolist()
            side += SIZE_JITTER * (2 * u[0] - 1)
            jx, jy = POSITION_JITTER * (2 * u[1] - 1), POSITION_JITTER * (2 * u[2] - 1)
        cx = (obj.col + 0.5) * cell + jx * scale
        cy = (obj.row + 0.5) * cell + jy * scale
        mask = _coverage(obj.cls, cx, cy, side * scale, xs, ys).float()
        cover = torch.nn.functional.avg_pool2d(mask[None, None], SUPERSAMPLE)[0]  # [1, size, size]
        colour = torch.tensor(COLORS[obj.color]).view(3, 1, 1)
        image = image * (1 - cover) + cover * colour
    return image.clamp_(0, 1)


# --------------------------------------------------------------------------- metadata


def check_record_header(metadata: Any, tags: Sequence[str], *, where: str = "", tags_label: str = "known tags"):
    """Check what every world's prompt record starts with (a JSON object, a known ``tag``, a non-empty
    ``prompt``) and return the ``fail(message)`` that raises ``ValueError`` prefixed with ``where``."""
    prefix = f"{where}: " if where else ""

    def fail(message: str) -> None:
        raise ValueError(prefix + message)

    if not isinstance(metadata, Mapping):
        fail(f"a prompt record must be a JSON object, got {type(metadata).__name__}")
    tag = metadata.get("tag")
    if tag not in tags:
        fail(f"unknown tag {tag!r}; {tags_label}: {', '.join(tags)}")
    if not isinstance(metadata.get("prompt"), str) or not metadata["prompt"].strip():
        fail("record has no 'prompt' text")
    return fail


def validate_metadata(metadata: Any, *, where: str = "") -> None:
    """Raise ``ValueError`` unless ``metadata`` is a GenEval record this world can render.

    Checks the schema (``tag``, ``prompt``, non-empty ``include``; clauses with ``class``/``count``,
    optional ``color`` and ``position``; optional ``exclude``), that every class, colour, relation
    and count is known/valid, that a ``position`` points at an EARLIER include clause (GenEval
    needs the target's matched objects when it reaches the clause), and that the scene fits on the grid.
    """
    fail = check_record_header(metadata, TAGS, where=where, tags_label="known tags")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        fail("record needs a non-empty 'include' list of clauses")
    exclude = metadata.get("exclude", [])
    if not isinstance(exclude, list):
        fail("'exclude' must be a list of clauses")

    def check_clause(clause: Any, kind: str, index: int) -> None:
        name = f"{kind}[{index}]"
        if not isinstance(clause, Mapping):
            fail(f"{name} must be an object with 'class' and 'count'")
        unknown_keys = set(clause) - {"class", "count", "color", "position"}
        if unknown_keys:
            fail(f"{name} has unknown keys {sorted(unknown_keys)}")
        cls = clause.get("class")
        if cls not in CLASSES:
            fail(f"{name}: unknown class {cls!r}; this world knows {', '.join(CLASSES)}")
        count = clause.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            fail(f"{name}: count must be a positive integer, got {count!r}")
        if count > MAX_OBJECTS:
            fail(f"{name}: count {count} exceeds the {MAX_OBJECTS} cells of the grid")
        if "color" in clause and clause["color"] not in COLORS:
            fail(f"{name}: unknown colour {clause['color']!r}; this world knows {', '.join(COLORS)}")
        if "position" in clause:
            if kind != "include":
                fail(f"{name}: exclude clauses cannot carry a position")
            position = clause["position"]
            if not (isinstance(position, (list, tuple)) and len(position) == 2):
                fail(f"{name}: position must be [relation, target_clause_index], got {position!r}")
            relation, target = position
            if relation not in RELATIONS:
                fail(f"{name}: unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(include):
                fail(f"{name}: position target {target!r} is not the index of an include clause")
            # GenEval evaluates include clauses in order and reads the target's matched objects, so
            # a position on its own or a later clause can never be rewarded.
            if target == index:
                fail(f"{name}: position refers to its own clause")
            if target > index:
                fail(
                    f"{name}: position target include[{target}] is a later clause; GenEval evaluates "
                    f"clauses in order, so a position must point at an earlier one (0..{index - 1})"
                )

    for i, clause in enumerate(include):
        check_clause(clause, "include", i)
    for i, clause in enumerate(exclude):
        check_clause(clause, "exclude", i)
    total = sum(c["count"] for c in include)
    if total > MAX_OBJECTS:
        fail(f"the include clauses ask for {total} objects; the grid holds {MAX_OBJECTS}")
    for i, ex in enumerate(exclude):
        needed = sum(c["count"] for c in include if c["class"] == ex["class"])
        if needed >= ex["count"]:
            fail(f"exclude[{i}] ({ex['count']}+ {ex['class']}) contradicts the include clauses")


def prompt_file(split: str) -> Path:
    """Path of a shipped prompt split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; shipped splits: {', '.join(SPLITS)}")
    return PROMPT_DIR / f"{split}.jsonl"


# --------------------------------------------------------------------------- scene sampling


def random_choice(options: Sequence[Any], generator: torch.Generator | None = None) -> Any:
    """One element of ``options``, uniformly, from ``generator`` (one ``torch.randint`` draw)."""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def cell_relations(a: tuple[int, int], b: tuple[int, int]) -> set[str]:
    """Relations of cell ``a = (row, col)`` relative to cell ``b`` that survive GenEval's test.

    "left of" needs a strictly smaller column *and* a column distance larger than the row distance
    (a one-step diagonal would sit on the ±0.5 threshold of GenEval's normalised offset and flip
    with jitter); the other relations are symmetric.
    """
    d_row, d_col = a[0] - b[0], a[1] - b[1]
    relations = set()
    if abs(d_col) > abs(d_row):
        relations.add("left of" if d_col < 0 else "right of")
    if abs(d_row) > abs(d_col):
        relations.add("above" if d_row < 0 else "below")
    return relations


def sample_scene(
    metadata: Mapping[str, Any], generator: torch.Generator | None = None, *, max_tries: int = 2000
) -> list[SceneObject]:
    """A random scene satisfying ``metadata``: exactly ``count`` objects per include clause.

    Unspecified colours are drawn uniformly; every object of a positioned clause stands in the
    required relation to every object of its target clause (see :func:`cell_relations`). Only the
    include objects are drawn, so exclude clauses hold unless they contradict the includes
    (rejected by :func:`validate_metadata`).
    """
    validate_metadata(metadata)
    include = metadata["include"]
    colour_names = list(COLORS)
    specs: list[tuple[int, str]] = []  # (clause index, class) per object
    for index, clause in enumerate(include):
        specs += [(index, clause["class"])] * clause["count"]
    constraints = [
        (index, clause["position"][1], clause["position"][0])
        for index, clause in enumerate(include)
        if "position" in clause
    ]
    for _ in range(max_tries):
        cells = torch.randperm(MAX_OBJECTS, generator=generator)[: len(specs)].tolist()
        placed: dict[int, list[tuple[int, int]]] = {}
        for (index, _), cell in zip(specs, cells):
            placed.setdefault(index, []).append(divmod(cell, GRID))
        if all(
            relation in cell_relations(a, b)
            for index, target, relation in constraints
            for a in placed[index]
            for b in placed[target]
        ):
            break
    else:
        raise ValueError(f"no placement on the {GRID}×{GRID} grid satisfies {metadata.get('prompt')!r}")
    objects = []
    for (index, cls), cell in zip(specs, cells):
        colour = include[index].get("color")
        if colour is None:
            colour = random_choice(colour_names, generator)
        row, col = divmod(cell, GRID)
        objects.append(SceneObject(cls, colour, row, col))
    return objects


def corrupt_metadata(metadata: Mapping[str, Any], generator: torch.Generator | None = None) -> dict:
    """A copy of ``metadata`` with one attribute changed, the way captions of web images go wrong.

    The prompt text is kept; the scene drawn from the result no longer matches it. Per task:
    single_object draws another class, two_object drops one of the two objects, counting is off by
    one, colors draws another colour, position another relation, and color_attr swaps the two
    colours (an attribute-binding error). Pretraining on such pairs
    (:mod:`dgpo_lightning.world.pretrain` ``--caption-noise``) gives a base that knows every concept
    but draws it unreliably: the headroom online RL turns into reward.
    """
    validate_metadata(metadata)
    include = [dict(clause) for clause in metadata["include"]]
    tag = metadata["tag"]
    if tag == "single_object":
        include[0]["class"] = random_choice([c for c in CLASSES if c != include[0]["class"]], generator)
    elif tag == "two_object":
        include = [random_choice(include, generator)]
    elif tag == "counting":
        count = include[0]["count"]
        include[0]["count"] = count + 1 if count == 1 else count + random_choice((-1, 1), generator)
    elif tag == "colors":
        include[0]["color"] = random_choice([c for c in COLORS if c != include[0]["color"]], generator)
    elif tag == "position":
        for clause in include:
            if "position" in clause:
                relation, target = clause["position"]
                clause["position"] = [random_choice([r for r in RELATIONS if r != relation], generator), target]
    elif tag == "color_attr":
        include[0]["color"], include[1]["color"] = include[1]["color"], include[0]["color"]
    # Renderable by construction; sample_scene validates it again when it is drawn.
    return {"tag": tag, "include": include, "prompt": metadata["prompt"]}


def render_prompt(
    metadata: Mapping[str, Any], generator: torch.Generator | None = None, *, size: int = 32
) -> Tensor:
    """``render(sample_scene(metadata, generator), generator=generator)`` → ``[3, size, size]``."""
    return render(sample_scene(metadata, generator), size=size, generator=generator)
