"""``python -m dgpo_lightning.evaluate``: the world's GenEval result (shipped base, non-trivial
numbers, checked against the pipeline called directly), any backbone (a tiny SD3 pipeline on disk,
with and without a LoRA adapter exported by training) with a CLIP-family reward on plain-text
prompts, and user errors as one ``error:`` line with exit status 2."""

import json

import pytest
import torch

from dgpo_lightning.data.prompts import load_prompt_records
from dgpo_lightning.evaluate import main
from dgpo_lightning.evaluation import evaluate
from dgpo_lightning.rewards.base import build
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone
from dgpo_lightning.world.scene import TAGS
from helpers import one_record_per_task

TEST_RECORDS = load_prompt_records("world:test")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _user_error(capsys, argv):
    """Run the CLI expecting a user error: exit status 2 and one ``error: ...`` line."""
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1, message
    return message


# --------------------------------------------------------------------------- the world


def test_world_cli_on_the_shipped_base_matches_the_pipeline(tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", one_record_per_task())
    out = tmp_path / "result" / "r.json"
    main(["--prompts", str(prompts), "--images-per-prompt", "1", "--min-images-per-task", "6", "--seed", "3",
          "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert set(result) == {"overall", *TAGS, "rewards", "run", "per_image"}
    assert 0.0 < result["overall"] < 1.0 and len({result[t] for t in TAGS}) > 2  # not all zero, not all equal
    assert result["overall"] == pytest.approx(sum(result[t] for t in TAGS) / len(TAGS))
    assert result["rewards"]["geneval"] == {k: result[k] for k in ["overall", *TAGS]}
    assert result["run"]["images"] == len(result["per_image"]) == 36 and result["run"]["guidance_scale"] == 1.0
    printed = capsys.readouterr().out
    assert "at least 6 per task" in printed and "color_attr" in printed and "overall" in printed
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    direct = evaluate(load_backbone(), one_record_per_task(), {"geneval": build("geneval")}, images_per_prompt=1,
                      min_images_per_task=6, seed=3)
    assert result["rewards"]["geneval"] == direct.summary["geneval"]
    assert [row["geneval"] for row in result["per_image"]] == direct.scores["geneval"].tolist()
    for tag in TAGS:  # the per-task scores are the means of the per-image verdicts
        rows = [row["geneval"] for row in result["per_image"] if row["tag"] == tag]
        assert len(rows) == 6 and result[tag] == sum(rows) / 6


def test_only_the_tasks_present_are_reported(tmp_path, tiny_world_path):
    records = [r for r in TEST_RECORDS if r["tag"] in ("counting", "position")][:3]
    out = tmp_path / "r.json"
    main(["--prompts", str(_write(tmp_path / "p.jsonl", records)), "--model", str(tiny_world_path),
          "--images-per-prompt", "1", "--num-steps", "2", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert set(result["rewards"]["geneval"]) == {"overall"} | {r["tag"] for r in records}


def test_plain_prompts_on_the_world_with_another_reward(tmp_path, tiny_world_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a red circle\na photo of two squares\n")
    out = tmp_path / "r.json"
    main(["--prompts", str(prompts), "--model", str(tiny_world_path), "--reward", "test_brightness",
          "--images-per-prompt", "2", "--num-steps", "2", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    scores = [row["test_brightness"] for row in result["per_image"]]
    assert len(set(scores)) == 4 and result["overall"] == pytest.approx(sum(scores) / 4)
    assert set(result["rewards"]["test_brightness"]) == {"overall"}  # plain prompts: no tasks


def test_shipped_base_knows_shapes_and_colours_but_draws_them_unreliably():
    """Real behaviour of the shipped model (noisy-caption pretraining, MODEL_CARD.md): sampled
    without guidance it is often wrong; with CFG 2 the same model is right far more often."""
    records = [r for r in TEST_RECORDS if r["tag"] in ("single_object", "colors")]
    backbone = load_backbone()
    rewards = {"geneval": build("geneval")}
    plain = evaluate(backbone, records, rewards, images_per_prompt=4, seed=0).summary["geneval"]
    guided = evaluate(backbone, records, rewards, SamplerSettings(guidance_scale=2.0), images_per_prompt=4, seed=0)
    assert plain["overall"] <= 0.6
    assert guided.summary["geneval"]["overall"] >= plain["overall"] + 0.15


@pytest.mark.parametrize(
    "clause, name",
    [({"class": "hexagon", "count": 1}, "hexagon"), ({"class": "circle", "count": 1, "color": "orange"}, "orange")],
)
def test_unknown_class_or_colour_is_rejected_by_name(tmp_path, clause, name, capsys):
    record = {"tag": "single_object", "include": [clause], "prompt": f"a photo of a {name}"}
    prompts = _write(tmp_path / "bad.jsonl", [TEST_RECORDS[0], record])
    message = _user_error(capsys, ["--prompts", str(prompts), "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert name in message and "--prompts: " in message and "bad.jsonl:2: " in message  # key, file and line
    assert not (tmp_path / "r.json").exists()


def test_user_errors_are_one_line_with_status_2(tmp_path, tiny_world_path, capsys):
    out = str(tmp_path / "r.json")
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\na blue square\n")
    unknown_words = tmp_path / "cube.txt"
    unknown_words.write_text("a red cube\n")
    message = _user_error(capsys, ["--prompts", str(plain), "--out", out])  # geneval needs clauses
    assert "'geneval' needs GenEval metadata" in message and "plain.txt" in message
    assert "not valid JSON" not in message
    good = str(_write(tmp_path / "p.jsonl", one_record_per_task()[:1]))
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--prompts", good, "--reward", "no_such_reward"], "unknown reward 'no_such_reward'"),
        (["--prompts", good, "--adapter", str(tmp_path / "no_adapter")], "no_adapter does not exist"),
        (["--prompts", good, "--adapter", str(tmp_path)], "no LoRA adapter in"),
        (["--prompts", good, "--model", str(tmp_path)], "not a world backbone checkpoint"),
        (["--prompts", good, "--backbone", "nope", "--model", "x", "--reward", "test_brightness"], "unknown backbone 'nope'"),
        (["--prompts", good, "--backbone", "sd3"], "--backbone sd3 needs --model PATH"),
        (["--prompts", good, "--backbone", "sd3", "--model", str(tmp_path)], "--reward NAME"),
        (["--prompts", good, "--backbone", "sd3", "--model", str(tmp_path), "--reward", "test_brightness"],
         "model_index.json is missing"),
        (["--prompts", good, "--reward-options", "{bad"], "--reward-options: not valid JSON"),
        (["--prompts", good, "--reward-options", '{"clip_score": {}}'], "no --reward asks for"),
        (["--prompts", str(plain), "--reward", "clip_score"], "clip_score: pass model_path"),
        (["--prompts", good, "--model", str(tiny_world_path), "--num-steps", "0"], "num_steps"),
        (["--prompts", str(unknown_words), "--reward", "test_brightness"], "cube.txt:1: prompt 'a red cube'"),  # [unk] words
    ]
    for argv, expected in cases:
        assert expected in _user_error(capsys, [*argv, "--out", out, "--no-progress"]), argv
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------- SD3 with a CLIP reward


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """A tiny SD3 pipeline on disk, a tiny CLIP, plain-text prompts and a LoRA adapter written by
    the training export (two DGPO steps, then ``export_model`` as ``ExportTrained`` does)."""
    import lightning as L

    from dgpo_lightning.callbacks.export import export_model
    from dgpo_lightning.data.datamodule import RolloutDataModule
    from dgpo_lightning.models.testing import build_tiny_sd3, save_tiny_clip
    from dgpo_lightning.module import DGPOModule

    root = tmp_path_factory.mktemp("sd3_eval")
    build_tiny_sd3(seed=0).save_pretrained(root / "sd3")
    clip = save_tiny_clip(root / "clip", seed=0, image_size=32)
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\na photo of a cat\n")
    torch.manual_seed(0)
    module = DGPOModule(backbone="sd3", model_path=str(root / "sd3"), backbone_options={"resolution": 32},
                        finetune="lora", lora_rank=4, lr=3e-2, t_min=0.5)
    data = RolloutDataModule(train_prompts=str(prompts), group_size=2, prompts_per_rank=2, num_steps=2,
                             rewards={"jpeg_incompressibility": 1.0}, eval_prompts=None, progress=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    export_model(module, root / "final")
    assert (root / "final" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    return {"model": root / "sd3", "clip": clip, "prompts": prompts, "adapter": root / "final" / "adapter", "root": root}


def _sd3_argv(run, out, *extra):
    return ["--backbone", "sd3", "--model", str(run["model"]), "--backbone-options", '{"resolution": 32}',
            "--prompts", str(run["prompts"]), "--reward", "pickscore",
            "--reward-options", json.dumps({"pickscore": {"model_path": str(run["clip"])}}),
            "--num-steps", "2", "--images-per-prompt", "2", "--seed", "7", "--batch-size", "4",
            "--out", str(out), "--no-progress", *extra]


def _recompute(run, adapter=None):
    """PickScore of images sampled with ``sample_latents`` from the planned seeds, scored directly."""
    from dgpo_lightning.data.rollout import sample_latents
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.models.sd3 import SD3Backbone
    from dgpo_lightning.sampling.seeds import member_seeds

    backbone = SD3Backbone.from_pretrained(run["model"], resolution=32)
    if adapter is not None:
        load_adapter(backbone, adapter)
    prompts = [p for p in run["prompts"].read_text().splitlines() for _ in range(2)]
    seeds = member_seeds(7, range(3), 2)
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings(num_steps=2)).sample)
    return build("pickscore", model_path=str(run["clip"]))(images, prompts)


def test_sd3_cli_with_clip_reward_with_and_without_the_trained_adapter(sd3_run, tmp_path, capsys):
    main(_sd3_argv(sd3_run, tmp_path / "base.json"))
    main(_sd3_argv(sd3_run, tmp_path / "again.json"))
    main(_sd3_argv(sd3_run, tmp_path / "tuned.json", "--adapter", str(sd3_run["adapter"])))
    assert "+ adapter" in capsys.readouterr().out
    base, again, tuned = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "again", "tuned"))
    scores = {name: [row["pickscore"] for row in r["per_image"]] for name, r in (("base", base), ("tuned", tuned))}
    assert len(scores["base"]) == 6 and len(set(scores["base"])) == 6 and any(s != 0 for s in scores["base"])
    assert base["overall"] == pytest.approx(sum(scores["base"]) / 6)
    assert again["per_image"] == base["per_image"] and again["overall"] == base["overall"]  # reruns are identical
    assert all(a != b for a, b in zip(scores["base"], scores["tuned"]))  # the adapter changes every image
    assert (tmp_path / "tuned.png").is_file() and tuned["run"]["adapter"] == str(sd3_run["adapter"])
    # The numbers are those of the reward applied by hand to independently sampled images.
    torch.testing.assert_close(torch.tensor(scores["base"]), _recompute(sd3_run), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(scores["tuned"]), _recompute(sd3_run, sd3_run["adapter"]), rtol=1e-5, atol=1e-5)


def test_sd3_adapter_on_the_world_is_a_user_error(sd3_run, tmp_path, capsys):
    good = str(_write(tmp_path / "p.jsonl", one_record_per_task()[:1]))
    message = _user_error(capsys, ["--prompts", good, "--adapter", str(sd3_run["adapter"]),
                                   "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert "holds a diffusers LoRA" in message


def test_tiny_world_batching_does_not_change_the_cli_numbers(tmp_path, tiny_world_path):
    records = one_record_per_task()[:3]
    prompts = str(_write(tmp_path / "p.jsonl", records))
    common = ["--prompts", prompts, "--model", str(tiny_world_path), "--reward", "test_brightness",
              "--images-per-prompt", "2", "--num-steps", "2", "--no-progress"]
    main([*common, "--batch-size", "64", "--out", str(tmp_path / "a.json")])
    main([*common, "--batch-size", "1", "--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert [r["test_brightness"] for r in a["per_image"]] == pytest.approx([r["test_brightness"] for r in b["per_image"]], abs=1e-6)


def test_a_reward_suite_labels_one_reward_kind_twice(tmp_path):
    """A suite file (``data.eval_rewards`` + ``data.reward_options``) with labels of one reward kind,
    as the out-of-domain suite's two VLM judges: each label scores as its kind does."""
    prompts = _write(tmp_path / "p.jsonl", one_record_per_task())
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "data:\n  eval_rewards: [strict, lenient]\n"
        "  reward_options:\n    strict: {kind: geneval}\n    lenient: {kind: geneval_partial}\n"
    )
    common = ["--prompts", str(prompts), "--images-per-prompt", "2", "--seed", "5", "--no-progress"]
    main([*common, "--reward-suite", str(suite), "--out", str(tmp_path / "suite.json")])
    main([*common, "--reward", "geneval", "--reward", "geneval_partial", "--out", str(tmp_path / "named.json")])
    suite_result = json.loads((tmp_path / "suite.json").read_text())
    named = json.loads((tmp_path / "named.json").read_text())
    assert suite_result["rewards"]["strict"] == named["rewards"]["geneval"]
    assert suite_result["rewards"]["lenient"] == named["rewards"]["geneval_partial"]
    assert suite_result["rewards"]["strict"] != suite_result["rewards"]["lenient"]  # partial credit differs


def test_reward_suite_errors_name_the_file(tmp_path, capsys):
    good = str(_write(tmp_path / "p.jsonl", one_record_per_task()[:1]))
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\n")
    no_list = tmp_path / "no_list.yaml"
    no_list.write_text("data:\n  reward_options: {}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data:\n  eval_rewards: [judge]\n  reward_options:\n    judge: {kind: no_such_kind}\n")
    labelled = tmp_path / "labelled.yaml"  # a label of a GenEval kind still needs GenEval metadata
    labelled.write_text("data:\n  eval_rewards: [strict]\n  reward_options:\n    strict: {kind: geneval}\n")
    cases = [
        (["--prompts", good, "--reward-suite", str(tmp_path / "none.yaml")], "--reward-suite: cannot read"),
        (["--prompts", good, "--reward-suite", str(no_list)], "no_list.yaml needs data.eval_rewards"),
        (["--prompts", good, "--reward-suite", str(unknown)], "(kind 'no_such_kind')"),
        (["--prompts", str(plain), "--reward-suite", str(labelled)], "reward 'strict' needs GenEval metadata"),
    ]
    for argv, expected in cases:
        assert expected in _user_error(capsys, [*argv, "--out", str(tmp_path / "r.json"), "--no-progress"]), argv


def test_the_out_of_domain_suite_names_registered_rewards_and_builds_lazily():
    """experiments/eval/ood.yaml: the paper's five out-of-domain metrics, each label of a registered
    kind whose options its factory accepts (nothing is loaded or contacted until the first call)."""
    from pathlib import Path

    from dgpo_lightning.evaluate import _reward_suite
    from dgpo_lightning.rewards.base import reward_kind

    names, options = _reward_suite(str(Path(__file__).parents[1] / "experiments" / "eval" / "ood.yaml"))
    assert names == ["aesthetic", "deqa", "imagereward", "pickscore", "unified_reward"]
    assert {reward_kind(n, options.get(n)) for n in names} == {"aesthetic", "vlm_judge", "imagereward", "pickscore"}
    for name in names:
        assert callable(build(name, **dict(options[name])))
