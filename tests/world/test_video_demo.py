"""`make demo-video`: the video demo's config runs end to end through the demo on a tiny random
canvas-layout video world, and its before/after numbers are the run's own evaluation history."""

import csv
from pathlib import Path

import torch

from dgpo_lightning import demo
from dgpo_lightning.rewards.base import _REGISTRY, register
from dgpo_lightning.world.video.backbone import load_backbone, save_backbone, tiny_backbone

VIDEO_DEMO = Path(__file__).resolve().parents[2] / "experiments" / "base" / "world_video_demo.yaml"

if "test_video_brightness" not in _REGISTRY:

    @register("test_video_brightness")
    def _video_brightness(**_):
        """Mean pixel value of a video: spread even for an untrained model (tests only)."""
        return lambda videos, prompts, metadata=None: videos.mean(dim=(1, 2, 3, 4))


def test_video_demo_config_trains_and_reports_its_history(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = save_backbone(tiny_backbone(layout="canvas"), tmp_path / "tiny")
    out = tmp_path / "demo_video"
    result = demo.main([
        "--config", str(VIDEO_DEMO), "--minutes", "5", "--out", str(out), "--threads", "1",
        f"--model.model_path={model_dir}", "--model.lr=1e-3", "--trainer.max_steps=2", "--trainer.check_val_every_n_epoch=1",
        "--data.group_size=3", "--data.prompts_per_rank=2", "--data.groups_per_batch=2", "--data.passes_per_rollout=1",
        "--data.num_steps=2", "--data.eval_num_steps=2", "--data.eval_images_per_prompt=1", "--data.eval_min_images_per_task=1",
        "--data.rewards={test_video_brightness: 1.0}", "--data.eval_rewards=[world_video, world_video_partial, test_video_brightness]",
        "--trainer.enable_progress_bar=false", "--data.progress=false",
    ])
    rows = list(csv.DictReader((out / "eval_history.csv").open()))
    assert float(rows[0]["step"]) == 0 and float(rows[-1]["step"]) == 2
    # the headline is the graded score (starred in the printed table); the strict one is logged beside it
    assert result == {"before": float(rows[0]["eval/world_video_partial"]), "after": float(rows[-1]["eval/world_video_partial"])}
    printed = capsys.readouterr().out
    assert "world_video_partial/overall *" in printed and "world_video/overall *" not in printed and "world_video/overall " in printed
    assert 0.0 <= float(rows[-1]["eval/world_video"]) <= float(rows[-1]["eval/world_video_partial"]) <= 1.0
    assert float(rows[-1]["eval/test_video_brightness"]) != float(rows[0]["eval/test_video_brightness"])  # training moved it
    assert load_backbone(out / "final").layout == "canvas" and (out / "score_vs_time.png").is_file()
