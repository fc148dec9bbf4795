"""The embedded world's renderer, scene sampler, prompt validation and shipped prompt splits."""

import json
import math
from collections import Counter

import pytest
import torch

from dgpo_lightning.data.prompts import load_prompt_records
from dgpo_lightning.world import prompts as prompt_gen
from dgpo_lightning.world.scene import (
    CLASSES,
    COLORS,
    GRID,
    RELATIONS,
    TAGS,
    SceneObject,
    cell_relations,
    corrupt_metadata,
    prompt_file,
    render,
    render_prompt,
    sample_scene,
    validate_metadata,
)

ALL_RECORDS = [r for split in ("train", "validation", "test") for r in load_prompt_records(f"world:{split}")]


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("cls, area", [("square", 64.0), ("circle", math.pi * 16), ("triangle", 32.0)])
def test_canonical_shape_has_the_area_of_its_geometry(cls, area):
    # Canonical object: side 8 px at the centre of cell (1, 1) = (16, 16); coverage sums to the area.
    image = render([SceneObject(cls, "white", 1, 1)])
    coverage = image[0] / COLORS["white"][0]
    assert coverage.sum().item() == pytest.approx(area, rel=0.01)
    ys, xs = (coverage > 0).nonzero(as_tuple=True)
    assert (xs.min().item(), xs.max().item(), ys.min().item(), ys.max().item()) == (12, 19, 12, 19)


def test_render_colours_background_and_range():
    objects = [SceneObject("square", name, *divmod(i, GRID)) for i, name in enumerate(COLORS)]
    image = render(objects)
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
    cell = 32 / GRID
    for obj in objects:
        centre = image[:, int((obj.row + 0.5) * cell), int((obj.col + 0.5) * cell)]
        assert torch.allclose(centre, torch.tensor(COLORS[obj.color]))
    assert image[:, 0, 0].abs().sum() == 0 and image[:, 31, 31].abs().sum() == 0  # black corners


def test_render_jitter_is_seeded_bounded_and_keeps_objects_in_their_cells():
    objects = [SceneObject("square", "red", r, c) for r in range(GRID) for c in range(GRID)]
    first = render(objects, generator=torch.Generator().manual_seed(7))
    again = render(objects, generator=torch.Generator().manual_seed(7))
    other = render(objects, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Neighbouring objects never touch: every grid line between cells stays (nearly) dark.
    for image in (first, other):
        for k in (1, 2):
            line = int(k * 32 / GRID)  # pixel column/row straddling the cell border
            assert image[0, :, line].max() < 0.5 and image[0, line, :].max() < 0.5


def test_render_scales_with_size_and_rejects_bad_objects():
    big = render([SceneObject("square", "white", 0, 0)], size=64)
    assert big.shape == (3, 64, 64)
    assert (big[0] / COLORS["white"][0]).sum().item() == pytest.approx(256.0, rel=0.01)
    with pytest.raises(ValueError, match="share a grid cell"):
        render([SceneObject("square", "red", 0, 0), SceneObject("circle", "blue", 0, 0)])
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        render([SceneObject("square", "teal", 0, 0)])
    with pytest.raises(ValueError, match="unknown class 'star'"):
        render([SceneObject("star", "red", 0, 0)])
    with pytest.raises(ValueError, match="outside"):
        render([SceneObject("square", "red", 3, 0)])


# --------------------------------------------------------------------------- scene sampling


def test_cell_relations():
    assert cell_relations((1, 0), (1, 1)) == {"left of"}
    assert cell_relations((1, 2), (1, 0)) == {"right of"}
    assert cell_relations((0, 1), (2, 1)) == {"above"}
    assert cell_relations((2, 0), (1, 0)) == {"below"}
    assert cell_relations((0, 0), (1, 1)) == set()  # one-step diagonal: ambiguous, never used
    assert cell_relations((0, 0), (1, 2)) == {"left of"}  # column distance dominates


def _check_scene(record, objects):
    include = record["include"]
    counts = Counter(o.cls for o in objects)
    assert sum(counts.values()) == sum(c["count"] for c in include)
    for clause in include:
        assert counts[clause["class"]] >= clause["count"]
        if "color" in clause:
            assert any(o.cls == clause["class"] and o.color == clause["color"] for o in objects)
    for clause in record.get("exclude", []):
        assert counts[clause["class"]] < clause["count"]
    assert len({(o.row, o.col) for o in objects}) == len(objects)


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupted_records_keep_the_caption_and_their_scenes_fail_it(seed):
    from dgpo_lightning.rewards.geneval import image_correct
    from dgpo_lightning.world.detector import detect_batch

    generator = torch.Generator().manual_seed(seed)
    corrupted = [corrupt_metadata(record, generator) for record in ALL_RECORDS]
    for record, bad in zip(ALL_RECORDS, corrupted):
        assert bad["prompt"] == record["prompt"] and bad["tag"] == record["tag"]
        assert bad["include"] != record["include"]
        _check_scene(bad, sample_scene(bad, generator))
    # Each scene drawn for a corrupted record is judged wrong for the original caption by the
    # world's detector and GenEval's rules, while the uncorrupted scenes pass.
    images = torch.stack([render_prompt(r, generator) for r in corrupted + ALL_RECORDS])
    verdicts = [image_correct(r, d) for r, d in zip(ALL_RECORDS + ALL_RECORDS, detect_batch(images))]
    assert not any(verdicts[: len(ALL_RECORDS)])
    assert all(verdicts[len(ALL_RECORDS) :])
    # The corruption of each task is the documented one, and it is drawn at random.
    by_tag = {}
    for record, bad in zip(ALL_RECORDS, corrupted):
        by_tag.setdefault(record["tag"], []).append((record["include"], bad["include"]))
    assert all(len(b) == 1 and b[0] in a for a, b in by_tag["two_object"])
    assert all(abs(b[0]["count"] - a[0]["count"]) == 1 for a, b in by_tag["counting"])
    assert {b[0]["count"] - a[0]["count"] for a, b in by_tag["counting"]} == {-1, 1}
    assert all(b[0]["color"] == a[1]["color"] and b[1]["color"] == a[0]["color"] for a, b in by_tag["color_attr"])
    assert all(a[1]["position"][0] != b[1]["position"][0] for a, b in by_tag["position"])
    assert len({b[0]["color"] for _, b in by_tag["colors"]}) > 1


def test_pretrain_rejects_a_caption_noise_outside_the_unit_interval(capsys):
    from dgpo_lightning.world.pretrain import parse_args

    assert parse_args(["--out", "x", "--caption-noise", "0.4"]).caption_noise == 0.4
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--caption-noise", "1.5"])
    assert "--caption-noise must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_scene_satisfies_every_shipped_prompt(seed):
    generator = torch.Generator().manual_seed(seed)
    for record in ALL_RECORDS:
        objects = sample_scene(record, generator)
        _check_scene(record, objects)
        if record["tag"] == "position":
            target, subject = record["include"]
            a = next(o for o in objects if o.cls == subject["class"])
            b = next(o for o in objects if o.cls == target["class"])
            assert subject["position"][0] in cell_relations((a.row, a.col), (b.row, b.col))


def test_sample_scene_with_counts_positions_and_random_colours():
    record = {
        "tag": "position",
        "include": [{"class": "square", "count": 2}, {"class": "circle", "count": 2, "position": ["left of", 0]}],
        "prompt": "a photo of two circles left of two squares",
    }
    generator = torch.Generator().manual_seed(0)
    colours = Counter()
    for _ in range(40):
        objects = sample_scene(record, generator)
        circles = [o for o in objects if o.cls == "circle"]
        squares = [o for o in objects if o.cls == "square"]
        assert len(circles) == len(squares) == 2
        assert all("left of" in cell_relations((a.row, a.col), (b.row, b.col)) for a in circles for b in squares)
        colours.update(o.color for o in objects)
    assert set(colours) == set(COLORS)  # unspecified colours cover the palette


def test_sample_scene_is_deterministic_and_reports_impossible_layouts():
    record = ALL_RECORDS[-1]
    first = sample_scene(record, torch.Generator().manual_seed(3))
    assert first == sample_scene(record, torch.Generator().manual_seed(3))
    image = render_prompt(record, torch.Generator().manual_seed(3))
    assert torch.equal(image, render_prompt(record, torch.Generator().manual_seed(3)))
    impossible = {
        "tag": "position",
        "include": [{"class": "square", "count": 3}, {"class": "circle", "count": 3, "position": ["left of", 0]}],
        "prompt": "three circles left of three squares",
    }
    with pytest.raises(ValueError, match="no placement"):
        sample_scene(impossible, torch.Generator().manual_seed(0), max_tries=50)


# --------------------------------------------------------------------------- validation and files


def _record(**changes):
    record = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(include=[{"class": "dog", "count": 1}]), "unknown class 'dog'"),
        (_record(include=[{"class": "circle", "count": 1, "color": "orange"}]), "unknown colour 'orange'"),
        (_record(include=[{"class": "circle", "count": 0}]), "count must be a positive integer"),
        (_record(include=[{"class": "circle", "count": True}]), "count must be a positive integer"),
        (_record(include=[{"class": "circle", "count": "2"}]), "count must be a positive integer"),
        (_record(include=[{"class": "circle", "count": 10}]), "exceeds the 9 cells"),
        (_record(include=[{"class": "circle", "count": 5}, {"class": "square", "count": 5}]), "grid holds 9"),
        (_record(include=[]), "non-empty 'include'"),
        (_record(include=None), "non-empty 'include'"),
        (_record(include=["circle"]), r"include\[0\] must be an object"),
        (_record(include=[{"class": "circle", "count": 1, "size": 2}]), "unknown keys"),
        (_record(tag="counting", exclude=[{"class": "circle", "count": 1}]), "contradicts"),
        (_record(exclude={"class": "circle"}), "'exclude' must be a list"),
        (_record(tag="style"), "unknown tag 'style'"),
        (_record(prompt=""), "no 'prompt'"),
        (["not", "a", "dict"], "JSON object"),
    ],
)
def test_validate_metadata_names_the_problem(record, message):
    with pytest.raises(ValueError, match=message):
        validate_metadata(record)


@pytest.mark.parametrize(
    "position, message",
    [
        (["behind", 0], "unknown relation 'behind'"),
        (["left of", 5], "not the index of an include clause"),
        (["left of", 1], "its own clause"),
        ("left of", r"must be \[relation, target_clause_index\]"),
    ],
)
def test_validate_metadata_position_clauses(position, message):
    record = {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": position}],
        "prompt": "a photo of a circle left of a square",
    }
    with pytest.raises(ValueError, match=message):
        validate_metadata(record)


def test_validate_metadata_refuses_a_position_on_a_later_clause():
    # GenEval evaluates clauses in order: include[0] cannot stand relative to include[1], not yet matched.
    record = {
        "tag": "position",
        "include": [{"class": "circle", "count": 1, "position": ["left of", 1]}, {"class": "square", "count": 1}],
        "prompt": "a photo of a circle left of a square",
    }
    with pytest.raises(ValueError, match=r"^here: include\[0\]: position target include\[1\] is a later clause"):
        validate_metadata(record, where="here")
    # The same scene with the clauses in GenEval's order is valid.
    validate_metadata(
        dict(record, include=[{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}])
    )


def test_shipped_position_clauses_point_at_earlier_clauses():
    positions = [(i, c["position"][1]) for r in ALL_RECORDS for i, c in enumerate(r["include"]) if "position" in c]
    assert positions and all(target < index for index, target in positions)


def test_pretraining_records_are_read_by_the_data_reader_and_errors_name_file_and_line(tmp_path):
    # world.pretrain reads its prompts with the data layer's reader and checks every record against
    # the world (validate_metadata, where=file:line).
    from dgpo_lightning.world.pretrain import world_records

    good = json.dumps(_record())
    path = tmp_path / "p.jsonl"
    path.write_text(good + "\n\n" + good + "\n")
    assert world_records(path) == [_record(), _record()]  # blank lines are skipped
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not valid JSON"):
        world_records(path)
    path.write_text(good + "\n\n" + json.dumps(_record(include=[{"class": "car", "count": 1}])) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: include\[0\]: unknown class 'car'"):  # line counts the blank one
        world_records(path)
    path.write_text(good + "\n" + json.dumps({"prompt": "a circle"}) + "\n")  # valid for the reader, not for the world
    with pytest.raises(ValueError, match=r"p\.jsonl:2: unknown tag None"):
        world_records(path)
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"p\.jsonl contains no prompts"):
        world_records(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        world_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        prompt_file("val")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        world_records("world:val")


def test_shipped_prompt_files_are_the_generators_output():
    from dgpo_lightning.world.pretrain import world_records

    splits = prompt_gen.generate()
    assert list(splits) == ["train", "validation", "test"]
    for split, records in splits.items():
        assert load_prompt_records(f"world:{split}") == records
        # Pretraining and evaluation see exactly these records, in this order.
        assert world_records(f"world:{split}") == records


def test_prompt_phrasing_follows_geneval():
    by_text = {r["prompt"]: r for r in ALL_RECORDS}
    assert by_text["a photo of a circle"]["include"] == [{"class": "circle", "count": 1}]
    assert by_text["a photo of three triangles"] == {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
        "prompt": "a photo of three triangles",
    }
    assert by_text["a photo of a circle left of a square"]["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    assert by_text["a photo of a red circle and a blue square"]["tag"] == "color_attr"
    assert by_text["a photo of a purple triangle"]["include"][0]["color"] == "purple"


def _colour_class_pairs(record):
    return {(c["color"], c["class"]) for c in record["include"] if "color" in c}


@pytest.mark.parametrize("split", ["validation", "test"])
def test_held_out_splits_hold_only_combinations_never_seen_in_training(split):
    train, held = load_prompt_records("world:train"), load_prompt_records(f"world:{split}")
    train_prompts = {r["prompt"] for r in train}
    # Only single_object prompts (one per class, nothing to hold out) are shared.
    assert {r["tag"] for r in held if r["prompt"] in train_prompts} == {"single_object"}
    train_pairs = set().union(*(_colour_class_pairs(r) for r in train))
    for record in held:
        if record["tag"] in ("colors", "color_attr"):
            assert _colour_class_pairs(record) - train_pairs, record["prompt"]
    train_counts = {(r["include"][0]["class"], r["include"][0]["count"]) for r in train if r["tag"] == "counting"}
    held_counts = {(r["include"][0]["class"], r["include"][0]["count"]) for r in held if r["tag"] == "counting"}
    assert held_counts and not held_counts & train_counts
    # ... while every class, colour, count and relation appears in training.
    assert {c["class"] for r in train for c in r["include"]} == set(CLASSES)
    assert {colour for colour, _ in train_pairs} == set(COLORS)
    assert {count for _, count in train_counts} == {2, 3, 4}
    assert {r["include"][1]["position"][0] for r in train if r["tag"] == "position"} == set(RELATIONS)
    assert {r["tag"] for r in held} == set(TAGS)
    tags = Counter(r["tag"] for r in held)
    assert 30 <= len(held) <= 60 and min(tags[t] for t in ("colors", "position", "color_attr")) >= 3
    assert len(train) > len(held)


def test_validation_and_test_share_no_held_out_prompt():
    """Tuning on validation never sees a test prompt; together they are every held-out prompt once."""
    validation, test = load_prompt_records("world:validation"), load_prompt_records("world:test")
    shared = {r["prompt"] for r in validation} & {r["prompt"] for r in test}
    assert {r["tag"] for r in validation + test if r["prompt"] in shared} == {"single_object"}
    assert len(shared) == len(CLASSES)
    # The two halves are the same size per task, to within one prompt.
    for tag in TAGS:
        counts = [sum(r["tag"] == tag for r in records) for records in (validation, test)]
        assert abs(counts[0] - counts[1]) <= 1, (tag, counts)
