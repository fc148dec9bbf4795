"""CLIP-family rewards: PickScore, LAION Aesthetic and CLIPScore, on transformers or open_clip.

``backend: transformers`` (default) runs a ``CLIPModel`` (:class:`ClipBackend`): weights load lazily,
on the first call, from local directories given as keyword arguments (a directory written by
``save_pretrained``, or a hub id already in the local cache). ``backend: open_clip`` runs an open_clip
model (:class:`~dgpo_lightning.rewards.open_clip_models.OpenClipBackend`: ``model_name`` is the
architecture, ``model_path`` a local weights file or a cached pretrained tag). Images are
preprocessed in torch (resize of the shortest side, centre crop, normalisation with the model's
mean/std), so there is no PIL round trip and the images may stay on the GPU.

* ``pickscore``: ``logit_scale.exp() · cos(image, text)`` of the PickScore CLIP-H model (Kirstain et
  al. 2023; weights ``yuvalkirstain/PickScore_v1``, processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
  the raw scale the DGPO paper reports (21.72 → 23.89 on SD3.5-M); ``scale`` rescales it for training.
* ``aesthetic``: the LAION aesthetic predictor: linear layers on the L2-normalised CLIP ViT-L/14 image
  embedding (``sac+logos+ava1-l14-linearMSE.pth`` of christophschuhmann/improved-aesthetic-predictor,
  a stack of Linear layers with dropout and no activation; the v1 linear head works too).
* ``clip_score``: ``weight · max(cos(image, text), 0)`` (Hessel et al. 2021 with ``weight = 2.5``;
  torchmetrics' CLIPScore uses ``100``, the default here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgpo_lightning.rewards.base import check_images, place_model, register


def resolve_local_path(path: str | Path | None, what: str, kwarg: str) -> str:
    """``path`` as a string once it names an existing local path or a hub-id-shaped name (which
    transformers then finds in its local cache or fails on); ``None`` or a missing path raise,
    naming ``what`` and its argument ``kwarg``. Nothing is downloaded here."""
    if path is None:
        raise ValueError(f"{what}: pass {kwarg}=<local directory> (weights are never downloaded)")
    text = str(Path(path).expanduser())
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None and not Path(text).exists()
    if not is_hub_id and not Path(text).exists():
        raise FileNotFoundError(f"{what}: {kwarg}={str(path)!r} does not exist")
    return text


def _size_pair(size: Any) -> tuple[int, int] | int:
    if isinstance(size, int):
        return (size, size)
    if "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ValueError(f"unsupported image processor size {size!r}")


def clip_preprocess(images: Tensor, image_processor: Any) -> Tensor:
    """CLIP's image preprocessing in torch: ``[B, 3, H, W]`` in ``[0, 1]`` → normalised pixels.

    Follows the processor's settings: bicubic (antialiased) resize of the shortest side (or to a
    fixed size), centre crop, then ``(x - mean) / std``.
    """
    config = image_processor.to_dict() if hasattr(image_processor, "to_dict") else dict(image_processor)
    x = images.float().clamp(0, 1)
    if config.get("do_resize", True) and config.get("size") is not None:
        target = _size_pair(config["size"])
        if isinstance(target, int):
            h, w = x.shape[-2:]
            # The long side is floored, as transformers' get_resize_output_image_size does.
            target = (target, int(target * w / h)) if h <= w else (int(target * h / w), target)
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if config.get("do_center_crop", True) and config.get("crop_size") is not None:
        ch, cw = _size_pair(config["crop_size"]) if not isinstance(config["crop_size"], int) else (config["crop_size"],) * 2
        h, w = x.shape[-2:]
        if h < ch or w < cw:
            raise ValueError(f"image {h}x{w} is smaller than CLIP's crop {ch}x{cw} after resizing")
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    if config.get("do_normalize", True):
        mean = torch.tensor(config["image_mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(config["image_std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


class ClipBackend(nn.Module):
    """A transformers ``CLIPModel`` + ``CLIPProcessor``, loaded on first use.

    Args:
        model_path: directory (or cached hub id) of the ``CLIPModel``.
        processor_path: directory of the ``CLIPProcessor`` (tokenizer + image settings); defaults to
            ``model_path``.
        device: where the model runs; ``None`` follows the images.
        dtype: model dtype.
        what: name used in error messages.
    """

    def __init__(
        self,
        model_path: str | Path | None,
        processor_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        what: str = "CLIP",
    ):
        super().__init__()
        self.what = what
        self.model_path = model_path
        self.processor_path = processor_path if processor_path is not None else model_path
        self.device_override = torch.device(device) if device is not None else None
        self.dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype  # YAML
        self.model: nn.Module | None = None
        self.processor: Any = None

    def load(self, device: torch.device) -> None:
        if self.model is None:
            from transformers import CLIPModel, CLIPProcessor

            model_path = resolve_local_path(self.model_path, self.what, "model_path")
            processor_path = resolve_local_path(self.processor_path, self.what, "processor_path")
            try:
                self.processor = CLIPProcessor.from_pretrained(processor_path)
                self.model = CLIPModel.from_pretrained(model_path, dtype=self.dtype).eval().requires_grad_(False)
            except OSError as error:
                raise FileNotFoundError(
                    f"{self.what}: could not load a CLIP model from {model_path!r} / processor from "
                    f"{processor_path!r}: {error}"
                ) from error
        place_model(self.model, self.device_override or device)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → CLIP's normalised input pixels on the model's device."""
        self.load(images.device)
        device = next(self.model.parameters()).device
        return clip_preprocess(images.to(device), self.processor.image_processor)

    @torch.no_grad()
    def pixel_embeddings(self, pixels: Tensor) -> Tensor:
        """L2-normalised projected image embeddings ``[B, D]`` (float32) of already preprocessed pixels
        (for callers that preprocess images of different sizes one by one, then batch them)."""
        self.load(pixels.device)
        device = next(self.model.parameters()).device
        pooled = self.model.vision_model(pixel_values=pixels.to(device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings ``[B, D]`` (float32)."""
        return self.pixel_embeddings(self.preprocess(images))

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """L2-normalised projected text embeddings ``[B, D]`` (float32)."""
        self.load(device)
        tokenizer = self.processor.tokenizer
        max_length = min(int(tokenizer.model_max_length), self.model.config.text_config.max_position_embeddings)
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        model_device = next(self.model.parameters()).device
        tokens = {k: v.to(model_device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**tokens).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


#: Libraries a CLIP-family reward can run on (its ``backend`` option).
CLIP_BACKENDS = ("transformers", "open_clip")


def make_clip_backend(
    backend: str,
    *,
    what: str,
    model_path: str | Path | None = None,
    processor_path: str | Path | None = None,
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    path_option: str = "model_path",
) -> nn.Module:
    """A CLIP backend of either library with the same interface (``image_embeddings``,
    ``text_embeddings``, ``pixel_embeddings``, ``preprocess``, ``logit_scale``).

    ``transformers``: ``model_path`` (+ ``processor_path``) directories of a ``CLIPModel``.
    ``open_clip``: ``model_name`` (architecture) or ``model_config`` (a dict), and ``model_path``
    (a local weights file or a cached pretrained tag).
    """
    if backend == "transformers":
        for name, value in (("model_name", model_name), ("model_config", model_config)):
            if value is not None:
                raise ValueError(f"{what}: {name} is an option of backend='open_clip'; transformers reads model_path")
        return ClipBackend(model_path, processor_path, device, dtype, what=what)
    if backend == "open_clip":
        if processor_path is not None:
            raise ValueError(f"{what}: processor_path is an option of backend='transformers'; open_clip has its own")
        from dgpo_lightning.rewards.open_clip_models import OpenClipBackend

        return OpenClipBackend(model_name, model_path, model_config, device, dtype, what=what, path_option=path_option)
    raise ValueError(f"{what}: backend={backend!r} is not one of {', '.join(CLIP_BACKENDS)}")


class PickScoreReward:
    """``scale · logit_scale.exp() · cos(image, prompt)`` with the PickScore model."""

    def __init__(self, backend: nn.Module, scale: float = 1.0):
        self.clip = backend
        self.scale = float(scale)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        check_images("pickscore", images, prompts)
        image = self.clip.image_embeddings(images)
        text = self.clip.text_embeddings(prompts, images.device)
        scores = self.scale * self.clip.logit_scale * (image * text).sum(-1)
        return scores.to(images.device)


class ClipScoreReward:
    """``weight · max(cos(image, prompt), 0)``."""

    def __init__(self, backend: nn.Module, weight: float = 100.0):
        self.clip = backend
        self.weight = float(weight)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        check_images("clip_score", images, prompts)
        image = self.clip.image_embeddings(images)
        text = self.clip.text_embeddings(prompts, images.device)
        return (self.weight * (image * text).sum(-1).clamp_min(0)).to(images.device)


def load_linear_head(path: str | Path, in_features: int | None = None) -> nn.Sequential:
    """The LAION aesthetic head from a ``.pth``/``.safetensors`` state dict as ``nn.Sequential`` of
    ``Linear`` layers (no activations, as in both LAION predictors; dropout is a no-op at eval).

    Layers are taken in the numeric order of their key prefixes (``layers.0``, ``layers.2``, ...;
    a bare ``weight``/``bias`` is a single linear head) and must chain ``in_features → ... → 1``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic: head_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    prefixes = sorted(
        {key[: -len("weight")] for key, value in state.items() if key.endswith("weight") and value.ndim == 2},
        key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p)],
    )
    if not prefixes:
        raise ValueError(f"aesthetic: {path} holds no linear layer weights")
    layers = []
    for prefix in prefixes:
        weight = state[prefix + "weight"].float()
        bias = state.get(prefix + "bias")
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.float())
        layers.append(layer)
    shapes = [(l.in_features, l.out_features) for l in layers]
    chained = all(a[1] == b[0] for a, b in zip(shapes, shapes[1:])) and shapes[-1][1] == 1
    if not chained or (in_features is not None and shapes[0][0] != in_features):
        raise ValueError(
            f"aesthetic: the head in {path} must chain {in_features or 'D'} -> ... -> 1 linear layers, got {shapes}"
        )
    return nn.Sequential(*layers).eval().requires_grad_(False)


class AestheticReward:
    """LAION aesthetic score: linear head on the normalised CLIP ViT-L/14 image embedding."""

    def __init__(self, backend: nn.Module, head_path: str | Path | None = None):
        self.clip = backend
        self.head_path = head_path
        self.head: nn.Sequential | None = None

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        check_images("aesthetic", images, prompts)
        embeddings = self.clip.image_embeddings(images)
        if self.head is None:
            if self.head_path is None:
                raise ValueError("aesthetic: pass head_path=<the LAION predictor .pth> (never downloaded)")
            self.head = load_linear_head(self.head_path, in_features=embeddings.shape[-1])
        self.head.to(embeddings.device)
        with torch.no_grad():
            return self.head(embeddings).squeeze(-1).to(images.device)


@register("pickscore")
def pickscore_reward(
    model_path: str | None = None,
    processor_path: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    backend: str = "transformers",
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> PickScoreReward:
    """PickScore with local weights (``model_path``: PickScore_v1, ``processor_path``: CLIP-H processor)."""
    clip = make_clip_backend(
        backend, what="pickscore", model_path=model_path, processor_path=processor_path,
        model_name=model_name, model_config=model_config, device=device, dtype=dtype,
    )
    return PickScoreReward(clip, scale)


@register("aesthetic")
def aesthetic_reward(
    model_path: str | None = None,
    head_path: str | None = None,
    processor_path: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str = "transformers",
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> AestheticReward:
    """LAION aesthetic predictor (``model_path``: CLIP ViT-L/14, ``head_path``: the predictor weights;
    with ``backend: open_clip``, ``model_name: ViT-L-14-quickgelu`` and OpenAI's weights)."""
    clip = make_clip_backend(
        backend, what="aesthetic", model_path=model_path, processor_path=processor_path,
        model_name=model_name, model_config=model_config, device=device, dtype=dtype,
    )
    return AestheticReward(clip, head_path)


@register("clip_score")
def clip_score_reward(
    model_path: str | None = None,
    processor_path: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    weight: float = 100.0,
    backend: str = "transformers",
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> ClipScoreReward:
    """CLIPScore ``weight · max(cos, 0)`` with a local CLIP (e.g. ViT-L/14), on either library."""
    clip = make_clip_backend(
        backend, what="clip_score", model_path=model_path, processor_path=processor_path,
        model_name=model_name, model_config=model_config, device=device, dtype=dtype,
    )
    return ClipScoreReward(clip, weight)
