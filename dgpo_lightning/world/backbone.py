"""The embedded world's text-to-image flow model behind the :class:`~dgpo_lightning.models.backbone.Backbone` protocol.

* ``denoiser``: a tiny diffusers ``UNet2DConditionModel`` on the image itself (latents are the
  32×32 RGB image scaled to ``[-1, 1]``), cross-attending to the text encoder's hidden states; it is
  called with timestep ``1000 · t`` and predicts the velocity ``v = ε − x0``. With ``patch_size=p``
  (shipped: 2) the UNet sees the ``p×p`` pixel-unshuffled latent ``[B, 3p², 32/p, 32/p]`` and its
  output is pixel-shuffled back: ``v = shuffle(UNet(unshuffle(x_t), 1000 t, c))``.
* ``text_encoder``: :class:`~dgpo_lightning.world.model.WorldTextEncoder`, trained jointly with the
  UNet during pretraining and frozen afterwards.
* CFG against the empty prompt (pretraining drops ~10% of captions):
  ``v = v(x, t, ∅) + s · (v(x, t, c) − v(x, t, ∅))``, one UNet call on the doubled batch.

On disk (``save_backbone`` / ``load_backbone``)::

    DIR/unet/{config.json, diffusion_pytorch_model.safetensors}
    DIR/text_encoder/{config.json, diffusion_pytorch_model.safetensors}
    DIR/backbone.json        # {"guidance_scale": ..., "shift": ..., ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import UNet2DConditionModel
import torch.nn.functional as F
from torch import Tensor, nn

from dgpo_lightning.errors import ConfigError
from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.world.model import WorldTextEncoder

#: The shipped pretrained base.
BASE_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "base"
BACKBONE_FILE = "backbone.json"
IMAGE_SIZE = 32

#: UNet settings of the shipped base (see checkpoints/base/MODEL_CARD.md for the measurements).
DEFAULT_UNET: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "transformer_layers_per_block": 1,
    "mid_block_type": None,  # the 4×4 mid attention block cost 25% of the time and added little
}
#: ``patch_size=2``: the UNet runs on the 2×2 pixel-unshuffled image (12×16×16), 3-4× faster than
#: on 3×32×32 at equal width, which is what makes a 16-image rollout fast on one CPU thread.
DEFAULT_OPTIONS: dict[str, Any] = {"guidance_scale": 1.0, "shift": 3.0, "patch_size": 2}
DEFAULT_TEXT_ENCODER: dict[str, Any] = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "max_length": 16}


class WorldBackbone(nn.Module):
    """Text-conditional rectified-flow model of the embedded world.

    Args:
        unet: the denoiser, ``UNet2DConditionModel`` with ``in_channels = out_channels = 3`` and
            ``cross_attention_dim`` equal to the text encoder's ``hidden_dim``.
        text_encoder: the word-level text encoder.
        guidance_scale: default CFG scale for sampling (``default_guidance_scale``).
        shift: recommended SD3 time shift of the sampling schedule (informational; samplers take it).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: WorldTextEncoder,
        *,
        guidance_scale: float = 1.0,
        shift: float = 3.0,
        patch_size: int = 1,
    ):
        super().__init__()
        if unet.config.in_channels % (patch_size * patch_size) or unet.config.in_channels != unet.config.out_channels:
            raise ValueError(f"unet channels {unet.config.in_channels}/{unet.config.out_channels} do not fit patch_size={patch_size}")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_dim:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} != "
                f"text_encoder.hidden_dim={text_encoder.config.hidden_dim}"
            )
        self.denoiser = unet
        self.text_encoder = text_encoder
        self.default_guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self.patch_size = int(patch_size)

    # ------------------------------------------------------------------ protocol

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``{"prompt_embeds": [B, L, D], "attention_mask": [B, L] (1 = token, 0 = padding)}``.

        Gradients flow into the text encoder when its parameters require them (pretraining).
        """
        hidden, mask = self.text_encoder.encode(list(prompts))
        return {"prompt_embeds": hidden, "attention_mask": mask.to(hidden.dtype)}

    def _unet(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # Cast at the network boundary (the UNet may be bf16); callers keep their own dtype.
        dtype = self.denoiser.conv_in.weight.dtype
        x = x_t.to(dtype)
        mask = cond.get("attention_mask")
        p = self.patch_size
        v = self.denoiser(
            F.pixel_unshuffle(x, p) if p > 1 else x,
            1000.0 * t.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=mask.to(dtype) if mask is not None else None,
            return_dict=False,
        )[0]
        return (F.pixel_shuffle(v, p) if p > 1 else v).to(x_t.dtype)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v(x_t, t, c)`` for ``x_t [B, 3, 32, 32]``, ``t [B]`` in ``[0, 1]`` (``t = 1`` is noise).

        With ``guidance_scale != 1``: ``v_∅ + s (v_c − v_∅)``, the unconditional branch using the
        empty prompt's embedding (computed by the current text encoder).
        """
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t.reshape(-1)
        if guidance_scale == 1.0:
            return self._unet(x_t, t, cond)
        empty = self.encode_prompts([""])
        batch = x_t.shape[0]
        both = {
            "prompt_embeds": torch.cat([empty["prompt_embeds"].expand(batch, -1, -1), cond["prompt_embeds"]]),
            "attention_mask": torch.cat([empty["attention_mask"].expand(batch, -1), cond["attention_mask"]]),
        }
        v_uncond, v_cond = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def latent_shape(self) -> tuple[int, int, int]:
        p = self.patch_size
        size = self.denoiser.config.sample_size * p
        return (self.denoiser.config.in_channels // (p * p), size, size)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents in ``[-1, 1]`` → images ``((x + 1) / 2).clamp(0, 1)``."""
        return ((latents + 1) / 2).clamp(0, 1)

    def encode(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` → latents ``2 · img − 1``."""
        return images * 2 - 1

    # ------------------------------------------------------------------ options

    def options(self) -> dict[str, Any]:
        """The small non-network settings saved to ``backbone.json``."""
        return {"guidance_scale": self.default_guidance_scale, "shift": self.shift, "patch_size": self.patch_size}


def build_backbone(
    unet: dict[str, Any] | None = None,
    text_encoder: dict[str, Any] | None = None,
    **options: Any,
) -> WorldBackbone:
    """A randomly initialised :class:`WorldBackbone`; ``unet``/``text_encoder`` override the defaults."""
    encoder = WorldTextEncoder(**{**DEFAULT_TEXT_ENCODER, **(text_encoder or {})})
    p = int(options.get("patch_size", DEFAULT_OPTIONS["patch_size"]))
    options = {**DEFAULT_OPTIONS, **options}
    unet_config = {
        **DEFAULT_UNET,
        "sample_size": IMAGE_SIZE // p,
        "in_channels": 3 * p * p,
        "out_channels": 3 * p * p,
        "cross_attention_dim": encoder.config.hidden_dim,
        **(unet or {}),
    }
    return WorldBackbone(UNet2DConditionModel(**unet_config), encoder, **options)


def tiny_backbone(**options: Any) -> WorldBackbone:
    """A very small random backbone with the shipped architecture's structure (tests, CI)."""
    return build_backbone(
        unet={"block_out_channels": (8, 16, 16), "norm_num_groups": 4, "attention_head_dim": 4},
        text_encoder={"hidden_dim": 16, "num_layers": 1, "num_heads": 2},
        **options,
    )


def save_backbone(backbone: WorldBackbone, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``backbone`` to ``path`` (``unet/``, ``text_encoder/`` as safetensors + ``backbone.json``).

    Args:
        dtype: store the weights in this dtype (e.g. ``torch.float16``); ``None`` keeps them.
    """
    from dgpo_lightning.models.lora import has_lora

    if has_lora(backbone.denoiser):
        raise ValueError("the denoiser carries LoRA adapters: fold/merge them first (callbacks.export does)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", backbone.denoiser), ("text_encoder", backbone.text_encoder)):
        if dtype is not None:
            import copy

            module = copy.deepcopy(module).to(dtype)
        module.save_pretrained(path / name, safe_serialization=True)
    (path / BACKBONE_FILE).write_text(json.dumps(backbone.options(), indent=2) + "\n", encoding="utf-8")
    return path


def _read_options(file: Path) -> dict[str, Any]:
    """``backbone.json`` as a dict (empty when absent); a corrupt file is a ConfigError naming it."""
    if not file.is_file():
        return {}
    try:
        options = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); re-save the model with save_backbone") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{file} must hold a JSON object of backbone options, got {type(options).__name__}")
    return options


def shipped_checkpoint(path: str | Path | None) -> Path:
    """``None`` → the shipped base; ``"world:NAME"`` → the shipped checkpoint ``NAME``; else ``path``."""
    if path is None:
        return BASE_CHECKPOINT
    if isinstance(path, str) and path.startswith("world:"):
        name = path.removeprefix("world:")
        shipped = sorted(p.name for p in BASE_CHECKPOINT.parent.iterdir() if p.is_dir())
        if name not in shipped:
            raise FileNotFoundError(f"{path!r}: no shipped world checkpoint {name!r}; shipped: {', '.join(shipped)}")
        return BASE_CHECKPOINT.parent / name
    return Path(path)


def load_backbone(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    guidance_scale: float | None = None,
) -> WorldBackbone:
    """Load a backbone saved by :func:`save_backbone`; ``path=None`` is the shipped base and
    ``"world:NAME"`` a shipped checkpoint by name (``world:base``, ``world:student4``).

    The returned model is in eval mode with all parameters frozen (``requires_grad=False``); callers
    that train unfreeze what they train. ``guidance_scale`` overrides the stored default.
    """
    path = shipped_checkpoint(path)
    if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
        raise FileNotFoundError(f"{path} is not a world backbone checkpoint (needs unet/ and text_encoder/)")
    options = _read_options(path / BACKBONE_FILE)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    encoder = WorldTextEncoder.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    known = {"guidance_scale", "shift", "patch_size"}
    backbone = WorldBackbone(unet, encoder, **{k: v for k, v in options.items() if k in known})
    return backbone.to(device).eval().requires_grad_(False)
