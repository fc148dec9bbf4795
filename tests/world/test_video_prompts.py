"""The video world's prompt splits: disjoint, held-out combinations never trained on, readable by
the data layer as ``world_video:<split>``."""

from __future__ import annotations

import json

import pytest

from dgpo_lightning.data.prompts import read_prompt_file
from dgpo_lightning.rewards.geneval_rules import check_metadata
from dgpo_lightning.world.prompts import HELD_OUT_COUNTS, held_out_colour_pair
from dgpo_lightning.world.scene import CLASSES, COLORS
from dgpo_lightning.world.video.backbone import video_vocabulary
from dgpo_lightning.world.model import split_words
from dgpo_lightning.world.video.prompts import generate, read_records
from dgpo_lightning.world.video.scene import DIRECTIONS, PROMPT_DIR, RELATIVE_MOTIONS, SPLITS


def _combination(record: dict) -> tuple:
    """What a held-out rule is about, per task."""
    clauses = record["include"]
    if record["tag"] == "motion":
        return ("motion", clauses[0]["class"], record["motion"])
    if record["tag"] == "color_motion":
        return ("color", clauses[0]["color"], clauses[0]["class"])
    if record["tag"] == "counting":
        return ("count", clauses[0]["class"], clauses[0]["count"])
    return ("relative", clauses[0]["class"], clauses[1]["class"], record["motion"])


def test_shipped_files_are_the_generator_output():
    for split, records in generate().items():
        lines = (PROMPT_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == records


def test_splits_are_disjoint_and_held_out_combinations_never_trained():
    splits = {split: read_records(split) for split in SPLITS}
    prompts = {split: {r["prompt"] for r in records} for split, records in splits.items()}
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    trained = {_combination(r) for r in splits["train"]}
    for split in ("validation", "test"):
        assert not {_combination(r) for r in splits[split]} & trained
        assert {r["tag"] for r in splits[split]} == {"motion", "color_motion", "relative_motion", "counting"}
    # The rules of the image world hold for the colour and count pairs (recomputed from its helpers).
    for record in splits["train"]:
        clause = record["include"][0]
        if record["tag"] == "color_motion":
            assert not held_out_colour_pair(clause["color"], clause["class"])
        if record["tag"] == "counting":
            assert (clause["class"], clause["count"]) not in HELD_OUT_COUNTS
    # Every concept is still trained.
    train = splits["train"]
    assert {c["class"] for r in train for c in r["include"]} == set(CLASSES)
    assert {r["include"][0]["color"] for r in train if r["tag"] == "color_motion"} == set(COLORS)
    assert {r["motion"] for r in train} == set(DIRECTIONS) | set(RELATIVE_MOTIONS)
    assert {r["include"][0]["count"] for r in train if r["tag"] == "counting"} == {2, 3, 4}


@pytest.mark.parametrize("split", SPLITS)
def test_data_layer_reads_world_video_specs_and_the_words_are_in_the_vocabulary(split):
    prompt_file = read_prompt_file(f"world_video:{split}")
    assert prompt_file.records == read_records(split) and prompt_file.has_metadata
    vocabulary = set(video_vocabulary())
    for record in prompt_file.records:
        check_metadata(record)  # the data layer checks every GenEval-style record with this
        assert set(split_words(record["prompt"])) <= vocabulary


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="validation"):
        read_prompt_file("world_video:dev")
