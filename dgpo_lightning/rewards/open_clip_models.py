"""open_clip models as reward backbones, and the HPS reward (HPSv2 / HPSv2.1).

:class:`OpenClipBackend` has the interface of the transformers
:class:`~dgpo_lightning.rewards.clip_scores.ClipBackend` (``image_embeddings``, ``text_embeddings``,
``logit_scale``), so every CLIP-family reward (``clip_score``, ``pickscore``, ``aesthetic`` and
GenEval's colour classifier in the Mask2Former detector) runs on either library (``backend:
open_clip``). Images are preprocessed by open_clip's own eval transform (resize, centre crop,
normalise), which accepts float tensors, so images stay on their device and in float.

Weights come from a local file (``model_path``: a ``.pt``/``.bin``/``.safetensors`` state dict, an
``{"state_dict": ...}`` training checkpoint as HPS releases, or a ``local-dir:`` folder) or from a
pretrained tag already in the local hub cache (``model_path: laion2b_s32b_b79k``: found with
``local_files_only``, never downloaded).

``hpsv2``: Human Preference Score v2 (Wu et al. 2023): ``cos(image, prompt)`` of open_clip ViT-H-14
fine-tuned on HPD v2 (checkpoints ``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` of
``xswu/HPSv2``), the score HPSv2's ``img_score`` and Flow-GRPO's HPS scorer report (≈0.25–0.35).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgpo_lightning.rewards.base import check_images, place_model, register

#: HPSv2's architecture: open_clip ViT-H-14 (the released checkpoints are its fine-tuned weights).
HPS_MODEL_NAME = "ViT-H-14"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


class OpenClipBackend(nn.Module):
    """An open_clip CLIP model + tokenizer + eval transform, loaded on first use.

    Args:
        model_name: open_clip architecture (``open_clip.list_models()``, e.g. ``ViT-H-14``; OpenAI's
            weights need the ``-quickgelu`` variant, e.g. ``ViT-L-14-quickgelu``) or ``local-dir:PATH``.
        model_path: local weights file, or a pretrained tag of ``model_name`` in the local hub cache.
        model_config: an architecture as a dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, as
            open_clip's model configs) instead of ``model_name``: small models in tests, custom ones.
        device: where the model runs; ``None`` follows the images.
        dtype: model dtype (or its name, for YAML).
        what, path_option: the reward's name and the option that holds ``model_path``, for error messages.
    """

    def __init__(
        self,
        model_name: str | None = None,
        model_path: str | Path | None = None,
        model_config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
        what: str = "open_clip",
        path_option: str = "model_path",
    ):
        super().__init__()
        if (model_name is None) == (model_config is None):
            raise ValueError(f"{what}: pass exactly one of model_name=<open_clip architecture> or model_config=<dict>")
        self.what, self.path_option = what, path_option
        self.model_name = model_name
        self.model_path = model_path
        self.model_config = dict(model_config) if model_config is not None else None
        self.device_override = torch.device(device) if device is not None else None
        self.dtype = _dtype(dtype)
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.transform: Any = None
        self.quick_gelu = False

    # ------------------------------------------------------------------ loading

    def _weights_file(self) -> str | None:
        """The local file to load: ``model_path`` itself, or the cached file of a pretrained tag."""
        import open_clip

        if self.model_path is None:
            if self.model_name is not None and self.model_name.startswith("local-dir:"):
                return None  # open_clip loads the folder's weights itself
            raise ValueError(f"{self.what}: pass {self.path_option}=<local weights file or cached pretrained tag> (never downloaded)")
        path = Path(str(self.model_path)).expanduser()
        if path.exists():
            return str(path)
        tag = str(self.model_path)
        config = open_clip.get_pretrained_cfg(self.model_name or "", tag) if self.model_name else {}
        if not config:
            raise FileNotFoundError(
                f"{self.what}: {self.path_option}={tag!r} is neither a local file nor a pretrained tag of {self.model_name!r} "
                f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(self.model_name or '')) or 'none'})"
            )
        self.quick_gelu = bool(config.get("quick_gelu", False))  # OpenAI's weights were trained with it
        hub = config.get("hf_hub", "").rstrip("/")
        if not hub:
            raise FileNotFoundError(f"{self.what}: tag {tag!r} has no hub copy to find in the cache; pass a local file")
        from huggingface_hub import hf_hub_download

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                return hf_hub_download(hub, filename, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached under this name; try the next one
                continue
        raise FileNotFoundError(
            f"{self.what}: the weights of {self.model_name!r}/{tag!r} ({hub}) are not in the local hub cache; "
            f"download them once elsewhere or pass a local file as {self.path_option}"
        )

    def load(self, device: torch.device) -> None:
        if self.model is None:
            import open_clip

            weights = self._weights_file()
            try:
                if self.model_config is not None:
                    model = open_clip.CLIP(**self.model_config)
                    self.tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
                else:
                    model = open_clip.create_model(
                        self.model_name, pretrained=None, load_weights=False, force_quick_gelu=self.quick_gelu
                    )
                    self.tokenizer = open_clip.get_tokenizer(self.model_name)
                if weights is not None:
                    open_clip.load_checkpoint(model, weights)
            except RuntimeError as error:  # a state dict of another architecture
                raise ValueError(f"{self.what}: the weights in {weights!r} do not fit the model: {error}") from error
            preprocess = open_clip.get_model_preprocess_cfg(model)
            self.transform = open_clip.image_transform(
                preprocess["size"],
                is_train=False,
                mean=preprocess.get("mean"),
                std=preprocess.get("std"),
                resize_mode=preprocess.get("resize_mode"),
                interpolation=preprocess.get("interpolation"),
                fill_color=preprocess.get("fill_color", 0),
            )
            self.model = model.to(self.dtype).eval().requires_grad_(False)
        place_model(self.model, self.device_override or device)

    # ------------------------------------------------------------------ embeddings

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → the model's normalised input pixels, on its device."""
        self.load(images.device)
        device = next(self.model.parameters()).device
        return self.transform(images.to(device).float().clamp(0, 1))

    @torch.no_grad()
    def pixel_embeddings(self, pixels: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32) of preprocessed pixels."""
        self.load(pixels.device)
        device = next(self.model.parameters()).device
        return F.normalize(self.model.encode_image(pixels.to(device, self.dtype)).float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32)."""
        return self.pixel_embeddings(self.preprocess(images))

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """L2-normalised text embeddings ``[B, D]`` (float32); prompts longer than the context are cut."""
        self.load(device)
        model_device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts)).to(model_device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class HPSReward:
    """``scale · cos(image, prompt)`` with the HPS model (HPSv2 or HPSv2.1, by checkpoint)."""

    def __init__(self, backend: OpenClipBackend, scale: float = 1.0):
        self.clip = backend
        self.scale = float(scale)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        check_images("hpsv2", images, prompts)
        image = self.clip.image_embeddings(images)
        text = self.clip.text_embeddings(prompts, images.device)
        return (self.scale * (image * text).sum(-1)).to(images.device)


@register("hpsv2")
def hps_reward(
    model_path: str | None = None,
    model_name: str | None = HPS_MODEL_NAME,
    model_config: Mapping[str, Any] | None = None,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    scale: float = 1.0,
) -> HPSReward:
    """HPSv2/HPSv2.1 (``model_path``: ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``)."""
    name = None if model_config is not None else model_name
    return HPSReward(OpenClipBackend(name, model_path, model_config, device, dtype, what="hpsv2"), scale)
