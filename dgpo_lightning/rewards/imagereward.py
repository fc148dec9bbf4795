"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation") on transformers' BLIP parts.

The model is BLIP's image-grounded text encoder with a scalar head:

* image ``x [B, 3, 224, 224]`` (bicubic resize of the shortest side, centre crop, CLIP's mean/std) →
  ViT-L/16 (pre-norm blocks, fused qkv, final LayerNorm, eps 1e-6) → ``v [B, 1 + 14², 1024]``;
* prompt → BERT WordPiece ids ``t [B, 35]`` (``bert-base-uncased`` + BLIP's ``[DEC]``/``[ENC]``,
  padded to 35, truncated) → BERT-base whose layers are self-attention, cross-attention to ``v``,
  FFN (post-norm) → ``h [B, 35, 768]``;
* ``raw = MLP(h[:, 0])`` with Linear 768→1024→128→64→16→1 (dropout between, no activations) and
  ``score = (raw - 0.16717362830052426) / 1.0333394966054072``.

The released ImageReward feeds the tokenizer's ids unchanged (``[CLS]`` first) to the text encoder;
``first_token="enc"`` instead puts ``[ENC]`` first, as BLIP's ITM head does.

Weights: ``ImageReward.pt`` (THUDM/ImageReward; a state dict with BLIP/LAVIS names ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``) or the same tensors as ``.safetensors``; :func:`convert_checkpoint`
renames them to transformers' ``BlipVisionModel``/``BlipTextModel``. The ``med_config.json`` shipped with
it is the BERT config of the text encoder. Nothing is downloaded: every path is local, loaded on first call.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgpo_lightning.rewards.base import check_images, place_model, register
from dgpo_lightning.rewards.clip_scores import clip_preprocess, resolve_local_path

#: Normalisation of the raw head output, from the released model.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: BLIP's ViT-L/16 (``vit='large'``) as a ``BlipVisionConfig``; ``image_size`` comes from the option.
VIT_LARGE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
}
#: Output widths of the head's Linear layers (input: the text encoder's hidden size).
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
_HEAD_DROPOUT = (0.2, 0.2, 0.1)
#: ``med_config.json`` (BERT config) keys that carry over to ``BlipTextConfig`` unchanged.
_MED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "initializer_range",
)
#: Parts of the checkpoint that ImageReward's score does not use (BLIP's contrastive projections and
#: the text embeddings' position-id buffer); they are skipped, everything else must map.
_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")

_VISION_RENAMES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)
# BLIP's med.py and transformers' BlipTextModel share BERT's names, so the text keys keep their names.
_TEXT_KEY = re.compile(
    r"embeddings\.(word_embeddings|position_embeddings)\.weight"
    r"|embeddings\.LayerNorm\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(intermediate|output)\.dense\.(weight|bias)"
    r"|encoder\.layer\.\d+\.output\.LayerNorm\.(weight|bias)"
)
_HEAD_KEY = re.compile(r"mlp\.layers\.(\d+)\.(weight|bias)")


def map_checkpoint_key(key: str) -> tuple[str, str] | None:
    """``(part, name)`` of an original ImageReward key in our model (``part`` one of ``vision``,
    ``text``, ``head``), ``None`` for a known unused key; a key of neither kind raises ``KeyError``.

    E.g. ``blip.visual_encoder.blocks.3.attn.qkv.weight`` → ``("vision", "encoder.layers.3.self_attn.qkv.weight")``,
    ``blip.text_encoder.encoder.layer.0.crossattention.self.key.bias`` → the same name under ``text``,
    ``mlp.layers.4.weight`` → ``("head", "4.weight")``.
    """
    if _UNUSED.fullmatch(key):
        return None
    if key.startswith("blip.visual_encoder."):
        name = key[len("blip.visual_encoder.") :]
        for pattern, target in _VISION_RENAMES:
            if re.fullmatch(pattern, name):
                return "vision", re.sub(pattern, target, name)
    elif key.startswith("blip.text_encoder."):
        name = key[len("blip.text_encoder.") :]
        if _TEXT_KEY.fullmatch(name):
            return "text", name
    elif (match := _HEAD_KEY.fullmatch(key)) is not None:
        return "head", f"{match.group(1)}.{match.group(2)}"
    raise KeyError(key)


def convert_checkpoint(state: Mapping[str, Tensor], what: str = "imagereward") -> dict[str, dict[str, Tensor]]:
    """Split an original-named ImageReward state dict into ``{"vision", "text", "head"}`` state dicts
    with transformers' names (see :func:`map_checkpoint_key`); unknown keys raise, listing them."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state.items():
        try:
            mapped = map_checkpoint_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if mapped is not None:
            parts[mapped[0]][mapped[1]] = value
    if unknown:
        raise ValueError(f"{what}: the checkpoint has keys that are not ImageReward's: {', '.join(sorted(unknown))}")
    return parts


def build_head(in_features: int) -> nn.Sequential:
    """ImageReward's MLP: ``Linear(in, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)`` (indices as in ``mlp.layers.N``)."""
    layers: list[nn.Module] = []
    width = in_features
    for i, out in enumerate(HEAD_WIDTHS):
        layers.append(nn.Linear(width, out))
        if i < len(_HEAD_DROPOUT):
            layers.append(nn.Dropout(_HEAD_DROPOUT[i]))
        width = out
    return nn.Sequential(*layers)


def _read_json(value: str | Path | Mapping[str, Any] | None, option: str) -> dict[str, Any]:
    if value is None:
        raise ValueError(f"imagereward: pass {option}=<ImageReward's med_config.json> (or the config as a dict)")
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"imagereward: {option}={str(value)!r} does not exist")
    return json.loads(path.read_text())


def _dtype(value: torch.dtype | str) -> torch.dtype:
    return getattr(torch, value.removeprefix("torch.")) if isinstance(value, str) else value  # YAML


class ImageRewardModel(nn.Module):
    """BLIP ViT + image-grounded BERT + MLP head: ``raw(pixels [B, 3, S, S], ids [B, L], mask [B, L]) -> [B]``."""

    def __init__(self, vision_config: Any, text_config: Any):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = build_head(text_config.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image = self.vision(pixel_values=pixels.to(dtype)).last_hidden_state  # [B, 1 + P, Dv], post-norm
        # is_decoder=False: bidirectional self-attention; the cross-attention layers exist because the
        # config says is_decoder=True. Every image token is attended to, so no encoder mask.
        hidden = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image, is_decoder=False
        ).last_hidden_state
        return self.head(hidden[:, 0].float()).squeeze(-1)


class ImageRewardScorer:
    """``reward(images [B, 3, H, W] in [0, 1], prompts) -> (raw - mean) / std`` of ImageReward, ``[B]``.

    Args:
        checkpoint_path: ``ImageReward.pt`` (or a ``.safetensors`` with its keys).
        med_config: ``med_config.json`` of the release (BERT config of the text encoder), or a dict.
        tokenizer_path: local ``bert-base-uncased`` tokenizer directory (``vocab.txt`` is enough);
            ``[DEC]`` (bos) and ``[ENC]`` are added when absent, as BLIP does, giving ids 30522/30523.
        vision_config: ``BlipVisionConfig`` overrides of BLIP's ViT-L/16 (:data:`VIT_LARGE`).
        text_config: ``BlipTextConfig`` overrides applied after ``med_config``.
        image_size: input resolution (224 for the release).
        first_token: ``"cls"`` (the released model) or ``"enc"`` (``[ENC]`` replaces ``[CLS]``, BLIP ITM).
        max_length: prompt length in tokens, padded and truncated to (35 for the release).
        device: where the model runs; ``None`` follows the images.
        dtype: dtype of the BLIP encoders (the head runs in float32).
    """

    def __init__(
        self,
        checkpoint_path: str | Path | None = None,
        med_config: str | Path | Mapping[str, Any] | None = None,
        tokenizer_path: str | Path | None = None,
        vision_config: Mapping[str, Any] | None = None,
        text_config: Mapping[str, Any] | None = None,
        image_size: int = 224,
        first_token: str = "cls",
        max_length: int = MAX_LENGTH,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str = torch.float32,
    ):
        if first_token not in ("cls", "enc"):
            raise ValueError(f"imagereward: first_token={first_token!r} is not 'cls' or 'enc'")
        self.checkpoint_path = checkpoint_path
        self.med_config = med_config
        self.tokenizer_path = tokenizer_path
        self.vision_overrides = dict(vision_config or {})
        self.text_overrides = dict(text_config or {})
        self.image_size = int(image_size)
        if int(self.vision_overrides.get("image_size", self.image_size)) != self.image_size:
            raise ValueError(
                f"imagereward: vision_config image_size={self.vision_overrides['image_size']} differs from "
                f"image_size={self.image_size}; set image_size"
            )
        self.first_token = first_token
        self.max_length = int(max_length)
        self.device_override = torch.device(device) if device is not None else None
        self.dtype = _dtype(dtype)
        self.model: ImageRewardModel | None = None
        self.tokenizer: Any = None
        self.preprocess_config = {
            "size": {"shortest_edge": self.image_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        }

    def configs(self, vocab_size: int | None = None, special_ids: Mapping[str, int] | None = None) -> tuple[Any, Any]:
        """``(BlipVisionConfig, BlipTextConfig)``: ViT-L/16 + ``vision_config``; ``med_config`` +
        ``text_config``, with cross-attention (``is_decoder=True``) whose key/value width is the ViT's.
        ``vocab_size`` and the tokenizer's ``special_ids`` fill what ``med_config`` leaves out."""
        from transformers import BlipTextConfig, BlipVisionConfig

        vision = BlipVisionConfig(**{**VIT_LARGE, "image_size": self.image_size, **self.vision_overrides})
        med = _read_json(self.med_config, "med_config")
        text_kwargs = {key: med[key] for key in _MED_KEYS if key in med}
        if vocab_size is not None and "vocab_size" not in med:
            text_kwargs["vocab_size"] = vocab_size
        # ImageReward overrides med_config's encoder_width with the ViT's width (1024 for ViT-L).
        text_kwargs.update(encoder_hidden_size=vision.hidden_size, is_decoder=True, use_cache=False)
        text_kwargs.update({key: value for key, value in (special_ids or {}).items() if key not in med})
        text_kwargs.update(self.text_overrides)
        text = BlipTextConfig(**text_kwargs)
        if vocab_size is not None and vocab_size > text.vocab_size:
            raise ValueError(
                f"imagereward: the tokenizer has {vocab_size} tokens but the text encoder's vocab_size is "
                f"{text.vocab_size} (med_config / text_config)"
            )
        for config in (vision, text):
            config._attn_implementation = "eager"  # BLIP's text attention adds a float mask
        return vision, text

    def load_tokenizer(self) -> Any:
        from transformers import BertTokenizer

        path = resolve_local_path(self.tokenizer_path, "imagereward", "tokenizer_path")
        try:
            if Path(path).is_file():  # a bare vocab.txt: one WordPiece token a line, ids in order
                lines = Path(path).read_text(encoding="utf-8").splitlines()
                tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(lines)})
            else:
                tokenizer = BertTokenizer.from_pretrained(path)
        except OSError as error:
            raise FileNotFoundError(f"imagereward: no BERT tokenizer at tokenizer_path={path!r}: {error}") from error
        vocab = tokenizer.get_vocab()
        # BLIP's init_tokenizer: bos [DEC], then [ENC]; added only when absent so saved copies keep their ids.
        if "[DEC]" not in vocab:
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tokenizer

    def load(self, device: torch.device) -> None:
        if self.model is None:
            if self.checkpoint_path is None:
                raise ValueError("imagereward: pass checkpoint_path=<local ImageReward.pt> (weights are never downloaded)")
            path = Path(resolve_local_path(self.checkpoint_path, "imagereward", "checkpoint_path"))
            if not path.is_file():
                raise FileNotFoundError(f"imagereward: checkpoint_path={str(path)!r} is not a file (ImageReward.pt)")
            self.tokenizer = self.load_tokenizer()
            tokens = self.tokenizer
            special = {
                "bos_token_id": tokens.bos_token_id, "sep_token_id": tokens.sep_token_id,
                "pad_token_id": tokens.pad_token_id,
            }
            vision_config, text_config = self.configs(vocab_size=len(tokens), special_ids=special)
            model = ImageRewardModel(vision_config, text_config)
            load_weights(model, path)
            self.model = model.to(self.dtype).eval().requires_grad_(False)
            self.model.head.float()
        place_model(self.model, self.device_override or device)

    def tokenize(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``[B, max_length]``: padded to ``max_length``, truncated."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(device)
        if self.first_token == "enc":
            ids[:, 0] = self.tokenizer.convert_tokens_to_ids("[ENC]")
        return ids, tokens["attention_mask"].to(device)

    @torch.no_grad()
    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        check_images("imagereward", images, prompts)
        self.load(images.device)
        device = next(self.model.parameters()).device
        pixels = clip_preprocess(images.to(device), self.preprocess_config)
        ids, mask = self.tokenize(prompts, device)
        raw = self.model(pixels, ids, mask)
        return ((raw - SCORE_MEAN) / SCORE_STD).to(images.device)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file (a state dict, possibly under ``state_dict``/``model``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"imagereward: {path} does not hold a state dict")
    return state


def load_weights(model: ImageRewardModel, path: str | Path) -> None:
    """Load an original-named ImageReward checkpoint into ``model``; unknown, missing or mis-shaped
    tensors raise, naming the keys."""
    parts = convert_checkpoint(read_state_dict(path))
    problems = []
    for part, module in (("vision", model.vision), ("text", model.text), ("head", model.head)):
        expected = module.state_dict()
        missing = sorted(set(expected) - set(parts[part]))
        if missing:
            problems.append(f"missing {part} tensors {', '.join(missing)}")
        shapes = [
            f"{part}.{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in parts[part].items()
            if k in expected and v.shape != expected[k].shape
        ]
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs config) {'; '.join(shapes)}")
        if not missing and not shapes:
            module.load_state_dict(parts[part], strict=True)
    if problems:
        raise ValueError(f"imagereward: checkpoint_path={str(path)!r} does not fit the model: {' | '.join(problems)}")


@register("imagereward")
def imagereward_reward(
    checkpoint_path: str | None = None,
    med_config: str | Mapping[str, Any] | None = None,
    tokenizer_path: str | None = None,
    vision_config: Mapping[str, Any] | None = None,
    text_config: Mapping[str, Any] | None = None,
    image_size: int = 224,
    first_token: str = "cls",
    max_length: int = MAX_LENGTH,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> ImageRewardScorer:
    """ImageReward with local weights (``checkpoint_path``: ``ImageReward.pt``, ``med_config``: its
    ``med_config.json``, ``tokenizer_path``: a ``bert-base-uncased`` tokenizer directory)."""
    return ImageRewardScorer(
        checkpoint_path, med_config, tokenizer_path, vision_config, text_config, image_size, first_token,
        max_length, device, dtype,
    )
