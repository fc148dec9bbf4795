"""The evaluation pipeline (dgpo_lightning/evaluation.py): aggregates, the torchmetrics accumulator,
reward errors, grid examples and the one-row-per-task grid, and ``evaluate`` on the shipped world
base against an independent recomputation."""

import json
import subprocess
import sys

import pytest
import torch

from dgpo_lightning.callbacks.images import sample_figure
from dgpo_lightning.data.rollout import sample_latents
from dgpo_lightning.evaluation import (
    HeldOutMetrics,
    TaskExamples,
    evaluate,
    evaluation_plan,
    generate_images,
    save_grid,
    score_images,
    summarize_scores,
    task_grid,
)
from dgpo_lightning.rewards.base import build
from dgpo_lightning.sampling.seeds import member_seeds
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone, tiny_backbone
from dgpo_lightning.world.scene import TAGS
from helpers import one_record_per_task



def _brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------- aggregates


def test_summary_overall_is_the_unweighted_mean_of_tasks():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    tags = ["a", "a", "a", "a", "b", ""]  # "" (no task) counts towards no task
    summary = summarize_scores(scores, tags)
    assert summary == {"overall": (0.25 + 1.0) / 2, "a": 0.25, "b": 1.0}
    assert list(summary) == ["overall", "a", "b"]
    assert summarize_scores(scores, [""] * 6) == {"overall": pytest.approx(2.5 / 6)}  # no tasks: plain mean
    with pytest.raises(ValueError, match="6 scores but 2 tags"):
        summarize_scores(scores, ["a", "b"])


def test_held_out_metrics_accumulate_batches_like_the_summary():
    g = torch.Generator().manual_seed(0)
    tags = ["single_object", "counting", "counting", "position", "elsewhere"] * 4
    scores = {"geneval": (torch.rand(20, generator=g) > 0.5).float(), "clip": torch.randn(20, generator=g)}
    metrics = HeldOutMetrics(["geneval", "clip"], ["single_object", "counting", "position", "colors", ""])
    assert metrics.tags == ["single_object", "counting", "position", "colors"]
    for start in range(0, 20, 7):  # uneven batches
        metrics.update({k: v[start : start + 7] for k, v in scores.items()}, tags[start : start + 7])
    result = metrics.compute()
    for name, values in scores.items():
        # The unknown task "elsewhere" counts only towards nothing per task; "colors" was never seen.
        known = [t if t != "elsewhere" else "" for t in tags]
        expected = summarize_scores(values, known)
        assert result[f"eval/{name}"] == pytest.approx(expected["overall"], abs=1e-6)
        for tag in ("single_object", "counting", "position"):
            assert result[f"eval/{name}/{tag}"] == pytest.approx(expected[tag], abs=1e-6)
        assert f"eval/{name}/colors" not in result
    assert metrics.compute() == {}  # compute reset the metrics
    # No tasks at all: overall is the plain mean.
    plain = HeldOutMetrics(["clip"], [])
    plain.update({"clip": scores["clip"]}, [""] * 20)
    assert plain.compute() == {"eval/clip": pytest.approx(scores["clip"].mean().item(), abs=1e-6)}
    with pytest.raises(KeyError, match="geneval"):
        metrics.update({"clip": scores["clip"]}, tags)


def test_held_out_metrics_follow_the_module_device_and_do_not_persist():
    metrics = HeldOutMetrics(["r"], ["t"])
    assert not metrics.state_dict()  # metric states are not checkpointed
    metrics.to(torch.float64)  # moving the module moves the metrics; updates still work
    metrics.update({"r": torch.tensor([1.0, 3.0])}, ["t", "t"])
    assert metrics.compute() == {"eval/r": 2.0, "eval/r/t": 2.0}


def test_score_images_names_the_failing_reward():
    images = torch.rand(3, 3, 8, 8)
    prompts = ["a", "b", "c"]
    scores = score_images({"bright": _brightness}, images, prompts, None, batch_size=2)
    torch.testing.assert_close(scores["bright"], images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="'short'.*shape"):
        score_images({"short": lambda i, p, m=None: i.mean(dim=(1, 2, 3))[:1]}, images, prompts)
    with pytest.raises(ValueError, match="'nan'.*non-finite"):
        score_images({"nan": lambda i, p, m=None: torch.full((i.shape[0],), float("nan"))}, images, prompts)
    with pytest.raises(ValueError, match="reward 'geneval'.*metadata"):
        score_images({"geneval": build("geneval")}, images, prompts, [{"prompt": p} for p in prompts])


# --------------------------------------------------------------------------- grid


def test_task_examples_prefer_distinct_prompts_per_task():
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 2, 2) / 8
    prompts = ["p1", "p1", "p1", "p2", "q1", "q1", "q2", "q3"]
    tags = ["a", "a", "a", "a", "b", "b", "b", "b"]
    examples = TaskExamples(per_task=3)
    examples.add(images[:5], prompts[:5], tags[:5], {"r": torch.arange(5.0)})
    examples.add(images[5:], prompts[5:], tags[5:], {"r": torch.arange(5.0, 8.0)})
    out = examples.result()
    assert out["prompts"] == ["p1", "p2", "p1", "q1", "q2", "q3"]  # distinct first, then repeats
    assert out["tags"] == ["a", "a", "a", "b", "b", "b"]
    assert out["scores"]["r"].tolist() == [0.0, 3.0, 1.0, 4.0, 6.0, 7.0]
    assert out["images"].shape == (6, 3, 2, 2)
    assert TaskExamples().result() is None


def _rows(figure):
    """Row labels of a grid figure and the number of distinct subplot rows with an image."""
    image_axes = [axis for axis in figure.axes if axis.images]
    rows = {axis.get_subplotspec().rowspan.start for axis in image_axes}
    labels = [axis.get_ylabel() for axis in figure.axes if axis.get_ylabel()]
    return labels, len(rows)


def test_grid_has_one_row_per_task_and_one_row_without_tags(tmp_path):
    n = 14
    examples = {
        "images": torch.rand(n, 3, 8, 8),
        "prompts": [f"a photo of thing {i}" for i in range(n)],
        "tags": ["single_object"] * 5 + ["counting"] * 2 + ["position"] * 7,
        "scores": {"geneval": torch.rand(n)},
    }
    figure = task_grid(examples, per_task=4)
    labels, rows = _rows(figure)
    assert labels == ["single_object", "counting", "position"] and rows == 3
    assert sum(bool(axis.images) for axis in figure.axes) == 4 + 2 + 4
    titles = [axis.get_title() for axis in figure.axes if axis.images]
    assert titles[0] == f"thing 0\ngeneval={examples['scores']['geneval'][0]:.2f}"

    untagged = {k: v for k, v in examples.items() if k != "tags"}
    labels, rows = _rows(task_grid(untagged, per_task=6))
    assert rows == 1 and sum(bool(a.images) for a in task_grid(untagged, per_task=6).axes) == 6
    # The notebooks' helper: the same grid, tags or not, as pyplot figures.
    import matplotlib.pyplot as plt

    for data, rows in ((examples, 3), (untagged, 1)):
        figure = sample_figure(data, max_images=14, columns=3)
        assert _rows(figure)[1] == rows and plt.fignum_exists(figure.number)
        plt.close(figure)
    path = save_grid(examples, tmp_path / "grid" / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_grid_callback_draws_task_rows(tmp_path):
    from types import SimpleNamespace

    from dgpo_lightning.callbacks.images import SampleGrid

    examples = {
        "images": torch.rand(4, 3, 8, 8),
        "prompts": ["a", "b", "c", "d"],
        "tags": ["x", "x", "y", "y"],
        "scores": {"r": torch.rand(4)},
    }
    written = {}

    class Experiment:
        def add_figure(self, tag, figure, global_step, close):
            written[tag] = _rows(figure)

    trainer = SimpleNamespace(
        sanity_checking=False, loggers=[SimpleNamespace(experiment=Experiment())], global_step=7,
        log_dir=str(tmp_path), default_root_dir=str(tmp_path),
    )
    SampleGrid(per_task=2).on_validation_end(trainer, SimpleNamespace(last_eval_examples=examples))
    assert written["eval/samples"] == (["x", "y"], 2)
    assert (tmp_path / "samples" / "step_000007.png").is_file()


# --------------------------------------------------------------------------- the pipeline


def test_evaluate_matches_an_independent_recomputation_on_the_shipped_base():
    """Non-trivial numbers (the shipped base scores between 0 and 1) equal GenEval applied by hand
    to images sampled with ``sample_latents`` from the planned seeds."""
    backbone = load_backbone()
    records = one_record_per_task()
    result = evaluate(
        backbone, records, {"geneval": build("geneval")}, images_per_prompt=1, min_images_per_task=6, seed=3, batch_size=16
    )
    summary = result.summary["geneval"]
    assert 0.0 < summary["overall"] < 1.0 and len(set(summary.values())) > 2
    assert list(summary) == ["overall", *TAGS]
    assert result.tags == [tag for tag in TAGS for _ in range(6)] and len(result.seeds) == 36

    seeds = member_seeds(3, range(len(records)), 6)
    assert result.seeds == seeds == [s for _, s in evaluation_plan(records, 3, 1, 6)]
    chosen = [r for r in records for _ in range(6)]
    prompts = [r["prompt"] for r in chosen]
    images = backbone.decode(sample_latents(backbone, prompts, seeds, SamplerSettings()).sample)
    direct = build("geneval")(images, prompts, chosen)
    torch.testing.assert_close(result.scores["geneval"], direct)
    for i, tag in enumerate(TAGS):
        assert summary[tag] == sum(direct[6 * i : 6 * (i + 1)].tolist()) / 6
    assert summary["overall"] == pytest.approx(sum(summary[t] for t in TAGS) / len(TAGS))
    # The grid examples: distinct prompts first, one row per task.
    assert result.examples["tags"] == [tag for tag in TAGS for _ in range(4)]


def test_evaluate_does_not_depend_on_batching_and_moves_with_the_seed():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    records = one_record_per_task()[:3]
    rewards = {"bright": _brightness}
    settings = SamplerSettings(num_steps=3)
    a = evaluate(backbone, records, rewards, settings, images_per_prompt=2, seed=5, batch_size=64)
    b = evaluate(backbone, records, rewards, settings, images_per_prompt=2, seed=5, batch_size=1)
    c = evaluate(backbone, records, rewards, settings, images_per_prompt=2, seed=6, batch_size=64)
    assert len(set(a.scores["bright"].tolist())) == 6  # spread: every image differs
    torch.testing.assert_close(a.scores["bright"], b.scores["bright"], atol=1e-6, rtol=0)
    assert a.summary["bright"] == pytest.approx(b.summary["bright"], abs=1e-6)
    assert not torch.allclose(a.scores["bright"], c.scores["bright"])
    direct = generate_images(backbone, a.prompts, a.seeds, settings)
    torch.testing.assert_close(a.scores["bright"], direct.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)


def test_evaluation_module_imports_no_lightning():
    code = "import json, sys, dgpo_lightning.evaluation; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    leaked = sorted(m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"))
    assert not leaked, leaked[:10]
