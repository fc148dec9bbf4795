"""The video world's text-to-video flow model behind the Backbone protocol (video contract).

Latents are the clip itself in ``[-1, 1]``, ``[B, C=3, F, 32, 32]`` (``latent_shape() == (3, F, 32,
32)``); ``decode`` returns videos ``[B, F, 3, H, W]`` in ``[0, 1]`` and ``encode`` is its inverse.

The denoiser is the image world's UNet in one of two layouts (``layout`` in ``backbone.json``).

``canvas``: the clip's frames side by side, ``[B, 3, H, F·W]``, through one UNet call, plus one
input channel holding each pixel's frame position ``2f/(F−1) − 1`` (the UNet has no positional
embedding). Convolutions and self-attention then see every frame at once, so the frames agree on
one layout as the image model's objects do, and a motion is a spatial relation between two regions
of the canvas (as "A left of B" is for the image model). It starts exactly as the image model run on
the canvas (zero weights on the position channel).

``frame_levels`` lets the frames of one clip be denoised at different noise levels
(:meth:`VideoWorldBackbone.frame_velocity`): on the canvas one more input channel holds each frame's
level and the UNet's timestep embedding gets the clip's highest; in the factorised layout each
frame's call gets its own level as the timestep and one more channel holds the clip's mean level
(which, with the frame's own, says how noisy the mean frame is). Pretraining then noises one frame
less than the other for part of the batch (diffusion forcing, Chen et al. 2024): the noisier frame
can only be predicted well from the cleaner one, which is the cross-frame signal equal noise levels
barely give. Sampling, RL and every ``velocity`` call use equal levels.

``coordinates`` adds two input channels holding each pixel's row and column within its frame. The
UNet has no positional embedding, so without them the text can name a class or a colour but hardly
a place: the canvas base drew "moving left" and "moving right" with the same mean positions in both
frames (checkpoints/base/MODEL_CARD.md; neither option changed that in 10–20 minutes of pretraining).

``factorised`` (the first video base): a factorised space-time model: the image world's UNet (:mod:`dgpo_lightning.world.backbone`,
2×2 pixel-unshuffle, timestep ``1000 t``, cross-attention to the text) runs on every frame as a
batch of ``B·F`` images, and each frame's call also sees

* the clip's mean frame ``x̄_t = mean_f x_t[:, :, f]`` as 12 extra input channels (how the frames
  agree on one scene: layout, colours, the object's track), and
* its frame index ``f`` as a class label (``num_class_embeds = F``, added to the time embedding),
  which tells it where on the track it is.

So ``v[:, :, f] = shuffle(UNet([unshuffle(x_t[:, :, f]), unshuffle(x̄_t)], 1000 t, c, class=f))``.
Each frame keeps its own noise path through the UNet, and the model starts exactly as the image
model on every frame when the extra input weights and the frame embedding are zero
(:func:`dgpo_lightning.world.video.pretrain.init_from_image_model`). (Frames stacked in channels,
``[B, 12F, 16, 16]`` through one UNet call, was measured first: at F = 4 its 32-channel first block
cannot carry every frame's noise and the loss stalled at ≈ 0.6–0.8; see checkpoints/base/MODEL_CARD.md.)
The text encoder is the image world's :class:`~dgpo_lightning.world.model.WorldTextEncoder` with the
video words added to its vocabulary. CFG, saving (:func:`save_backbone`, the image world's format
plus ``num_frames`` in ``backbone.json``) and freezing follow the image world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
import torch.nn.functional as Fn
from torch import Tensor, nn

from dgpo_lightning.models.backbone import Conditioning
from dgpo_lightning.world.backbone import BACKBONE_FILE, DEFAULT_UNET, WorldBackbone, _read_options
from dgpo_lightning.world.backbone import save_backbone as _save_world_backbone
from dgpo_lightning.world.model import WorldTextEncoder, world_vocabulary
from dgpo_lightning.world.video.prompts import VIDEO_WORDS
from dgpo_lightning.world.video.scene import FRAMES, SIZE

#: The shipped video base.
BASE_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "base"
DEFAULT_OPTIONS: dict[str, Any] = {"guidance_scale": 1.0, "shift": 3.0, "patch_size": 2}
DEFAULT_TEXT_ENCODER: dict[str, Any] = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "max_length": 16}
#: Widths of the shipped video UNet (see checkpoints/base/MODEL_CARD.md for the measured alternatives).
DEFAULT_CHANNELS: tuple[int, ...] = (32, 64, 64)
#: How the denoiser sees a clip: ``factorised`` (one UNet call per frame, plus the mean frame and the
#: frame index) or ``canvas`` (one call on the frames side by side plus a frame-position channel).
LAYOUTS = ("factorised", "canvas")
LAYOUT_IN_CHANNELS = {"factorised": lambda pixels: 2 * pixels, "canvas": lambda pixels: pixels + 1}


def video_vocabulary() -> list[str]:
    """The image world's vocabulary plus the video prompts' words (special tokens first)."""
    words = world_vocabulary()
    return words[:3] + sorted(set(words[3:]) | set(VIDEO_WORDS))


class VideoWorldBackbone(WorldBackbone):
    """Text-conditional rectified-flow model of the video world (``is_video = True``).

    Args:
        unet: ``UNet2DConditionModel`` with ``in_channels = 2 · 3p²`` (the frame and the mean frame),
            ``out_channels = 3p²`` and ``num_class_embeds = num_frames``.
        text_encoder, guidance_scale, shift, patch_size: as :class:`~dgpo_lightning.world.backbone.WorldBackbone`.
        num_frames: ``F``.
    """

    is_video = True

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: WorldTextEncoder,
        *,
        num_frames: int = FRAMES,
        guidance_scale: float = 1.0,
        shift: float = 3.0,
        patch_size: int = 2,
        layout: str = "factorised",
        frame_levels: bool = False,
        coordinates: bool = False,
    ):
        nn.Module.__init__(self)  # WorldBackbone's own check wants in_channels == out_channels
        pixels = 3 * patch_size * patch_size
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
        want = LAYOUT_IN_CHANNELS[layout](pixels) + int(frame_levels) + 2 * int(coordinates)
        if unet.config.in_channels != want or unet.config.out_channels != pixels:
            raise ValueError(
                f"unet channels {unet.config.in_channels}/{unet.config.out_channels} must be {want}/{pixels} "
                f"for layout {layout!r}, patch_size={patch_size}, frame_levels={frame_levels}, coordinates={coordinates}"
            )
        if layout == "factorised" and unet.config.num_class_embeds != num_frames:
            raise ValueError(f"unet.num_class_embeds={unet.config.num_class_embeds} != num_frames={num_frames}")
        if unet.config.cross_attention_dim != text_encoder.config.hidden_dim:
            raise ValueError(
                f"unet.cross_attention_dim={unet.config.cross_attention_dim} != text_encoder.hidden_dim={text_encoder.config.hidden_dim}"
            )
        self.denoiser = unet
        self.text_encoder = text_encoder
        self.default_guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self.patch_size = int(patch_size)
        self.num_frames = int(num_frames)
        self.layout = layout
        self.frame_levels = bool(frame_levels)
        self.coordinates = bool(coordinates)

    def _coordinate_channels(self, batch: int, h: int, w: int, frames: int, device, dtype) -> Tensor:
        """``[batch, 2, h, frames·w]``: each (unshuffled) pixel's row and column within its frame in
        ``[-1, 1]``, the frames side by side (the UNet has no positional embedding of its own)."""
        rows = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype).view(h, 1).expand(h, w)
        cols = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype).view(1, w).expand(h, w)
        return torch.stack([rows, cols]).repeat(1, 1, frames).expand(batch, 2, h, frames * w)

    def _unet(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``[B, 3, F, H, W]`` → velocity of the same shape, by the backbone's ``layout`` (every frame at ``t``)."""
        if x_t.ndim != 5 or x_t.shape[2] != self.num_frames:
            raise ValueError(f"expected video latents [B, 3, {self.num_frames}, H, W], got {tuple(x_t.shape)}")
        return self._unet_at_levels(x_t, t[:, None].expand(-1, self.num_frames), cond)

    def _unet_at_levels(self, x_t: Tensor, levels: Tensor, cond: Conditioning) -> Tensor:
        if self.layout == "canvas":
            return self._unet_canvas(x_t, levels, cond)
        return self._unet_factorised(x_t, levels, cond)

    def _unet_factorised(self, x_t: Tensor, levels: Tensor, cond: Conditioning) -> Tensor:
        """One UNet call per frame (a batch of ``B·F`` images) on the frame, the clip's mean frame and,
        with ``frame_levels``, a channel holding the clip's mean level; frame ``f``'s call gets its own
        level ``levels[:, f]`` as the timestep and ``f`` as the class label."""
        b, c, f, h, w = x_t.shape
        dtype = self.denoiser.conv_in.weight.dtype
        p = self.patch_size
        frames = x_t.transpose(1, 2).reshape(b * f, c, h, w)  # clip-major, frame-minor
        mean = x_t.mean(dim=2).repeat_interleave(f, dim=0)
        channels = [Fn.pixel_unshuffle(frames, p), Fn.pixel_unshuffle(mean, p)]
        if self.frame_levels:
            mean_level = levels.mean(dim=1).repeat_interleave(f).to(x_t.dtype)
            channels.append(mean_level.view(-1, 1, 1, 1).expand(b * f, 1, h // p, w // p))
        if self.coordinates:
            channels.append(self._coordinate_channels(b * f, h // p, w // p, 1, x_t.device, x_t.dtype))
        mask = cond.get("attention_mask")
        v = self.denoiser(
            torch.cat(channels, dim=1).to(dtype),
            1000.0 * levels.reshape(-1).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].repeat_interleave(f, dim=0).to(dtype),
            encoder_attention_mask=mask.repeat_interleave(f, dim=0).to(dtype) if mask is not None else None,
            class_labels=torch.arange(f, device=x_t.device).repeat(b),
            return_dict=False,
        )[0]
        return Fn.pixel_shuffle(v, p).reshape(b, f, c, h, w).transpose(1, 2).to(x_t.dtype)

    def _unet_canvas(self, x_t: Tensor, levels: Tensor, cond: Conditioning) -> Tensor:
        """One UNet call per clip on its frames laid side by side, ``[B, 3, H, F·W]``, plus one input
        channel holding each pixel's frame position ``2f/(F−1) − 1`` (the UNet has no positional
        embedding, so this is how a column knows which frame it belongs to) and, with
        ``frame_levels``, one holding its frame's noise level ``levels [B, F]``."""
        b, c, f, h, w = x_t.shape
        dtype = self.denoiser.conv_in.weight.dtype
        p = self.patch_size
        canvas = x_t.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)  # frame f occupies columns [f·W, (f+1)·W)
        position = torch.linspace(-1.0, 1.0, f, device=x_t.device) if f > 1 else torch.zeros(1, device=x_t.device)
        channels = [Fn.pixel_unshuffle(canvas, p), position.repeat_interleave(w // p).expand(b, 1, h // p, f * w // p).to(canvas.dtype)]
        if self.frame_levels:
            channels.append(levels.to(canvas.dtype).repeat_interleave(w // p, dim=1)[:, None, None, :].expand(b, 1, h // p, f * w // p))
        if self.coordinates:
            channels.append(self._coordinate_channels(b, h // p, w // p, f, x_t.device, canvas.dtype))
        x = torch.cat(channels, dim=1).to(dtype)
        mask = cond.get("attention_mask")
        v = self.denoiser(
            x,
            1000.0 * levels.amax(dim=1).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_attention_mask=mask.to(dtype) if mask is not None else None,
            return_dict=False,
        )[0]
        return Fn.pixel_shuffle(v, p).reshape(b, c, h, f, w).permute(0, 1, 3, 2, 4).to(x_t.dtype)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v(x_t, t, c)`` for ``x_t [B, 3, F, 32, 32]``, ``t [B]`` in ``[0, 1]`` (CFG as the image world)."""
        return super().velocity(x_t, t, cond, guidance_scale)

    def frame_velocity(self, x_t: Tensor, levels: Tensor, cond: Conditioning) -> Tensor:
        """``v(x_t, levels, c)`` with each frame at its own noise level ``levels [B, F]`` in ``[0, 1]``
        (``frame_levels`` backbones; no CFG). Equal levels ``t`` give ``velocity(x_t, t, c)``."""
        if not self.frame_levels:
            raise ValueError("frame_velocity needs a backbone built with frame_levels=True (an input channel per frame's level)")
        if levels.shape != (x_t.shape[0], self.num_frames):
            raise ValueError(f"levels must be [B, F] = [{x_t.shape[0]}, {self.num_frames}], got {tuple(levels.shape)}")
        if x_t.ndim != 5 or x_t.shape[2] != self.num_frames:
            raise ValueError(f"expected video latents [B, 3, {self.num_frames}, H, W], got {tuple(x_t.shape)}")
        return self._unet_at_levels(x_t, levels, cond)

    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, h, w) = (3, F, 32, 32)``."""
        size = self.denoiser.config.sample_size * self.patch_size
        return (3, self.num_frames, size, size)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, 3, F, H, W]`` in ``[-1, 1]`` → videos ``[B, F, 3, H, W]``, ``((x + 1)/2).clamp(0, 1)``."""
        return ((latents.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)

    def encode(self, videos: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` → latents ``[B, 3, F, H, W]`` = ``2 v − 1``."""
        return videos.permute(0, 2, 1, 3, 4) * 2 - 1

    def options(self) -> dict[str, Any]:
        options = {**super().options(), "num_frames": self.num_frames, "layout": self.layout}
        if self.frame_levels:
            options["frame_levels"] = True
        if self.coordinates:
            options["coordinates"] = True
        return options


def build_backbone(
    unet: dict[str, Any] | None = None, text_encoder: dict[str, Any] | None = None, *, num_frames: int = FRAMES, **options: Any
) -> VideoWorldBackbone:
    """A randomly initialised :class:`VideoWorldBackbone`; ``unet``/``text_encoder`` override the defaults."""
    encoder = WorldTextEncoder(**{"vocab": video_vocabulary(), **DEFAULT_TEXT_ENCODER, **(text_encoder or {})})
    options = {**DEFAULT_OPTIONS, **options}
    p = int(options["patch_size"])
    pixels = 3 * p * p
    layout = options.get("layout", "factorised")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    extra = int(bool(options.get("frame_levels", False))) + 2 * int(bool(options.get("coordinates", False)))
    unet_config = {
        **DEFAULT_UNET,
        "block_out_channels": DEFAULT_CHANNELS,
        "sample_size": SIZE // p,
        "in_channels": LAYOUT_IN_CHANNELS[layout](pixels) + extra,
        "out_channels": pixels,
        "num_class_embeds": num_frames if layout == "factorised" else None,
        "cross_attention_dim": encoder.config.hidden_dim,
        **(unet or {}),
    }
    return VideoWorldBackbone(UNet2DConditionModel(**unet_config), encoder, num_frames=num_frames, **options)


def tiny_backbone(**options: Any) -> VideoWorldBackbone:
    """A very small random video backbone with the shipped structure (tests, CI)."""
    return build_backbone(
        unet={"block_out_channels": (8, 16, 16), "norm_num_groups": 4, "attention_head_dim": 4},
        text_encoder={"hidden_dim": 16, "num_layers": 1, "num_heads": 2},
        **options,
    )


def save_backbone(backbone: VideoWorldBackbone, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``backbone`` as the image world does (``unet/``, ``text_encoder/``, ``backbone.json``
    with ``num_frames``)."""
    return _save_world_backbone(backbone, path, dtype=dtype)


def load_backbone(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    guidance_scale: float | None = None,
) -> VideoWorldBackbone:
    """Load a video backbone saved by :func:`save_backbone`; ``path=None`` is the shipped video base.

    Frozen and in eval mode, like :func:`dgpo_lightning.world.backbone.load_backbone`.
    """
    path = Path(path) if path is not None else BASE_CHECKPOINT
    if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
        raise FileNotFoundError(f"{path} is not a video world checkpoint (needs unet/ and text_encoder/)")
    options = _read_options(path / BACKBONE_FILE)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    encoder = WorldTextEncoder.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    options.setdefault("num_frames", unet.config.num_class_embeds)
    known = {"guidance_scale", "shift", "patch_size", "num_frames", "layout", "frame_levels", "coordinates"}
    backbone = VideoWorldBackbone(unet, encoder, **{k: v for k, v in options.items() if k in known})
    return backbone.to(device).eval().requires_grad_(False)
