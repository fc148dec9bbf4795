"""Held-out evaluation: plan → sample → decode → score → aggregate → grid.

One pipeline for ``python -m dgpo_lightning.evaluate``, Lightning's validation/test loops
(``DGPOModule``) and the world's pretraining, so all three report the same numbers for the same
plan. Plain torch, torchmetrics (:class:`HeldOutMetrics`) and matplotlib (the grid); no Lightning.

Conventions: an image's *task* is its prompt record's GenEval ``tag`` (``""`` when it has none);
a reward's ``overall`` is the unweighted mean of its task scores when the images have tasks
(GenEval's rule, so a task with many prompts does not dominate) and the plain mean otherwise.

Videos (a video backbone's ``decode`` returns ``[B, F, 3, H, W]``) go through the same pipeline: the
rewards score the videos, the grid shows a strip of frames per sample (:func:`frame_strip`) and
:func:`save_grid` also writes each example as an animated GIF (PIL) and, when PyAV or imageio-ffmpeg
is installed, as an MP4 (:func:`save_example_videos`; otherwise the MP4s are skipped with a note).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgpo_lightning.rewards.base import Reward, check_scores
from dgpo_lightning.sampling.seeds import evaluation_plan  # noqa: F401 (part of the pipeline's API)
from dgpo_lightning.sampling.settings import SamplerSettings

#: Key of a reward's headline number in summaries.
OVERALL = "overall"


def task_of(record: Mapping[str, Any]) -> str:
    """The task of a prompt record: its GenEval ``tag``, ``""`` for a plain prompt."""
    return str(record.get("tag", ""))


# --------------------------------------------------------------------------- sample and score


@torch.no_grad()
def generate_images(
    backbone: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings = SamplerSettings(),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """One image per ``(prompt, seed)``: ``[N, 3, H, W]`` in ``[0, 1]`` on the backbone's device.

    Noise is seeded per image, so the images do not depend on ``batch_size`` (which also bounds
    how many latents are decoded at once). Unresolved ``settings`` take the backbone's defaults.
    """
    from dgpo_lightning.data.rollout import sample_latents

    latents = sample_latents(
        backbone, list(prompts), list(seeds), settings, batch_size=batch_size, progress=progress, description="evaluate"
    ).sample
    return torch.cat([backbone.decode(latents[start : start + batch_size]) for start in range(0, latents.shape[0], batch_size)])


def score_images(
    rewards: Mapping[str, Reward],
    images: Tensor,
    prompts: Sequence[str],
    records: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Each reward's scores ``[N]`` (CPU float32) of ``images [N, 3, H, W]`` in ``[0, 1]``.

    ``records`` (the prompt records, e.g. GenEval metadata) go to the rewards as their
    ``metadata``; ``batch_size`` images per reward call (default: all). Errors name the reward:
    a wrong shape or a non-finite score (:func:`~dgpo_lightning.rewards.base.check_scores`), or a
    ``ValueError`` the reward raised itself (e.g. GenEval without metadata).
    """
    count = images.shape[0]
    if len(prompts) != count or (records is not None and len(records) != count):
        raise ValueError(f"{count} images but {len(prompts)} prompts and {len(records or [])} records")
    size = batch_size or max(count, 1)
    out = {}
    for name, reward in rewards.items():
        parts = []
        for start in range(0, count, size):
            chunk = slice(start, start + size)
            metadata = list(records[chunk]) if records is not None else None
            try:
                scores = reward(images[chunk], list(prompts[chunk]), metadata)
            except ValueError as error:
                if repr(name) in str(error):
                    raise
                raise ValueError(f"reward {name!r}: {error}") from error
            parts.append(check_scores(name, scores, images[chunk].shape[0]))
        out[name] = torch.cat(parts) if parts else torch.zeros(0)
    return out


def summarize_scores(scores: Tensor | Sequence[float], tags: Sequence[str]) -> dict[str, float]:
    """``{"overall": ..., <task>: mean score}`` of one reward over images with tasks ``tags``.

    Tasks appear in order of first appearance; ``""`` (no task) is not a task. ``overall`` is the
    unweighted mean of the task scores, or the plain mean when no image has a task. Sums run in
    Python floats (float64), so 0/1 GenEval verdicts give exact fractions.
    """
    values = [float(v) for v in (scores.tolist() if isinstance(scores, Tensor) else scores)]
    if len(values) != len(tags):
        raise ValueError(f"{len(values)} scores but {len(tags)} tags")
    if not values:
        raise ValueError("nothing to summarize: no images")
    by_task: dict[str, list[float]] = {}
    for tag, value in zip(tags, values):
        if tag:
            by_task.setdefault(tag, []).append(value)
    per_task = {tag: sum(v) / len(v) for tag, v in by_task.items()}
    overall = sum(per_task.values()) / len(per_task) if per_task else sum(values) / len(values)
    return {OVERALL: overall, **per_task}


# --------------------------------------------------------------------------- distributed aggregates


def _metric_key(*parts: str) -> str:
    # ModuleDict keys may not contain dots; slashes are kept readable as "__".
    return "__".join(parts).replace("/", "__").replace(".", "_")


class HeldOutMetrics(nn.Module):
    """Per-(reward, task) means accumulated over batches and synchronised across ranks.

    All ``MeanMetric``s are created up front, one per reward for ``overall`` and one per
    ``(reward, task)``: every rank must own the same metrics for torchmetrics' cross-rank sync,
    whatever prompts its shard holds. Register it on the LightningModule (so it follows the
    device) and call :meth:`update` per batch, :meth:`compute` at the epoch's end.

    Args:
        reward_names: the rewards that will be scored.
        tags: every task of the held-out prompts (``""`` is dropped: plain prompts have no task).
    """

    def __init__(self, reward_names: Sequence[str], tags: Sequence[str]):
        super().__init__()
        from torchmetrics import MeanMetric

        self.reward_names = list(dict.fromkeys(reward_names))
        self.tags = [str(t) for t in dict.fromkeys(tags) if str(t)]
        keys = [_metric_key(name, tag) for name in self.reward_names for tag in ("", *self.tags)]
        self.metrics = nn.ModuleDict({key: MeanMetric(nan_strategy="error") for key in keys})

    def _metric(self, name: str, tag: str = ""):
        return self.metrics[_metric_key(name, tag)]

    @torch.no_grad()
    def update(self, scores_by_reward: Mapping[str, Tensor], tags: Sequence[str]) -> None:
        """Add one batch: ``scores_by_reward[name]`` is ``[B]`` for every reward, ``tags`` the ``B``
        images' tasks (tasks not given at construction count only towards ``overall``)."""
        missing = [name for name in self.reward_names if name not in scores_by_reward]
        if missing:
            raise KeyError(f"no scores for reward(s) {missing}; got {sorted(scores_by_reward)}")
        present = [tag for tag in dict.fromkeys(tags) if tag in self.tags]
        for name in self.reward_names:
            metric = self._metric(name)
            scores = scores_by_reward[name].detach().float().to(metric.device)
            if scores.shape != (len(tags),):
                raise ValueError(f"reward {name!r}: {tuple(scores.shape)} scores for {len(tags)} tags")
            metric.update(scores)
            for tag in present:
                mask = torch.tensor([t == tag for t in tags], device=scores.device)
                self._metric(name, tag).update(scores[mask])

    def compute(self) -> dict[str, float]:
        """``{"eval/<reward>": overall, "eval/<reward>/<task>": mean}`` (all ranks), then reset.

        A task no rank has seen is left out; a reward with no image at all too.
        """
        import torch.distributed as dist

        # A metric without local updates still takes part in the sync when other ranks may have some.
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        results: dict[str, float] = {}
        for name in self.reward_names:
            per_task = {}
            for tag in self.tags:
                metric = self._metric(name, tag)
                if metric.update_count > 0 or distributed:
                    value = metric.compute()
                    if torch.isfinite(value):
                        per_task[tag] = float(value)
            overall = self._metric(name)
            if overall.update_count > 0 or distributed:
                mean = float(overall.compute())
                if math.isfinite(mean):
                    results[f"eval/{name}"] = sum(per_task.values()) / len(per_task) if per_task else mean
                    results.update({f"eval/{name}/{tag}": value for tag, value in per_task.items()})
        self.reset()
        return results

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


# --------------------------------------------------------------------------- grid examples


class TaskExamples:
    """A few images per task for the grid, gathered batch by batch (CPU copies).

    Per task it keeps the first ``per_task`` images of distinct prompts (then repeats of a
    prompt, if the task has fewer prompts), so a task's row shows what the task asks for rather
    than ``per_task`` samples of its first prompt.
    """

    def __init__(self, per_task: int = 4):
        if per_task < 1:
            raise ValueError(f"per_task must be >= 1, got {per_task}")
        self.per_task = per_task
        self._distinct: dict[str, list[tuple]] = {}
        self._repeats: dict[str, list[tuple]] = {}

    def add(
        self,
        images: Tensor,
        prompts: Sequence[str],
        tags: Sequence[str] | None,
        scores_by_reward: Mapping[str, Tensor],
    ) -> "TaskExamples":
        """Offer a batch: ``images [B, 3, H, W]`` (or videos ``[B, F, 3, H, W]``), its prompts, tasks (``None``: one row) and scores."""
        tags = list(tags) if tags is not None else [""] * len(prompts)
        for i, (prompt, tag) in enumerate(zip(prompts, tags)):
            distinct = self._distinct.setdefault(tag, [])
            repeats = self._repeats.setdefault(tag, [])
            new_prompt = all(entry[1] != prompt for entry in distinct)
            target = distinct if new_prompt else repeats
            if len(target) < self.per_task:
                scores = {name: float(values[i]) for name, values in scores_by_reward.items()}
                target.append((images[i].detach().float().cpu(), prompt, tag, scores))
        return self

    def result(self) -> dict[str, Any] | None:
        """``{"images": [K, 3, H, W], "prompts": [K], "tags": [K], "scores": {name: [K]}}``, tasks
        in order of first appearance; ``None`` before any image was added."""
        entries = [
            entry
            for tag, distinct in self._distinct.items()
            for entry in (distinct + self._repeats[tag])[: self.per_task]
        ]
        if not entries:
            return None
        names = list(entries[0][3])
        return {
            "images": torch.stack([e[0] for e in entries]),
            "prompts": [e[1] for e in entries],
            "tags": [e[2] for e in entries],
            "scores": {name: torch.tensor([e[3][name] for e in entries]) for name in names},
        }


def task_grid(
    examples: Mapping[str, Any], *, per_task: int = 4, reward: str | None = None, max_rows: int = 12, pyplot: bool = False,
    max_frames: int = 8,
):
    """A matplotlib ``Figure``: one row per task, ``per_task`` images each, titled prompt + score.

    Args:
        examples: ``{"images": [K, 3, H, W] in [0, 1], "prompts": [K], "scores": {name: [K]}}`` with
            optional ``"tags": [K]`` (absent: one row of the first ``per_task`` images). Videos
            ``[K, F, 3, H, W]`` are drawn as strips of ``max_frames`` evenly spaced frames.
        per_task: images per row (the first ones of each task, in the given order).
        reward: the score shown (default: the first in ``examples["scores"]``).
        max_rows: at most this many tasks are drawn.
        pyplot: create the figure through ``matplotlib.pyplot`` (notebooks show it; the caller
            closes it); by default a bare ``Figure``, which needs no backend and no closing.
    """
    from matplotlib.figure import Figure

    images, prompts = examples["images"], list(examples["prompts"])
    if is_video(images):  # one strip of frames per sample
        images = torch.stack([frame_strip(video, max_frames) for video in images])
    aspect = min(max(images.shape[-1] / images.shape[-2], 1.0), 8.0)
    scores = examples.get("scores") or {}
    reward = reward if reward is not None else next(iter(scores), None)
    tags = list(examples.get("tags") or [""] * len(prompts))
    rows: dict[str, list[int]] = {}
    for index, tag in enumerate(tags):
        row = rows.setdefault(tag, [])
        if len(row) < per_task:
            row.append(index)
    rows = dict(list(rows.items())[:max_rows])
    columns = max((len(r) for r in rows.values()), default=1)
    size = (2.0 * aspect * columns + 0.6, 2.3 * max(len(rows), 1))
    if pyplot:
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=size)
    else:
        figure = Figure(figsize=size)
    axes = figure.subplots(max(len(rows), 1), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
    for r, (tag, indices) in enumerate(rows.items()):
        axes[r][0].set_ylabel(tag or "prompts", fontsize=9)
        for c, index in enumerate(indices):
            axis = axes[r][c]
            axis.imshow(images[index].detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            title = prompts[index].removeprefix("a photo of ")
            if reward is not None:
                title += f"\n{reward}={float(scores[reward][index]):.2f}"
            axis.set_title(title, fontsize=7)
    figure.tight_layout()
    return figure


def save_grid(examples: Mapping[str, Any], path: str | Path, *, dpi: int = 100, fps: int = 8, **options: Any) -> Path:
    """Write :func:`task_grid` of ``examples`` to ``path`` (PNG); ``options`` go to it. Returns ``path``.

    Video examples are also written one by one to ``<path stem>_videos/`` (:func:`save_example_videos`:
    a GIF each, an MP4 each when an encoder is installed, and ``index.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    task_grid(examples, **options).savefig(path, dpi=dpi)
    if is_video(examples["images"]):
        save_example_videos(examples, video_directory(path), fps=fps)
    return path


# --------------------------------------------------------------------------- videos


def is_video(images: Tensor) -> bool:
    """``True`` for a batch of videos ``[B, F, 3, H, W]`` (a video backbone's ``decode``)."""
    return isinstance(images, Tensor) and images.ndim == 5 and images.shape[2] == 3


def frame_strip(video: Tensor, max_frames: int = 8, gap: int = 1) -> Tensor:
    """One video ``[F, 3, H, W]`` as an image ``[3, H, k W + (k - 1) gap]``: ``k = min(F, max_frames)``
    evenly spaced frames (first and last included) side by side, ``gap`` white columns between."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"frame_strip expects a video [F, 3, H, W], got {tuple(video.shape)}")
    count = min(int(video.shape[0]), max(int(max_frames), 1))
    index = torch.linspace(0, video.shape[0] - 1, count).round().long() if count > 1 else torch.tensor([0])
    frames = video.detach().float().cpu()[index].clamp(0, 1)
    if gap > 0 and count > 1:
        white = torch.ones(3, video.shape[2], gap)
        parts = [t for frame in frames for t in (frame, white)][:-1]
        return torch.cat(parts, dim=2)
    return torch.cat(list(frames), dim=2)


def video_frames_uint8(video: Tensor) -> "list":
    """``[F, 3, H, W]`` in ``[0, 1]`` → ``F`` ``uint8`` arrays ``[H, W, 3]`` (rounded as PIL saves images)."""
    array = (video.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(array)


def save_gif(video: Tensor, path: str | Path, fps: int = 8) -> Path:
    """An animated GIF (loops forever) of ``video [F, 3, H, W]`` in ``[0, 1]``, with PIL (GIF delays are
    whole 10 ms: 8 fps plays at 120 ms a frame)."""
    from PIL import Image

    path = Path(path)
    frames = [Image.fromarray(frame) for frame in video_frames_uint8(video)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(int(round(1000 / fps)), 1), loop=0)
    return path


def mp4_encoder() -> str | None:
    """The installed MP4 encoder: ``"av"`` (PyAV) or ``"imageio_ffmpeg"``, else ``None``."""
    import importlib.util

    for name in ("av", "imageio_ffmpeg"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


#: Why MP4s were not written (no encoder is a dependency of the package).
MP4_SKIPPED = "MP4 skipped: neither PyAV nor imageio-ffmpeg is installed (pip install av); the GIFs are written"


def save_mp4(video: Tensor, path: str | Path, fps: int = 8) -> Path | None:
    """An H.264 MP4 of ``video [F, 3, H, W]`` in ``[0, 1]`` with PyAV or imageio-ffmpeg (frames padded
    to even sides, as yuv420p needs); ``None`` when neither is installed."""
    import numpy as np

    encoder = mp4_encoder()
    if encoder is None:
        return None
    path = Path(path)
    frames = video_frames_uint8(video)
    height, width = frames[0].shape[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    frames = [np.ascontiguousarray(np.pad(frame, pad, mode="edge")) for frame in frames]
    if encoder == "av":
        import av

        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        import imageio_ffmpeg

        writer = imageio_ffmpeg.write_frames(str(path), (frames[0].shape[1], frames[0].shape[0]), fps=fps,
                                             codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1)
        writer.send(None)  # start the generator
        for frame in frames:
            writer.send(frame)
        writer.close()
    return path


def video_directory(grid_path: str | Path) -> Path:
    """Where :func:`save_grid` writes the example videos of ``grid_path``: ``<stem>_videos/`` beside it."""
    grid_path = Path(grid_path)
    return grid_path.with_name(f"{grid_path.stem}_videos")


def _slug(text: str, length: int = 40) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "prompt"


def save_example_videos(
    examples: Mapping[str, Any], directory: str | Path, *, fps: int = 8, mp4: bool = True
) -> dict[str, Any]:
    """Write each example video as ``NN_<prompt>.gif`` (and ``.mp4`` with an encoder) to ``directory``,
    with ``index.json`` (file, prompt, task and scores per example, and the MP4 note).

    Returns the index: ``{"fps", "videos": [{"gif", "mp4", "prompt", "tag", "scores"}], "note"}``,
    ``note`` saying why MP4s were skipped (``None`` when written or not asked for)."""
    import json

    videos = examples["images"]
    if not is_video(videos):
        raise ValueError(f"save_example_videos expects videos [K, F, 3, H, W], got {tuple(videos.shape)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prompts = list(examples["prompts"])
    tags = list(examples.get("tags") or [""] * len(prompts))
    scores = examples.get("scores") or {}
    encoder = mp4_encoder() if mp4 else None
    note = MP4_SKIPPED if mp4 and encoder is None else None
    if note:
        warnings.warn(note, stacklevel=2)
    entries = []
    for i, video in enumerate(videos):
        stem = f"{i:02d}_{_slug(prompts[i])}"
        gif = save_gif(video, directory / f"{stem}.gif", fps=fps)
        mp4_path = save_mp4(video, directory / f"{stem}.mp4", fps=fps) if encoder is not None else None
        entries.append({
            "gif": gif.name,
            "mp4": mp4_path.name if mp4_path is not None else None,
            "prompt": prompts[i],
            "tag": tags[i],
            "scores": {name: float(values[i]) for name, values in scores.items()},
        })
    index = {"fps": int(fps), "frames": int(videos.shape[1]), "videos": entries, "note": note}
    (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


# --------------------------------------------------------------------------- the whole evaluation


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        summary: per reward ``{"overall": ..., <task>: ...}`` (:func:`summarize_scores`).
        scores: per reward, ``[N]`` scores of the ``N`` planned images (CPU float32).
        prompts, tags, record_index, seeds: per image, in plan order.
        examples: a few images per task for :func:`task_grid` (see :class:`TaskExamples`).
        settings: the resolved sampler settings.
    """

    summary: dict[str, dict[str, float]]
    scores: dict[str, Tensor]
    prompts: list[str]
    tags: list[str]
    record_index: list[int]
    seeds: list[int]
    examples: dict[str, Any] | None
    settings: SamplerSettings

    def per_image(self) -> list[dict[str, Any]]:
        """One JSON-ready row per image: record index, prompt, task, seed and every score."""
        return [
            {
                "record": self.record_index[i],
                "prompt": self.prompts[i],
                "tag": self.tags[i],
                "seed": self.seeds[i],
                **{name: float(values[i]) for name, values in self.scores.items()},
            }
            for i in range(len(self.prompts))
        ]


def warn_unknown_words(backbone: Any, prompts: Sequence[str]) -> None:
    """Warn about prompt words a closed-vocabulary text encoder (the world's) encodes as ``[unk]``."""
    encoder = getattr(backbone, "text_encoder", None)
    if encoder is None or not hasattr(encoder, "unknown_words"):
        return
    unknown = sorted({word for prompt in prompts for word in encoder.unknown_words(prompt)})
    if unknown:
        warnings.warn(f"words outside the model's vocabulary are encoded as [unk]: {', '.join(unknown)}", stacklevel=3)


@torch.no_grad()
def evaluate(
    backbone: Any,
    records: Sequence[Mapping[str, Any]],
    rewards: Mapping[str, Reward],
    settings: SamplerSettings = SamplerSettings(),
    *,
    images_per_prompt: int = 4,
    min_images_per_task: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    examples_per_task: int = 4,
    progress: bool = False,
) -> EvalResult:
    """Plan, sample, decode and score held-out images; aggregate per reward and task.

    Args:
        backbone: anything with the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.
        records: prompt records (``{"prompt": ...}``, GenEval ones with ``tag``/``include``); they
            reach the rewards as metadata.
        rewards: the rewards by name (e.g. ``{"geneval": rewards.build("geneval")}``).
        settings: sampler settings (unresolved fields: the backbone's defaults).
        images_per_prompt, min_images_per_task, seed: the plan (:func:`evaluation_plan`).
        batch_size: images sampled, decoded and scored at once (does not change the numbers).
        examples_per_task: images per task kept for the grid.
        progress: a tqdm bar over the batches.
    """
    records = list(records)
    if not records:
        raise ValueError("no prompts to evaluate")
    if not rewards:
        raise ValueError("no rewards to evaluate with")
    settings = settings.resolve(backbone)
    warn_unknown_words(backbone, [str(r["prompt"]) for r in records])
    plan = evaluation_plan(records, seed, images_per_prompt, min_images_per_task)
    chosen = [records[index] for index, _ in plan]
    prompts = [str(r["prompt"]) for r in chosen]
    tags = [task_of(r) for r in chosen]
    seeds = [image_seed for _, image_seed in plan]
    examples = TaskExamples(examples_per_task)
    parts: dict[str, list[Tensor]] = {name: [] for name in rewards}
    starts = range(0, len(plan), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False)
    # Batch by batch, so only one batch of images is ever held (SD3 at 512 px: 3 MB an image).
    for start in starts:
        chunk = slice(start, start + batch_size)
        images = generate_images(backbone, prompts[chunk], seeds[chunk], settings, batch_size=batch_size)
        scores = score_images(rewards, images, prompts[chunk], chosen[chunk])
        for name, values in scores.items():
            parts[name].append(values)
        examples.add(images, prompts[chunk], tags[chunk], scores)
    scores = {name: torch.cat(values) for name, values in parts.items()}
    return EvalResult(
        summary={name: summarize_scores(values, tags) for name, values in scores.items()},
        scores=scores,
        prompts=prompts,
        tags=tags,
        record_index=[index for index, _ in plan],
        seeds=seeds,
        examples=examples.result(),
        settings=settings,
    )


__all__ = [
    "OVERALL",
    "EvalResult",
    "HeldOutMetrics",
    "TaskExamples",
    "evaluate",
    "evaluation_plan",
    "generate_images",
    "frame_strip",
    "is_video",
    "mp4_encoder",
    "save_example_videos",
    "save_gif",
    "save_grid",
    "save_mp4",
    "score_images",
    "summarize_scores",
    "task_grid",
    "task_of",
    "video_directory",
    "warn_unknown_words",
]
