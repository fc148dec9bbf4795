import json
from collections import Counter

import pytest

from dgpo_lightning.data.prompts import draw_prompts, load_prompt_records


def test_world_split_names_resolve():
    records = load_prompt_records("world:train")
    assert len(records) > 50 and all("tag" in r and "include" in r for r in records)


def test_plain_text_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert load_prompt_records(path) == [{"prompt": "a cat"}, {"prompt": "a dog"}]


@pytest.mark.parametrize(
    "content, message",
    [("", "contains no prompts"), ("{not json\n", r"bad\.jsonl:1: not valid JSON"), ('{"tag": "x"}\n', "non-empty string 'prompt'")],
)
def test_bad_prompt_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_prompt_records(path)
    assert str(path) in str(error.value)


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="/no/such.jsonl"):
        load_prompt_records("/no/such.jsonl")


def test_draw_balances_tags_and_is_reproducible():
    records = load_prompt_records("world:train")
    tags = sorted({r["tag"] for r in records})
    draw = draw_prompts(records, 4 * len(tags), seed=3)
    counts = Counter(records[i]["tag"] for i in draw)
    assert set(counts) == set(tags) and set(counts.values()) == {4}
    assert draw == draw_prompts(records, 4 * len(tags), seed=3)
    assert draw != draw_prompts(records, 4 * len(tags), seed=4)
    # Without balancing the draw follows the split's own mix (half of it is colour attribution).
    unbalanced = Counter(records[i]["tag"] for i in draw_prompts(records, 100, seed=0, balance_tags=False))
    assert unbalanced.most_common(1)[0][1] > 25


def test_draw_without_replacement_inside_a_family(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "tag": "a"}) + "\n" for i in range(5)))
    records = load_prompt_records(path)
    assert sorted(draw_prompts(records, 5, seed=0)) == [0, 1, 2, 3, 4]


def test_read_prompt_file_keeps_line_numbers(tmp_path):
    from dgpo_lightning.data.prompts import read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "a cat"}\n\n{"prompt": "a dog", "tag": "x"}\n')
    prompts = read_prompt_file(path)
    assert prompts.records == [{"prompt": "a cat"}, {"prompt": "a dog", "tag": "x"}]
    assert prompts.lines == [2, 4]
    assert prompts.where(1) == f"{path}:4"
    assert not prompts.has_metadata


def test_every_shipped_record_is_a_scene_the_world_can_draw():
    from dgpo_lightning.data.prompts import read_prompt_file
    from dgpo_lightning.world.scene import validate_metadata

    for split in ("train", "validation", "test"):
        prompts = read_prompt_file(f"world:{split}")
        assert len(prompts.records) > 40 and prompts.has_metadata
        for index, record in enumerate(prompts.records):
            validate_metadata(record, where=prompts.where(index))


def test_blank_prompt_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "   "}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        load_prompt_records(path)
