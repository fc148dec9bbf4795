"""The benchmark protocol (``evaluate --protocol``): a table of models x columns on tiny stand-ins,
resume after an interruption, and columns skipped for missing inputs."""

import csv
import json

import pytest
import torch
import yaml

from dgpo_lightning import benchmark
from dgpo_lightning.evaluate import main as evaluate_main
from dgpo_lightning.evaluation import generate_images, score_images, summarize_scores
from dgpo_lightning.models.lora import add_lora, save_lora
from dgpo_lightning.rewards.base import build
from dgpo_lightning.sampling.seeds import evaluation_plan
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}], "prompt": "a photo of two squares"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a photo of a red triangle"},
]
PLAIN = ["a photo of a blue circle", "a photo of a green square"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_world_path):
    root = tmp_path_factory.mktemp("bench")
    (root / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    (root / "plain.txt").write_text("\n".join(PLAIN) + "\n")
    trained = load_backbone(tiny_world_path)
    add_lora(trained.denoiser, rank=2, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, param in trained.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    save_lora(trained, root / "adapter")
    protocol = {
        "seed": 3,
        "sampling": {"sampler": "ode_dpm", "num_steps": 2},
        "sections": {
            "geneval": {"prompts": str(root / "geneval.jsonl"), "images_per_prompt": 2, "columns": {"GenEval": {"reward": "geneval_partial"}}},
            "quality": {
                "group": "out-of-domain",
                "prompts": str(root / "plain.txt"),
                "images_per_prompt": 3,
                "columns": {
                    "JPEG": {"reward": "jpeg_incompressibility"},
                    "PickScore": {"reward": "pickscore", "options": {"model_path": str(root / "no_pickscore_weights")}},
                },
            },
            "missing": {"prompts": str(root / "no_such_prompts.txt"), "columns": {"OCR": {"reward": "ocr"}}},
        },
    }
    (root / "protocol.yaml").write_text(yaml.safe_dump(protocol, sort_keys=False))
    return {"root": root, "world": tiny_world_path}


def _args(setup, out, *extra):
    return [
        "--protocol", str(setup["root"] / "protocol.yaml"), "--model", str(setup["world"]),
        "--adapter", f"trained={setup['root'] / 'adapter'}", "--out", str(out), "--no-progress", "--batch-size", "4", *extra,
    ]


def _by_hand(setup, adapter, records, reward, images_per_prompt):
    from dgpo_lightning.models.lora import load_adapter
    from dgpo_lightning.evaluation import task_of

    backbone = load_backbone(setup["world"])
    if adapter:
        load_adapter(backbone, setup["root"] / "adapter")
    plan = evaluation_plan(records, 3, images_per_prompt)
    images = generate_images(backbone.eval(), [records[i]["prompt"] for i, _ in plan], [s for _, s in plan], SamplerSettings("ode_dpm", 2))
    scores = score_images({"r": build(reward)}, images, [records[i]["prompt"] for i, _ in plan], [records[i] for i, _ in plan])["r"]
    return summarize_scores(scores, [task_of(records[i]) for i, _ in plan])["overall"]


def test_the_table_holds_each_models_scores_and_says_what_was_skipped(setup, tmp_path, capsys):
    out = tmp_path / "out"
    results = evaluate_main(_args(setup, out))  # evaluate hands --protocol to the benchmark
    printed = capsys.readouterr()
    assert list(results["table"]) == ["base", "trained"]
    assert results["columns"] == ["geneval/GenEval", "missing/OCR", "quality/JPEG", "quality/PickScore"]
    plain = [{"prompt": p} for p in PLAIN]
    for row, adapter in (("base", False), ("trained", True)):
        assert results["table"][row]["geneval/GenEval"] == pytest.approx(_by_hand(setup, adapter, GENEVAL, "geneval_partial", 2), abs=1e-6)
        assert results["table"][row]["quality/JPEG"] == pytest.approx(_by_hand(setup, adapter, plain, "jpeg_incompressibility", 3), abs=1e-5)
    assert results["table"]["base"]["quality/JPEG"] != results["table"]["trained"]["quality/JPEG"]  # the adapter is applied
    assert results["details"]["base"]["geneval/GenEval"]["images"] == 6
    # Missing inputs: the prompt file and the PickScore weights, each skipped with what to provide.
    assert "--prompts missing=FILE" in results["skipped"]["missing/OCR"]
    assert "no_pickscore_weights" in results["skipped"]["quality/PickScore"]
    assert "skipped quality/PickScore" in printed.err
    table = (out / "table.md").read_text()
    header = table.splitlines()[0]
    assert header == "| model | GenEval | OCR | ‖ | JPEG | PickScore |"
    assert table.splitlines()[2].count("—") == 2  # two blank cells in the base row
    assert "missing/OCR skipped" in table and table in printed.out
    rows = list(csv.reader((out / "table.csv").open()))
    assert rows[0] == ["model", *results["columns"]] and float(rows[1][1]) == pytest.approx(results["table"]["base"]["geneval/GenEval"], abs=1e-6)
    assert (out / "grids" / "trained__geneval.png").is_file() and (out / "grids" / "base__quality.png").is_file()
    lines = (out / "cells" / "trained" / "quality.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) == {"record", "seed", "prompt", "tag", "JPEG"}


def test_an_interrupted_run_resumes_without_sampling_scored_images_again(setup, tmp_path, monkeypatch):
    protocol = benchmark.read_protocol(setup["root"] / "protocol.yaml")
    models = [
        benchmark.Model("base", "world", str(setup["world"]), {}),
        benchmark.Model("trained", "world", str(setup["world"]), {}, str(setup["root"] / "adapter")),
    ]
    calls = {"n": 0}

    def flaky(name, **options):
        reward = build(name, **options)
        if name != "jpeg_incompressibility":
            return reward

        def interrupted(images, prompts, metadata=None):
            calls["n"] += 1
            if calls["n"] == 4:  # 1: the probe before sampling; 2, 3: base's two batches
                raise KeyboardInterrupt  # stop in the middle of the second model's section
            return reward(images, prompts, metadata)

        return interrupted

    with pytest.raises(KeyboardInterrupt):
        benchmark.run_benchmark(protocol, models, tmp_path / "out", batch_size=4, progress=False, build_reward=flaky)
    sampled = []
    real = benchmark.generate_images
    monkeypatch.setattr(benchmark, "generate_images", lambda b, prompts, seeds, *a, **k: sampled.extend(seeds) or real(b, prompts, seeds, *a, **k))
    resumed = benchmark.run_benchmark(protocol, models, tmp_path / "out", batch_size=4, progress=False)
    # Done before the interruption: base (geneval 6 + quality 6 images) and trained's geneval 6; the
    # interrupted batch (4 quality images of `trained`) was never written, so 6 images are left.
    assert len(sampled) == 6
    monkeypatch.setattr(benchmark, "generate_images", real)
    fresh = benchmark.run_benchmark(protocol, models, tmp_path / "fresh", batch_size=3, progress=False)
    assert resumed["table"] == fresh["table"]  # same numbers as one uninterrupted run (other batching too)
    # Nothing left: a third run samples nothing.
    sampled.clear()
    monkeypatch.setattr(benchmark, "generate_images", lambda b, prompts, seeds, *a, **k: sampled.extend(seeds) or real(b, prompts, seeds, *a, **k))
    again = benchmark.run_benchmark(protocol, models, tmp_path / "out", batch_size=4, progress=False)
    assert sampled == [] and again["table"] == fresh["table"]


def test_other_settings_in_the_same_directory_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    evaluate_main(_args(setup, out, "--no-base"))
    changed = yaml.safe_load((setup["root"] / "protocol.yaml").read_text())
    changed["seed"] = 4
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--protocol", str(tmp_path / "other.yaml"), *_args(setup, out, "--no-base")[2:]])
    assert error.value.code == 2 and "seed differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["sections"]["geneval"].pop("columns"), "sections.geneval needs 'columns'"),
        (lambda p: p["sections"]["geneval"].update(images_per_prompt=0), "images_per_prompt must be an integer >= 1"),
        (lambda p: p["sampling"].update(sampler="nope"), "sampling: unknown sampler"),
        (lambda p: p["sections"]["quality"]["columns"]["JPEG"].pop("reward"), "columns.JPEG needs 'reward'"),
    ],
)
def test_bad_protocols_are_named(setup, tmp_path, capsys, edit, message):
    protocol = yaml.safe_load((setup["root"] / "protocol.yaml").read_text())
    edit(protocol)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(protocol))
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--protocol", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and message in err and "bad.yaml" in err


def test_the_paper_protocol_parses_and_lays_out_the_papers_columns():
    protocol = benchmark.read_protocol(benchmark.PAPER_PROTOCOL)
    names = [column.name for _, column in protocol.columns()]
    assert names == ["GenEval", "OCR", "PickScore", "Aesthetic", "DeQA", "ImageReward", "PickScore", "UnifiedReward"]
    assert [s.images_per_prompt for s in protocol.sections][0] == 4


def test_the_protocol_on_the_tiny_sd3_with_a_tiny_reward_model(tmp_path):
    """The same command on a diffusers backbone: a tiny SD3 saved to disk, a tiny CLIP as PickScore."""
    from dgpo_lightning.models.testing import build_tiny_sd3, save_tiny_clip

    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "sd3")
    clip = save_tiny_clip(tmp_path / "pickscore")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na photo of two blue cars\n")
    protocol = {
        "seed": 0,
        "sampling": {"sampler": "ode_dpm", "num_steps": 2, "guidance_scale": 4.5},
        "sections": {
            "pickscore": {"prompts": str(tmp_path / "prompts.txt"), "images_per_prompt": 2, "columns": {
                "PickScore": {"reward": "pickscore", "options": {"model_path": str(clip), "processor_path": str(clip)}},
            }},
        },
    }
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    results = benchmark.main([
        "--protocol", str(tmp_path / "protocol.yaml"), "--backbone", "sd3", "--model", str(tmp_path / "sd3"),
        "--backbone-options", '{"resolution": 32}', "--out", str(tmp_path / "out"), "--no-progress",
    ])
    from dgpo_lightning.models.sd3 import SD3Backbone

    backbone = SD3Backbone.from_pretrained(tmp_path / "sd3", resolution=32)
    records = [{"prompt": p} for p in ("a photo of a cat", "a photo of two blue cars")]
    plan = evaluation_plan(records, 0, 2)
    settings = SamplerSettings("ode_dpm", 2, guidance_scale=4.5)
    images = generate_images(backbone, [records[i]["prompt"] for i, _ in plan], [s for _, s in plan], settings)
    reward = build("pickscore", model_path=str(clip), processor_path=str(clip))
    expected = reward(images, [records[i]["prompt"] for i, _ in plan]).mean().item()
    assert results["table"]["base"]["pickscore/PickScore"] == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "out" / "table.md").read_text().startswith("| model | PickScore |")
