"""Held-out samples with their prompts and scores, one row per task, in TensorBoard and as a PNG
(videos: a strip of frames per sample, plus an animated GIF / MP4 per example)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from dgpo_lightning.evaluation import is_video, save_example_videos, task_grid


def can_log_video() -> bool:
    """TensorBoard's ``add_video`` encodes with moviepy; it is used only when moviepy is importable."""
    return importlib.util.find_spec("moviepy") is not None


class SampleGrid(L.Callback):
    """After each evaluation, draw the held-out examples: one row per task, ``per_task`` images each,
    titled by prompt and score (:func:`~dgpo_lightning.evaluation.task_grid`).

    Reads ``pl_module.last_eval_examples = {"images": [K, 3, H, W], "prompts": [K], "scores":
    {name: [K]}, "tags": [K]}`` (``"tags"`` optional: without it the examples fill one row). Written
    to TensorBoard (``eval/samples``) and to ``<log_dir>/samples/step_<N>.png``.

    Videos (``"images": [K, F, 3, H, W]``): the grid shows a strip of ``max_frames`` frames per
    sample (the same ``eval/samples`` figure); each example is also written to
    ``<log_dir>/samples/step_<N>_videos/`` as a GIF (and an MP4 with PyAV / imageio-ffmpeg), and
    logged as ``eval/videos`` with TensorBoard's ``add_video`` when moviepy is installed.
    """

    def __init__(self, per_task: int = 4, max_rows: int = 12, max_frames: int = 8, fps: int = 8):
        self.per_task, self.max_rows = per_task, max_rows
        self.max_frames, self.fps = max_frames, fps

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "last_eval_examples", None)
        if not examples or trainer.sanity_checking:
            return
        figure = task_grid(examples, per_task=self.per_task, max_rows=self.max_rows, max_frames=self.max_frames)
        video = is_video(examples["images"])
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("eval/samples", figure, global_step=trainer.global_step, close=False)
            if video and hasattr(experiment, "add_video") and can_log_video():
                experiment.add_video("eval/videos", examples["images"].float().clamp(0, 1),
                                     global_step=trainer.global_step, fps=self.fps)
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(directory / f"step_{trainer.global_step:06d}.png", dpi=100)
        if video:
            save_example_videos(examples, directory / f"step_{trainer.global_step:06d}_videos", fps=self.fps)


def sample_figure(examples: Mapping[str, Any], max_images: int = 16, columns: int = 8):
    """The grid of the first ``max_images`` examples, ``columns`` per task row (one row without
    tags), as a pyplot figure (shown by notebooks; close it with ``plt.close``)."""
    head = {
        "images": examples["images"][:max_images],
        "prompts": list(examples["prompts"])[:max_images],
        "scores": {name: values[:max_images] for name, values in (examples.get("scores") or {}).items()},
    }
    if examples.get("tags") is not None:
        head["tags"] = list(examples["tags"])[:max_images]
    return task_grid(head, per_task=columns, pyplot=True)
