"""The GenEval training-prompt generator: schema, templates, disjointness, reproducibility, CLI."""

import json
import re

import pytest

from dgpo_lightning.data.geneval_prompts import (
    GENEVAL_CLASSES,
    TASKS,
    generate_prompts,
    main,
    metadata_key,
    plural,
    possible_prompts,
    with_article,
)
from dgpo_lightning.data.prompts import read_prompt_file
from dgpo_lightning.data.validation import validate_prompt_file
from dgpo_lightning.rewards.detectors import COLORS, GENEVAL_CLASS_ALIASES
from dgpo_lightning.rewards.geneval_rules import check_metadata


def test_class_list_is_cocos_80_in_genevals_spelling():
    assert len(GENEVAL_CLASSES) == len(set(GENEVAL_CLASSES)) == 80
    assert set(GENEVAL_CLASS_ALIASES.values()) <= set(GENEVAL_CLASSES)  # the detector's aliases
    assert not set(GENEVAL_CLASS_ALIASES) & set(GENEVAL_CLASSES)  # COCO's own spellings are not used


def test_grammar_follows_geneval():
    assert with_article("apple") == "an apple" and with_article("umbrella") == "an umbrella"
    assert with_article("hot dog") == "a hot dog"
    assert plural("bus") == "buses" and plural("skis") == "skises" and plural("cat") == "cats"


def _parse(record):
    """Re-derive the metadata from the prompt text alone, independently of the generator."""
    text, tag = record["prompt"], record["tag"]
    names = "|".join(sorted(map(re.escape, GENEVAL_CLASSES), key=len, reverse=True))
    colors = "|".join(COLORS)
    art = r"an? "
    if tag == "single_object":
        (a,) = re.fullmatch(rf"a photo of {art}({names})", text).groups()
        return [{"class": a, "count": 1}], None
    if tag == "two_object":
        a, b = re.fullmatch(rf"a photo of {art}({names}) and {art}({names})", text).groups()
        return [{"class": a, "count": 1}, {"class": b, "count": 1}], None
    if tag == "counting":
        word, noun = re.fullmatch(r"a photo of (two|three|four) (.+)", text).groups()
        n = {"two": 2, "three": 3, "four": 4}[word]
        (a,) = [c for c in GENEVAL_CLASSES if plural(c) == noun]
        return [{"class": a, "count": n}], [{"class": a, "count": n + 1}]
    if tag == "colors":
        color, a = re.fullmatch(rf"a photo of {art}({colors}) ({names})", text).groups()
        return [{"class": a, "count": 1, "color": color}], None
    if tag == "position":
        a, rel, b = re.fullmatch(rf"a photo of {art}({names}) (left of|right of|above|below) {art}({names})", text).groups()
        return [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}], None
    ca, a, cb, b = re.fullmatch(rf"a photo of {art}({colors}) ({names}) and {art}({colors}) ({names})", text).groups()
    return [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}], None


def test_every_record_validates_and_its_metadata_says_what_its_prompt_says():
    records = generate_prompts(60, seed=3)
    by_tag = {tag: [r for r in records if r["tag"] == tag] for tag in TASKS}
    assert {tag: len(v) for tag, v in by_tag.items()} == {tag: 60 for tag in TASKS}
    assert len({r["prompt"] for r in records}) == len(records)
    for record in records:
        check_metadata(record)
        include, exclude = _parse(record)
        assert record["include"] == include, record
        assert record.get("exclude") == exclude, record
        if record["tag"] in ("two_object", "position", "color_attr"):
            assert record["include"][0]["class"] != record["include"][1]["class"]
        if record["tag"] == "color_attr":
            assert record["include"][0]["color"] != record["include"][1]["color"]
        if record["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" for c in record["include"])
    article = re.compile(r"\ba (?=[aeiou])|\ban (?=[^aeiou])")
    assert not any(article.search(r["prompt"]) for r in records)


def test_reproducible_and_seeds_differ():
    assert generate_prompts(20, seed=1) == generate_prompts(20, seed=1)
    assert generate_prompts(20, seed=1) != generate_prompts(20, seed=2)
    # One family's count does not move the others' prompts.
    a = generate_prompts({"counting": 5, "position": 7}, seed=1)
    b = generate_prompts({"counting": 30, "position": 7}, seed=1)
    assert [r for r in a if r["tag"] == "position"] == [r for r in b if r["tag"] == "position"]


def test_small_families_give_all_they_can():
    records = generate_prompts({"single_object": 500, "counting": 500}, seed=0)
    assert sum(r["tag"] == "single_object" for r in records) == possible_prompts("single_object") == 80
    assert sum(r["tag"] == "counting" for r in records) == possible_prompts("counting") == 240


def test_disjoint_from_an_evaluation_file(tmp_path):
    evaluation = generate_prompts(40, seed=43)
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation))
    # The same prompts reworded as metadata-only records must be excluded too.
    train = generate_prompts(200, seed=43, exclude=read_prompt_file(tmp_path / "evaluation_metadata.jsonl").records)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert not {metadata_key(r) for r in train} & {metadata_key(r) for r in evaluation}
    assert sum(r["tag"] == "single_object" for r in train) == 80 - sum(r["tag"] == "single_object" for r in evaluation)
    # Without the exclusion, seed 43 reproduces the same draws, so the filter really removed some.
    unfiltered = generate_prompts(200, seed=43)
    assert {r["prompt"] for r in unfiltered} & {r["prompt"] for r in evaluation}


def test_command_line_writes_a_file_the_training_loader_accepts(tmp_path, capsys):
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in generate_prompts(10, seed=9)))
    out = tmp_path / "train.jsonl"
    assert main(["--out", str(out), "--per-task", "25", "--seed", "5", "--exclude", str(evaluation)]) == 0
    assert "wrote 150 prompts" in capsys.readouterr().out
    checked = validate_prompt_file(out, key="data.train_prompts", rewards=["geneval"], reward_options={"geneval": {"detector": "mask2former"}})
    assert len(checked.records) == 150
    assert not {r["prompt"] for r in checked.records} & {r["prompt"] for r in read_prompt_file(evaluation).records}
    with pytest.raises(SystemExit) as error:
        main(["--out", str(tmp_path / "x.txt")])
    assert error.value.code == 2 and "must end in .jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main(["--out", str(out), "--exclude", str(tmp_path / "missing.jsonl")])
    assert error.value.code == 2 and "missing.jsonl" in capsys.readouterr().err
