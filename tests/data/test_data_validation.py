"""One validation path (data/validation.py): every defect class is refused before any model loads,
naming the key, the file and the line."""

import json
import math

import pytest

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.data.validation import check_reward_weights, validate_prompt_file, world_vocabulary
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.world.model import world_vocabulary as default_vocabulary

GOOD = {"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}


def jsonl(tmp_path, records, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("bad_class", ["dog", "unicorn"])
def test_unknown_class_names_key_file_and_line(tmp_path, bad_class):
    bad = {**GOOD, "prompt": f"a photo of a {bad_class}", "include": [{"class": bad_class, "count": 1}]}
    path = jsonl(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(ConfigError, match=rf"data\.train_prompts: .*p\.jsonl:3: .*{bad_class}"):
        validate_prompt_file(path, key="data.train_prompts", rewards=["geneval"])
    with pytest.raises(ConfigError, match=r"data\.train_prompts: .*p\.jsonl:3"):
        RolloutDataModule(train_prompts=str(path), prompts_per_rank=1, groups_per_batch=1, eval_prompts=None)


def test_unknown_colour_and_count_are_refused_too(tmp_path):
    for clause in ({"class": "circle", "count": 1, "color": "mauve"}, {"class": "circle", "count": 0}):
        path = jsonl(tmp_path, [{**GOOD, "include": [clause]}])
        with pytest.raises(ConfigError, match=r"p\.jsonl:1"):
            validate_prompt_file(path, key="k", rewards=["geneval_partial"])


def test_other_detectors_do_not_get_the_world_check(tmp_path):
    bad = {**GOOD, "include": [{"class": "dog", "count": 1}]}
    path = jsonl(tmp_path, [bad])
    validate_prompt_file(path, key="k", rewards=["geneval"], reward_options={"geneval": {"detector": {"kind": "x"}}})


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    bad = {**GOOD, "include": [{"class": "dog", "count": 1}]}
    path.write_text(json.dumps(GOOD) + "\n\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match=r"p\.jsonl:4"):
        validate_prompt_file(path, key="k", rewards=["geneval"])


@pytest.mark.parametrize("prompt,word", [("a photo of a circel", "circel"), ("un chat rouge", "chat"), ("a photo of a Dog", "dog")])
def test_unencodable_words_are_refused(tmp_path, prompt, word):
    path = tmp_path / "p.txt"
    path.write_text("a photo of a circle\n" + prompt + "\n")
    with pytest.raises(ConfigError, match=rf"data\.train_prompts: .*p\.txt:2: .*{word}"):
        validate_prompt_file(path, key="data.train_prompts", vocabulary=default_vocabulary())


def test_prompt_without_any_word_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a photo of a circle\n1234 !!\n")
    with pytest.raises(ConfigError, match=r"p\.txt:2: .*no word"):
        validate_prompt_file(path, key="k", vocabulary=default_vocabulary())


def test_shipped_splits_pass_every_check():
    for split in ("train", "test"):
        validate_prompt_file(f"world:{split}", key="k", rewards=["geneval", "geneval_partial"], vocabulary=world_vocabulary())


@pytest.mark.parametrize("reward", ["geneval", "geneval_partial"])
def test_metadata_rewards_need_geneval_records(tmp_path, reward):
    text = tmp_path / "p.txt"
    text.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match=rf"data\.train_prompts: .*p\.txt:1: reward '{reward}' needs GenEval metadata"):
        RolloutDataModule(train_prompts=str(text), rewards={reward: 1.0}, prompts_per_rank=1, eval_prompts=None)
    mixed = jsonl(tmp_path, [GOOD, {"prompt": "a photo of a cat"}])
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: reward"):
        validate_prompt_file(mixed, key="k", rewards=[reward])
    validate_prompt_file(text, key="k", rewards=["sharpness"])  # other rewards take plain prompts


def test_eval_prompts_are_checked_against_eval_rewards(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match=r"data\.eval_prompts: .*held_out\.txt:1: reward 'geneval'"):
        RolloutDataModule(rewards={"sharpness": 1.0}, prompts_per_rank=1, eval_prompts=str(text))


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, "heavy"])
def test_non_finite_or_non_numeric_weights_fail_at_construction(weight):
    with pytest.raises(ConfigError, match=r"data\.rewards\.geneval_partial="):
        RolloutDataModule(rewards={"geneval_partial": weight}, eval_prompts=None)
    with pytest.raises(ConfigError):
        check_reward_weights({"a": weight})


def test_too_few_distinct_prompts_is_refused(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a photo of a cat\n" * 3)  # 3 lines, 1 distinct prompt
    with pytest.raises(ConfigError, match=r"data\.train_prompts: .*1 distinct prompt.*draws 8.*data\.prompts_per_rank"):
        RolloutDataModule(train_prompts=str(one), rewards={"sharpness": 1.0}, eval_prompts=None)
    RolloutDataModule(train_prompts=str(one), rewards={"sharpness": 1.0}, prompts_per_rank=1, groups_per_batch=1, eval_prompts=None)


def test_format_errors_name_the_key(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"data\.train_prompts: .*p\.jsonl:2: not valid JSON"):
        validate_prompt_file(path, key="data.train_prompts")
    with pytest.raises(FileNotFoundError, match=r"data\.train_prompts: .*missing\.jsonl"):
        validate_prompt_file(tmp_path / "missing.jsonl", key="data.train_prompts")


def test_world_vocabulary_is_read_from_the_checkpoint(tiny_world_path):
    assert world_vocabulary(tiny_world_path) == default_vocabulary()
    assert world_vocabulary(None) == default_vocabulary()


def test_setup_checks_the_vocabulary_before_loading_a_model(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "p.txt"
    path.write_text("a photo of a circle\na photo of a zebra\n")
    data = RolloutDataModule(train_prompts=str(path), rewards={"sharpness": 1.0}, prompts_per_rank=1, groups_per_batch=1, eval_prompts=None)
    module = SimpleNamespace(hparams={"backbone": "world", "model_path": None})
    data.trainer = SimpleNamespace(lightning_module=module, world_size=1)
    with pytest.raises(ConfigError, match=r"p\.txt:2: .*zebra"):
        data.setup("fit")
    good = tmp_path / "good.txt"
    good.write_text("a photo of a circle\na photo of a square\n")
    data = RolloutDataModule(train_prompts=str(good), rewards={"sharpness": 1.0}, prompts_per_rank=1, groups_per_batch=1, eval_prompts=None)
    data.trainer = SimpleNamespace(lightning_module=module, world_size=1)
    data.setup("fit")
    data.trainer = SimpleNamespace(lightning_module=module, world_size=4)  # 2 prompts < 1 per rank x 4 ranks
    with pytest.raises(ConfigError, match=r"2 distinct prompt.*draws 4.*on each of 4 ranks"):
        data.setup("fit")


@pytest.mark.parametrize("clause", [{"class": "circle", "count": -2}, {"class": "circle", "count": 1.5}, {"count": 1}])
@pytest.mark.parametrize("rewards", [["sharpness"], ["geneval"]])
def test_malformed_geneval_clauses_are_refused_whichever_reward_reads_them(tmp_path, clause, rewards):
    """A GenEval record is checked against GenEval's schema even when no GenEval reward is trained."""
    path = jsonl(tmp_path, [GOOD, {**GOOD, "include": [clause]}])
    with pytest.raises(ConfigError, match=r"k: .*p\.jsonl:2: .*include\[0\]"):
        validate_prompt_file(path, key="k", rewards=rewards, reward_options={"geneval": {"detector": {"kind": "x"}}})


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a photo of a circle\na photo of a \xff square\n")
    with pytest.raises(ConfigError, match=r"p\.txt:2: not UTF-8"):
        validate_prompt_file(path, key="k")


def test_reward_labels_with_a_kind_train_and_evaluate():
    import torch

    data = RolloutDataModule(
        rewards={"bright": 1.0, "bright_twice": 2.0},
        reward_options={"bright": {"kind": "test_brightness"}, "bright_twice": {"kind": "test_brightness"}},
        eval_rewards=["bright"], prompts_per_rank=1, eval_prompts=None,
    )
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(data.reward(images, ["a"] * 3), 3 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(ConfigError, match=r"data.rewards=\['mine'\] names unknown rewards.*needs data.reward_options.<label>.kind"):
        RolloutDataModule(rewards={"mine": 1.0}, prompts_per_rank=1, eval_prompts=None)
    with pytest.raises(ConfigError, match=r"data.eval_rewards=\['judge'\] names unknown rewards"):
        RolloutDataModule(eval_rewards=["judge"], reward_options={"judge": {"kind": "nope"}}, prompts_per_rank=1, eval_prompts=None)


def test_ocr_prompts_need_quoted_text(tmp_path):
    good = tmp_path / "ocr.txt"
    good.write_text('a sign that says "OPEN"\na poster reading “SALE”\n')
    assert len(validate_prompt_file(good, key="data.train_prompts", rewards=["ocr"]).records) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text('a sign that says "OPEN"\n\na sign that says hello\n')
    with pytest.raises(ConfigError, match=r"data.train_prompts: .*bad.txt:3: the OCR reward needs the text to render in double quotes"):
        validate_prompt_file(bad, key="data.train_prompts", rewards=["ocr"])
    validate_prompt_file(bad, key="data.train_prompts", rewards=["jpeg_incompressibility"])  # only the OCR reward asks
