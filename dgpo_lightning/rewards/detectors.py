"""A real-image object detector for the GenEval rules: Mask2Former instances + a CLIP colour classifier.

GenEval (djghosh13/geneval, ``evaluation/evaluate_images.py``) scores images with mmdet's Mask2Former
(Swin-S, COCO instance segmentation) and classifies the colour of each object it checks with OpenAI's
CLIP ViT-L/14. mmdet does not install here, so :class:`Mask2FormerClipDetector` rebuilds that path on
transformers: a Mask2Former instance-segmentation checkpoint (e.g. the transformers port
``facebook/mask2former-swin-small-coco-instance``) and a ``CLIPModel`` (e.g.
``openai/clip-vit-large-patch14``), both loaded lazily, on the first call, from local directories (or
hub ids already in the local cache). The port's weights and preprocessing are not mmdet's, so scores
can differ slightly from the official pipeline.

What it computes, for each image of a batch ``[B, 3, H, W]`` in ``[0, 1]``:

1. Mask2Former on the image resized with its aspect ratio kept (the processor config's shortest /
   longest edge, overridable: mmdet's GenEval pipeline uses 800 / 1333), normalised, and zero-padded
   at the bottom/right to a multiple of the processor's ``size_divisor``.
2. Instances as in mmdet's Mask2Former instance post-processing: the ``num_queries`` best
   (query, class) pairs by class probability; each mask's logits upsampled bilinearly to the padded
   input, cropped to the image's area, resized to the original image size and thresholded at 0;
   score = class probability × mean mask probability inside the mask. (transformers'
   ``post_process_instance_segmentation`` computes the same scores but first resizes every mask to
   a fixed 384×384, padding included, and uses nearest-neighbour resizing to the target size; where
   the two agree, on an unpadded 384×384 input, the tests check that they do.)
3. One :class:`~dgpo_lightning.rewards.geneval_rules.Detection` per instance. Its box is the extent of the
   binary mask, ``(x_min, y_min, x_max + 1, y_max + 1)`` in pixels (exclusive end, mmdet's
   ``mask2bbox``), which is the box mmdet's Mask2Former reports and GenEval's position rule reads.
   Class names come from the checkpoint's ``id2label`` through ``aliases`` (GenEval's names for
   three COCO labels differ, see :data:`GENEVAL_CLASS_ALIASES`).
4. Its colour, as GenEval classifies it: the pixels outside the instance mask are replaced with the
   grey ``#999999``, the image is cropped to the box, and CLIP picks the colour whose text embedding
   (the normalised mean of the normalised embeddings of three templates: "a photo of a {color}
   {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object") is most
   similar to the crop's embedding.

The detector has no prompt metadata, so it classifies the colour of every detection it returns;
GenEval only asks for the colours of the most confident detections of classes a prompt colours,
which are among them, so verdicts are unchanged. To bound that cost, detections that cannot pass
GenEval's lowest confidence threshold (``score <= score_floor``, default 0.3) are dropped, and at most
``max_per_class`` (default 16, GenEval's cap) are returned per class, chosen in GenEval's ranking
(ties included): the rules never look at others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dgpo_lightning.models.mask2former import instance_head_class
from dgpo_lightning.rewards.base import place_model
from dgpo_lightning.rewards.clip_scores import ClipBackend, make_clip_backend, resolve_local_path
from dgpo_lightning.rewards.geneval_rules import MAX_OBJECTS, THRESHOLD, Detection, geneval_ranking, register_detector

#: GenEval's colour classifier: open_clip ViT-L-14 with OpenAI's weights (which use QuickGELU).
GENEVAL_OPEN_CLIP_MODEL = "ViT-L-14-quickgelu"

#: GenEval's colour names, in its order (ties in the argmax go to the earlier one).
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

#: GenEval's zero-shot prompts per colour; their embeddings are averaged into one colour embedding.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)

#: GenEval's fill for the pixels outside an object's mask before its colour is classified (#999999).
MASK_BACKGROUND = 153 / 255

#: COCO label names (as in the COCO Mask2Former checkpoints' ``id2label``) that GenEval's class list
#: (``object_names.txt``, which its prompts use) spells differently.
GENEVAL_CLASS_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}


@dataclass(frozen=True)
class Instance:
    """One segmented object: class id, confidence, and its binary mask ``[H, W]`` at image resolution."""

    label: int
    score: float
    mask: Tensor


def mask_box(mask: Tensor) -> tuple[int, int, int, int]:
    """The extent of a non-empty binary mask ``[H, W]`` as ``(x_min, y_min, x_max + 1, y_max + 1)``."""
    columns = mask.any(dim=0).nonzero().flatten()
    rows = mask.any(dim=1).nonzero().flatten()
    if columns.numel() == 0:
        raise ValueError("an empty mask has no box")
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def masked_crop(image: Tensor, mask: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """``image[3, H, W]`` cropped to ``box``, with the pixels outside ``mask`` set to GenEval's grey."""
    x0, y0, x1, y1 = box
    crop = image[:, y0:y1, x0:x1]
    return torch.where(mask[y0:y1, x0:x1].to(crop.device), crop, torch.full_like(crop, MASK_BACKGROUND))


def mask2former_instances(
    class_logits: Tensor,
    mask_logits: Tensor,
    input_size: tuple[int, int],
    resized_size: tuple[int, int],
    image_size: tuple[int, int],
    score_floor: float = 0.0,
    max_instances: int | None = None,
) -> list[Instance]:
    """Instances of one image from Mask2Former's outputs, following mmdet's instance post-processing.

    Args:
        class_logits: ``[Q, C + 1]`` class logits (the last class is "no object").
        mask_logits: ``[Q, h, w]`` mask logits at a fraction of the network input's resolution.
        input_size: ``(height, width)`` of the (padded) network input.
        resized_size: the image's area inside it (the rest is padding at the bottom/right).
        image_size: the original image size, the resolution of the returned masks.
        score_floor: instances scoring ``<= score_floor`` are dropped (GenEval never keeps them).
        max_instances: how many (query, class) pairs compete; default ``Q``, as mmdet's 100 for 100 queries.

    Returns instances sorted by decreasing score, empty masks left out.
    """
    num_queries, num_outputs = class_logits.shape
    num_classes = num_outputs - 1
    probabilities = class_logits.float().softmax(dim=-1)[:, :num_classes]
    k = min(max_instances or num_queries, probabilities.numel())
    class_scores, pairs = probabilities.flatten().topk(k)
    # The final score is the class probability times a mask probability ≤ 1: prune before upsampling.
    survivors = class_scores > score_floor
    class_scores, pairs = class_scores[survivors], pairs[survivors]
    if pairs.numel() == 0:
        return []
    labels = pairs % num_classes
    logits = mask_logits[pairs // num_classes].float()[None]
    logits = F.interpolate(logits, size=tuple(input_size), mode="bilinear", align_corners=False)
    logits = logits[..., : resized_size[0], : resized_size[1]]
    if tuple(resized_size) != tuple(image_size):
        logits = F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)
    logits = logits[0]
    masks = logits > 0
    area = masks.flatten(1).sum(1)
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (area + 1e-6)
    scores = class_scores * mask_scores
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return [
        Instance(int(labels[i]), float(scores[i]), masks[i])
        for i in order
        if area[i] > 0 and float(scores[i]) > score_floor
    ]


class Mask2FormerClipDetector:
    """GenEval's detector on transformers: ``detector(images[B, 3, H, W] in [0, 1]) -> list[list[Detection]]``.

    Args:
        model_path: directory (or cached hub id) of a Mask2Former instance-segmentation checkpoint
            (``Mask2FormerForUniversalSegmentation``, e.g. ``facebook/mask2former-swin-small-coco-instance``).
        clip_path: directory (or cached hub id) of the ``CLIPModel`` + ``CLIPProcessor`` for colours
            (GenEval uses OpenAI's ViT-L/14: ``openai/clip-vit-large-patch14``).
        processor_path: the Mask2Former image-processor config; defaults to ``model_path``.
        clip_processor_path: the CLIP processor; defaults to ``clip_path``.
        aliases: checkpoint label name → GenEval class name; ``None`` uses :data:`GENEVAL_CLASS_ALIASES`,
            a mapping replaces it (``{}``: the checkpoint's names as they are).
        shortest_edge, longest_edge: resize limits overriding the processor config's (mmdet's GenEval
            pipeline: 800 and 1333).
        score_floor: detections scoring ``<= score_floor`` are dropped (GenEval's lowest threshold).
        max_per_class: at most this many detections per class (GenEval's cap); ``None``: no cap.
        device: where the models run; ``None`` follows the images.
        dtype: the models' dtype (a ``torch.dtype`` or its name, for YAML).
        clip_batch_size: crops per CLIP forward pass.
        clip_backend: ``transformers`` (a ``CLIPModel`` directory as ``clip_path``) or ``open_clip``,
            GenEval's own library: ``clip_path`` is then a local weights file (or a cached pretrained
            tag such as ``openai``) of ``clip_model_name`` (GenEval's ``ViT-L-14`` with OpenAI's
            weights: ``ViT-L-14-quickgelu`` for a local file).
        clip_model_name, clip_model_config: the open_clip architecture (a name, or a config dict).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        clip_path: str | Path | None = None,
        processor_path: str | Path | None = None,
        clip_processor_path: str | Path | None = None,
        aliases: Mapping[str, str] | None = None,
        shortest_edge: int | None = None,
        longest_edge: int | None = None,
        score_floor: float = THRESHOLD,
        max_per_class: int | None = MAX_OBJECTS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        clip_batch_size: int = 64,
        clip_backend: str = "transformers",
        clip_model_name: str | None = None,
        clip_model_config: Mapping[str, Any] | None = None,
    ):
        if model_path is None:
            raise ValueError("mask2former detector: pass model_path=<local Mask2Former directory> (never downloaded)")
        if clip_path is None:
            raise ValueError("mask2former detector: pass clip_path=<local CLIP directory> for the colour classifier")
        self.model_path = model_path
        self.processor_path = processor_path if processor_path is not None else model_path
        self.aliases = dict(GENEVAL_CLASS_ALIASES if aliases is None else aliases)
        self.shortest_edge = shortest_edge
        self.longest_edge = longest_edge
        self.score_floor = float(score_floor)
        self.max_per_class = max_per_class
        self.device_override = torch.device(device) if device is not None else None
        self.dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
        self.clip_batch_size = int(clip_batch_size)
        if clip_backend == "open_clip" and clip_model_name is None and clip_model_config is None:
            clip_model_name = GENEVAL_OPEN_CLIP_MODEL
        self.clip = make_clip_backend(
            clip_backend, what="mask2former detector (CLIP)", model_path=clip_path, processor_path=clip_processor_path,
            model_name=clip_model_name, model_config=clip_model_config, device=device, dtype=self.dtype,
            path_option="clip_path",
        )
        self.model: Any = None
        self.processor: Any = None
        self._color_embeddings: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ loading

    def load(self, device: torch.device) -> None:
        if self.model is None:
            # The PIL image processor only parses the config (legacy keys included); images are
            # preprocessed in torch below. The default (torchvision) processor cannot import here.
            from transformers import Mask2FormerImageProcessorPil

            model_path = resolve_local_path(self.model_path, "mask2former detector", "model_path")
            processor_path = resolve_local_path(self.processor_path, "mask2former detector", "processor_path")
            # Checked here too, so that a missing CLIP is reported under this detector's argument names.
            if isinstance(self.clip, ClipBackend):  # open_clip reports its own paths (file or cached tag)
                resolve_local_path(self.clip.model_path, "mask2former detector", "clip_path")
                resolve_local_path(self.clip.processor_path, "mask2former detector", "clip_processor_path")
            try:
                self.processor = Mask2FormerImageProcessorPil.from_pretrained(processor_path)
                model = instance_head_class().from_pretrained(model_path, dtype=self.dtype)
            except OSError as error:
                raise FileNotFoundError(
                    f"mask2former detector: could not load a Mask2Former model from {model_path!r} / "
                    f"image processor from {processor_path!r}: {error}"
                ) from error
            self.model = model.eval().requires_grad_(False)
        place_model(self.model, self.device_override or device)
        self.clip.load(device)

    def class_name(self, label: int) -> str:
        """GenEval's name of the checkpoint's class ``label``."""
        name = self.model.config.id2label.get(int(label), str(label))
        return self.aliases.get(name, name)

    # ------------------------------------------------------------------ segmentation

    def input_geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(resized, padded)`` sizes of an ``height × width`` image at the network input."""
        size = self.processor.size
        shortest = self.shortest_edge or getattr(size, "shortest_edge", None)
        longest = self.longest_edge or getattr(size, "longest_edge", None)
        if not (self.processor.do_resize or self.shortest_edge or self.longest_edge):
            resized = (height, width)
        elif shortest or longest:  # keep the aspect ratio within both limits (mmdet's rescale)
            scales = ([shortest / min(height, width)] if shortest else []) + ([longest / max(height, width)] if longest else [])
            scale = min(scales)
            resized = (int(height * scale + 0.5), int(width * scale + 0.5))
        elif getattr(size, "height", None) and getattr(size, "width", None):
            resized = (int(size.height), int(size.width))
        else:
            raise ValueError(f"mask2former detector: unsupported image processor size {size!r}")
        divisor = int(getattr(self.processor, "size_divisor", 0) or 0)
        padded = tuple(-(-s // divisor) * divisor for s in resized) if divisor > 0 else resized
        return resized, padded

    def preprocess(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Network input ``[B, 3, H', W']`` (resized, normalised, zero-padded) and the resized size.

        Done in torch from the processor's settings rather than by the processor itself, so the
        images stay on their device and in float (no uint8/PIL round trip).
        """
        resized, padded = self.input_geometry(*images.shape[-2:])
        x = images.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != resized:
            x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=True)
        processor = self.processor
        # The processor takes 0..255 pixels (rescaled by rescale_factor when do_rescale is set).
        x = x * (255 * processor.rescale_factor if processor.do_rescale else 255)
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        x = F.pad(x, (0, padded[1] - resized[1], 0, padded[0] - resized[0]))  # bottom/right, after normalising
        return x, resized

    @torch.no_grad()
    def segment(self, images: Tensor) -> list[list[Instance]]:
        """Mask2Former instances of each image (masks at the image's resolution), best first."""
        self.load(images.device)
        device = next(self.model.parameters()).device
        pixels, resized = self.preprocess(images.to(device))
        class_logits, mask_logits = self.model(pixel_values=pixels.to(self.dtype))
        return [
            mask2former_instances(
                class_logits[i], mask_logits[i], tuple(pixels.shape[-2:]), resized, tuple(images.shape[-2:]),
                score_floor=self.score_floor,
            )
            for i in range(images.shape[0])
        ]

    # ------------------------------------------------------------------ colours

    def color_embeddings(self, object_name: str, device: torch.device) -> Tensor:
        """``[len(COLORS), D]`` normalised zero-shot colour embeddings for ``object_name`` (cached)."""
        if object_name not in self._color_embeddings:
            prompts = [t.format(color=c, object=object_name) for c in COLORS for t in COLOR_TEMPLATES]
            text = self.clip.text_embeddings(prompts, device).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self._color_embeddings[object_name] = F.normalize(text.mean(dim=1), dim=-1)
        return self._color_embeddings[object_name]

    @torch.no_grad()
    def color_similarities(self, crops: Sequence[Tensor], object_names: Sequence[str]) -> Tensor:
        """``[N, len(COLORS)]`` cosine similarities of each masked crop ``[3, h, w]`` (crops may differ in
        size) with the colour embeddings of its object name."""
        if not crops:
            return torch.zeros(0, len(COLORS))
        # Each crop is resized on its own (they differ in size), then CLIP runs on batches of them.
        pixels = torch.cat([self.clip.preprocess(crop[None]) for crop in crops])
        embeddings = torch.cat([self.clip.pixel_embeddings(chunk) for chunk in pixels.split(self.clip_batch_size)])
        return torch.stack(
            [self.color_embeddings(name, embedding.device) @ embedding for embedding, name in zip(embeddings, object_names)]
        )

    def classify_colors(self, crops: Sequence[Tensor], object_names: Sequence[str]) -> list[str]:
        """GenEval's colour of each masked crop: the most similar colour embedding."""
        return [COLORS[int(i)] for i in self.color_similarities(crops, object_names).argmax(dim=-1)]

    # ------------------------------------------------------------------ detector

    def _capped(self, instances: Sequence[Instance], names: Sequence[str]) -> set[int]:
        """``id`` of the instances kept under the per-class cap: per class, the first
        ``max_per_class`` in GenEval's ranking (:func:`~dgpo_lightning.rewards.geneval_rules.geneval_ranking`),
        so that at a tie on the cap the detections the rules would rank first are the ones returned."""
        by_class: dict[str, list[Instance]] = {}
        for instance, name in zip(instances, names):
            by_class.setdefault(name, []).append(instance)
        selected: set[int] = set()
        for found in by_class.values():
            ranking = geneval_ranking([instance.score for instance in found])
            if self.max_per_class is not None:
                ranking = ranking[: self.max_per_class]
            selected.update(id(found[i]) for i in ranking)
        return selected

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[list[Detection]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"mask2former detector: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        self.load(images.device)
        found: list[list[tuple[str, float, tuple[int, int, int, int]]]] = []
        crops, names = [], []
        for image, instances in zip(images, self.segment(images)):
            instance_names = [self.class_name(instance.label) for instance in instances]
            selected = self._capped(instances, instance_names)
            kept = []
            for instance, name in zip(instances, instance_names):  # best first
                if id(instance) not in selected:
                    continue
                box = mask_box(instance.mask)
                kept.append((name, instance.score, box))
                crops.append(masked_crop(image, instance.mask, box))
                names.append(name)
            found.append(kept)
        colors = iter(self.classify_colors(crops, names))
        return [
            [Detection(name, score, tuple(float(v) for v in box), next(colors)) for name, score, box in kept]
            for kept in found
        ]


# Found by name through the detector registry: {"kind": "mask2former", "model_path": ..., "clip_path": ...}.
register_detector("mask2former", Mask2FormerClipDetector)
register_detector("mask2former_clip", Mask2FormerClipDetector)
