"""OCR accuracy reward (the text-rendering task of Flow-GRPO and DGPO).

The target is the text between double quotes in the prompt; OCR reads the image; both are
lower-cased with whitespace removed. The score is 1 if the target occurs in the recognised text,
else ``1 - min(d, n) / n`` with ``d`` the Levenshtein distance between recognised text and target
and ``n`` the target's length (so unrelated extra characters cost at most the whole target). This
follows the public reward of Flow-GRPO / DGPO (``flow_grpo/ocr.py``: all recognised lines joined,
edit distance clipped at the target length).

Engine: RapidOCR (PaddleOCR's PP-OCR models in ONNX, shipped inside the ``rapidocr`` wheel; runs on
CPU through onnxruntime, no download). The official code used PaddleOCR's English model; scores
are comparable in definition, not bit-for-bit. Any callable ``uint8 RGB [H, W, 3] -> str`` can be
passed as ``engine`` instead.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from dgpo_lightning.rewards.base import register

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def extract_quoted_text(prompt: str) -> str:
    """The first text between double quotes (straight ``"..."`` or typographic ``“...”``).

    Raises:
        ValueError: if the prompt has no quoted text, naming the prompt.
    """
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(f"OCR reward: no quoted target text in prompt {prompt!r}")
    return match.group(1) if match.group(1) is not None else match.group(2)


def normalize_text(text: str) -> str:
    """Lower-case and drop all whitespace."""
    return "".join(text.split()).lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions); O(len(a)·len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_accuracy(target: str, recognized: str) -> float:
    """``1`` if ``target`` occurs in ``recognized`` (both normalised), else ``1 - min(d, n) / n``.

    Raises:
        ValueError: if the target is empty after normalisation.
    """
    target, recognized = normalize_text(target), normalize_text(recognized)
    if not target:
        raise ValueError("OCR reward: the quoted target text is empty")
    if target in recognized:
        return 1.0
    return 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


def _rapidocr_engine(min_confidence: float, use_angle_cls: bool) -> Callable[[np.ndarray], str]:
    try:
        from rapidocr import RapidOCR
    except ImportError as error:
        raise ImportError(
            "the 'ocr' reward needs the rapidocr and onnxruntime packages (its models ship in the wheel): "
            "pip install -e '.[ocr]'"
        ) from error
    engine = RapidOCR(
        params={
            "Global.log_level": "critical",
            "Global.use_cls": use_angle_cls,
            "Global.text_score": float(min_confidence),
        }
    )

    def read(image: np.ndarray) -> str:
        result = engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR reads arrays as BGR
        texts = result.txts or ()
        scores = result.scores or (1.0,) * len(texts)
        return "".join(text for text, score in zip(texts, scores) if score > min_confidence)

    return read


class OcrReward:
    """``reward(images, prompts)``: OCR accuracy of the quoted text (see module docstring).

    Args:
        engine: ``"rapidocr"`` or a callable ``uint8 RGB [H, W, 3] -> str``.
        min_confidence: recognised lines at or below this confidence are dropped (the official code
            keeps every line with confidence > 0).
        use_angle_cls: run the text-direction classifier (off in the official code).
    """

    def __init__(
        self,
        engine: str | Callable[[np.ndarray], str] = "rapidocr",
        min_confidence: float = 0.0,
        use_angle_cls: bool = False,
    ):
        if isinstance(engine, str) and engine != "rapidocr":
            raise ValueError(f"unknown OCR engine {engine!r}; use 'rapidocr' or pass a callable")
        self.engine = engine
        self.min_confidence = min_confidence
        self.use_angle_cls = use_angle_cls
        self._read: Callable[[np.ndarray], str] | None = None if isinstance(engine, str) else engine

    def read_text(self, image: np.ndarray) -> str:
        """OCR one ``uint8`` RGB ``[H, W, 3]`` image; lines joined in reading order."""
        if self._read is None:  # lazily: the ONNX models load on first use
            self._read = _rapidocr_engine(self.min_confidence, self.use_angle_cls)
        return self._read(image)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"OCR reward: expected images [B, 3, H, W] with B = {len(prompts)} prompts, got {tuple(images.shape)}")
        targets = [extract_quoted_text(p) for p in prompts]
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        scores = [ocr_accuracy(target, self.read_text(image)) for target, image in zip(targets, pixels)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register("ocr")
def ocr_reward(
    engine: str | Callable[[np.ndarray], str] = "rapidocr", min_confidence: float = 0.0, use_angle_cls: bool = False
) -> OcrReward:
    """OCR accuracy of the quoted text in each prompt (Flow-GRPO / DGPO text-rendering reward)."""
    return OcrReward(engine=engine, min_confidence=min_confidence, use_angle_cls=use_angle_cls)
