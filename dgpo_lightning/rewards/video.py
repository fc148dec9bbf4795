"""Video rewards: rewards of ``videos [B, F, 3, H, W]`` in ``[0, 1]`` (what a video backbone's
``decode`` returns, e.g. :class:`~dgpo_lightning.models.wan.WanBackbone`).

* ``frame_mean``: any registered image reward applied to frames and averaged,
  ``r(v) = (1 / |S|) sum_{f in S} r_img(v_f)``, ``S`` every frame, ``frames: k`` evenly spaced
  frames (first and last included) or every ``stride``-th frame. This is how the peers score
  text-to-video with image rewards: Flow-GRPO's ``video_ocr`` reward (yifan123/flow_grpo,
  flow_grpo/ocr.py ``OcrScorer_video_or_image``) reads every 4th frame (``stride: 4``) and averages
  (over the frames it reads any text in); Flow-Factory's Wan examples train with its image
  rewards (PickScore, CLIP) on the generated frames.
* ``temporal_consistency``: how alike consecutive frames are, in ``[0, 1]`` for pixels (higher is
  steadier), ``1 - (1 / (F - 1)) sum_f mean|v_{f+1} - v_f|``, or from image features,
  ``(1 / (F - 1)) sum_f cos(e_f, e_{f+1})`` with ``e_f`` the L2-normalised embedding of frame ``f`` by
  an open_clip model loaded from a local path (never downloaded). ``reference: first_and_previous``
  averages ``cos(e_f, e_1)`` and ``cos(e_f, e_{f-1})`` over ``f >= 2``, the form of VBench's
  subject / background consistency (Huang et al. 2024: DINO / CLIP features of each frame against
  the first and the previous one). Neither Flow-GRPO nor Flow-Factory trains on such a term; it is a
  regulariser against flicker to weigh next to a per-frame reward, and an evaluation measure.

A 4-D batch ``[B, 3, H, W]`` is taken as one-frame videos, so the same config scores images.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dgpo_lightning.rewards.base import build, check_scores, register


def as_videos(name: str, videos: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
    """``videos [B, F, 3, H, W]`` (a 4-D ``[B, 3, H, W]`` batch as one-frame videos), else a clear
    error naming the reward."""
    if videos.ndim == 4 and videos.shape[1] == 3:
        videos = videos[:, None]
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"reward {name!r}: expected videos [B, F, 3, H, W] in [0, 1], got {tuple(videos.shape)}")
    if prompts is not None and len(prompts) != videos.shape[0]:
        raise ValueError(f"reward {name!r}: {videos.shape[0]} videos but {len(prompts)} prompts")
    return videos


def frame_indices(num_frames: int, frames: int | None = None, stride: int | None = None) -> Tensor:
    """Frames scored of a ``num_frames``-frame video: all; ``frames`` evenly spaced (rounded
    ``linspace(0, F - 1, k)``, first and last included); or ``0, stride, 2 stride, ...``."""
    if frames is not None and stride is not None:
        raise ValueError("frame_mean: give frames (evenly spaced count) or stride, not both")
    if stride is not None:
        if int(stride) < 1:
            raise ValueError(f"frame_mean: stride must be >= 1, got {stride}")
        return torch.arange(0, num_frames, int(stride))
    if frames is None or int(frames) >= num_frames:
        return torch.arange(num_frames)
    if int(frames) < 1:
        raise ValueError(f"frame_mean: frames must be >= 1, got {frames}")
    if int(frames) == 1:
        return torch.tensor([(num_frames - 1) // 2])
    return torch.linspace(0, num_frames - 1, int(frames)).round().long()


class FrameMean:
    """``mean_{f in S} reward(v_f)``: the image reward ``reward`` (built by name with ``options``) on
    the chosen frames of each video; prompts and metadata go with each frame."""

    def __init__(
        self,
        reward: str,
        options: Mapping[str, Any] | None = None,
        frames: int | None = None,
        stride: int | None = None,
        batch_size: int | None = None,
    ):
        if not isinstance(reward, str) or not reward:
            raise ValueError("frame_mean: pass reward=<name of a registered image reward> (and its options)")
        if reward in ("frame_mean", "temporal_consistency") or (options or {}).get("kind") == "frame_mean":
            raise ValueError(f"frame_mean: reward={reward!r} is a video reward; name an image reward")
        frame_indices(8, frames, stride)  # validate early
        self.name = reward
        self.inner = build(reward, **dict(options or {}))
        self.frames, self.stride = frames, stride
        self.batch_size = int(batch_size) if batch_size else None

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> Tensor:
        videos = as_videos("frame_mean", images, prompts)
        b, f = videos.shape[:2]
        index = frame_indices(f, self.frames, self.stride).to(videos.device)
        k = int(index.numel())
        frames = videos[:, index].reshape(b * k, *videos.shape[2:])  # video-major: video i's frames together
        frame_prompts = [p for p in prompts for _ in range(k)]
        meta = list(metadata) if metadata is not None else [None] * b
        frame_meta = [m for m in meta for _ in range(k)]
        size = self.batch_size or b * k
        scores = []
        for start in range(0, b * k, size):
            chunk = slice(start, start + size)
            out = self.inner(frames[chunk], frame_prompts[chunk], frame_meta[chunk])
            scores.append(check_scores(self.name, torch.as_tensor(out), frames[chunk].shape[0], allow_non_finite=True))
        return torch.cat(scores).view(b, k).mean(dim=1).to(videos.device)


@register("frame_mean")
def frame_mean(
    reward: str | None = None,
    options: Mapping[str, Any] | None = None,
    frames: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
) -> FrameMean:
    """``frame_mean: {reward: pickscore, options: {model_path: ...}, frames: 4}``."""
    return FrameMean(reward, options, frames, stride, batch_size)


def pixel_consistency(videos: Tensor) -> Tensor:
    """``1 - mean_f mean|v_{f+1} - v_f|`` per video ``[B]`` (``1`` for one-frame videos)."""
    if videos.shape[1] < 2:
        return torch.ones(videos.shape[0], device=videos.device)
    diff = (videos[:, 1:].float() - videos[:, :-1].float()).abs()
    return 1.0 - diff.flatten(2).mean(dim=2).mean(dim=1)


def feature_consistency(embeddings: Tensor, reference: str = "previous") -> Tensor:
    """Consistency of L2-normalised per-frame embeddings ``[B, F, D]`` → ``[B]``.

    ``previous``: ``mean_{f<F} cos(e_f, e_{f+1})``; ``first_and_previous``:
    ``mean_{f>=2} (cos(e_f, e_1) + cos(e_f, e_{f-1})) / 2`` (frames counted from 1)."""
    if embeddings.shape[1] < 2:
        return torch.ones(embeddings.shape[0], device=embeddings.device)
    previous = (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1)
    if reference == "previous":
        return previous.mean(dim=1)
    if reference == "first_and_previous":
        first = (embeddings[:, 1:] * embeddings[:, :1]).sum(-1)
        return ((first + previous) / 2).mean(dim=1)
    raise ValueError(f"temporal_consistency: reference must be 'previous' or 'first_and_previous', got {reference!r}")


class TemporalConsistency:
    """Frame-to-frame consistency of each video (module docstring); ``scale`` multiplies it."""

    def __init__(self, features: str = "pixels", reference: str = "previous", scale: float = 1.0,
                 batch_size: int = 64, backend: Any = None):
        if features not in ("pixels", "open_clip"):
            raise ValueError(f"temporal_consistency: features must be 'pixels' or 'open_clip', got {features!r}")
        if reference not in ("previous", "first_and_previous"):
            raise ValueError(f"temporal_consistency: reference must be 'previous' or 'first_and_previous', got {reference!r}")
        if features == "pixels" and reference != "previous":
            raise ValueError("temporal_consistency: reference applies to features: open_clip only")
        self.features, self.reference, self.scale = features, reference, float(scale)
        self.batch_size = int(batch_size)
        self.backend = backend

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> Tensor:
        videos = as_videos("temporal_consistency", images, prompts)
        if self.features == "pixels":
            return self.scale * pixel_consistency(videos)
        b, f = videos.shape[:2]
        flat = videos.reshape(b * f, *videos.shape[2:])
        embeddings = torch.cat(
            [self.backend.image_embeddings(flat[i : i + self.batch_size]) for i in range(0, b * f, self.batch_size)]
        )
        return (self.scale * feature_consistency(embeddings.view(b, f, -1), self.reference)).to(videos.device)


@register("temporal_consistency")
def temporal_consistency(
    features: str = "pixels",
    reference: str = "previous",
    model_name: str | None = None,
    model_path: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    scale: float = 1.0,
    batch_size: int = 64,
) -> TemporalConsistency:
    """``features: pixels`` (no model) or ``features: open_clip`` with ``model_name`` (an open_clip
    architecture, e.g. ``ViT-B-32``) or ``model_config`` and ``model_path`` (a local weights file or a
    pretrained tag already in the local hub cache; see
    :class:`~dgpo_lightning.rewards.open_clip_models.OpenClipBackend`)."""
    backend = None
    if features == "open_clip":
        from dgpo_lightning.rewards.open_clip_models import OpenClipBackend

        backend = OpenClipBackend(model_name=model_name, model_path=model_path, model_config=model_config,
                                  device=device, dtype=dtype, what="temporal_consistency")
    elif any(v is not None for v in (model_name, model_path, model_config)):
        raise ValueError("temporal_consistency: model_name / model_path / model_config need features: open_clip")
    return TemporalConsistency(features, reference, scale, batch_size, backend)


__all__ = ["FrameMean", "TemporalConsistency", "as_videos", "feature_consistency", "frame_indices", "pixel_consistency"]
