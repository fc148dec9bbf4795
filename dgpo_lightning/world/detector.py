"""A programmatic object detector for the embedded world: reads (class, colour, box) back from pixels.

Pipeline, vectorised over the batch (torch only):

1. colour segmentation: each pixel takes the nearest of black and the palette colours; it is
   foreground when that colour is within ``COLOR_TOLERANCE`` (RGB distance);
2. 4-connected components of equal colour, by label propagation with pointer jumping;
3. render-and-compare shape fit per component: its coverage map (the pixels' intensity along the
   component's colour, on the component and a 2-pixel rim) is compared with an anti-aliased
   circle, square and triangle of the same area and centroid; the soft IoU of the best fit names
   the class. Coverage keeps the sub-pixel information that tells a 7-pixel circle from a square,
   and the rim makes soft edges and blob tails cost fit. Coverage is relative to the object's own
   brightness, so uniformly dimmer drawings still fit.

The confidence is the product of piecewise-linear ramps over the fit (best soft IoU and its margin
over the runner-up), the fitted size, the box aspect ratio and the edge sharpness (mean coverage
inside the mask: ≈ 0.95 for drawn shapes, ≈ 0.7 for a Gaussian blob). Drawn shapes score 1 (above
GenEval's 0.9 counting threshold); blobs, smears (≥ 5 px), shapes blurred with σ ≥ 1 px,
rectangles spanning cells, fragments and noise fall below the 0.3 detection threshold. Measured on
256 images each: drawn scenes 1.00 correct; σ = 0.5 px blur 0.99, σ = 0.7 px 0.62, σ = 1 px 0.02;
noise, blocks, bars and Gaussian blobs 0.00.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dgpo_lightning.rewards.geneval_rules import Detection, register_detector
from dgpo_lightning.world.scene import COLORS

COLOR_TOLERANCE = 0.4  # max RGB distance from a foreground pixel to its palette colour
SHAPES = ("circle", "square", "triangle")
AREA_FRACTION = (math.pi / 4, 1.0, 0.5)  # shape area / side², per entry of SHAPES
# (bad, good) ramps. Sizes are in pixels at 32×32 and scale with the image; drawn objects are 7–9 px.
FIT_RAMP = (0.70, 0.84)  # soft IoU of the best-fitting shape
MARGIN_RAMP = (0.02, 0.08)  # best soft IoU minus the runner-up's
SIZE_RAMP_LOW = (5.0, 6.5)  # fitted side: 0 at ≤ 5 px, 1 from 6.5 px
SIZE_RAMP_HIGH = (11.0, 10.0)  # 1 up to 10 px, 0 from 11 px (a grid cell is 10.7 px)
ASPECT_RAMP = (1.8, 1.5)  # max(w, h) / min(w, h) of the pixel box
SHARPNESS_RAMP = (0.76, 0.86)  # mean coverage inside the mask
MAX_BOX = 13  # px at 32×32: larger components are not analysed
MIN_SCORE = 1e-3
RIM = 2  # px around the component whose coverage enters the shape fit
RIM_RESIDUAL = 0.15  # max RGB distance of a rim pixel from the line black → object colour
SUPERSAMPLE = 4


def _ramp(value: Tensor, bad: float, good: float) -> Tensor:
    """0 at ``bad``, 1 at ``good``, linear in between (either direction)."""
    return ((value - bad) / (good - bad)).clamp(0, 1)


def _palette(dtype: torch.dtype = torch.float32) -> Tensor:
    """``[K + 1, 3]``: black (background) then the palette colours in ``COLORS`` order."""
    return torch.tensor([(0.0, 0.0, 0.0), *COLORS.values()], dtype=dtype)


def _components(labels: Tensor) -> Tensor:
    """4-connected components of equal nonzero ``labels [B, H, W]``.

    Returns ``[B, H, W]`` ids: 0 on background, else the largest 1-based flat pixel index in the
    component. Hand-written because scipy/skimage are not dependencies; label propagation with
    pointer jumping converges in a handful of steps on 32×32 images.
    """
    batch, height, width = labels.shape
    foreground = labels > 0
    flat_index = torch.arange(1, height * width + 1).view(1, height, width)
    ids = torch.where(foreground, flat_index, 0)
    padded_labels = F.pad(labels, (1, 1, 1, 1))
    neighbours = [(0, 1), (2, 1), (1, 0), (1, 2)]  # offsets into the padded grid: up, down, left, right
    links = [(padded_labels[:, r : r + height, c : c + width] == labels) & foreground for r, c in neighbours]
    while True:
        padded = F.pad(ids, (1, 1, 1, 1))
        new = ids
        for (r, c), linked in zip(neighbours, links):
            new = torch.maximum(new, torch.where(linked, padded[:, r : r + height, c : c + width], 0))
        # Pointer jumping: the pixel an id names carries an id at least as large, in the same component.
        flat = new.view(batch, -1)
        new = torch.maximum(new, torch.gather(F.pad(flat, (1, 0)), 1, flat).view_as(new))
        if torch.equal(new, ids):
            return ids
        ids = new


def _shape_coverage(centre_x: Tensor, centre_y: Tensor, side: Tensor, size: int) -> Tensor:
    """Anti-aliased coverage ``[C, 3, size, size]`` of a circle, square and triangle (apex up) of side
    ``side [C, 3]`` whose boxes are centred at ``(centre_x, centre_y) [C, 3]`` (window coordinates)."""
    sub = (torch.arange(size * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    half = (side / 2).view(-1, 3, 1, 1)
    dx = sub.view(1, 1, 1, -1) - centre_x.view(-1, 3, 1, 1)
    dy = sub.view(1, 1, -1, 1) - centre_y.view(-1, 3, 1, 1)
    circle = dx[:, 0:1] ** 2 + dy[:, 0:1] ** 2 <= half[:, 0:1] ** 2
    square = (dx[:, 1:2].abs() <= half[:, 1:2]) & (dy[:, 1:2].abs() <= half[:, 1:2])
    depth = dy[:, 2:3] + half[:, 2:3]
    triangle = (depth >= 0) & (depth <= 2 * half[:, 2:3]) & (dx[:, 2:3].abs() <= depth / 2)
    inside = torch.cat([circle, square, triangle], dim=1).float()
    return F.avg_pool2d(inside, SUPERSAMPLE)


@torch.no_grad()
def detect_batch(images: Tensor) -> list[list[Detection]]:
    """Detect the shapes in ``images [B, 3, H, W]`` (values in ``[0, 1]``, black background).

    Returns one list of :class:`~dgpo_lightning.rewards.geneval_rules.Detection` per image, sorted by
    decreasing confidence; boxes are the components' pixel boxes ``(x0, y0, x1, y1)`` with exclusive
    upper corner. Components scoring below ``MIN_SCORE`` are dropped.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0, 1)
    batch, _, height, width = images.shape
    results: list[list[Detection]] = [[] for _ in range(batch)]
    scale = min(height, width) / 32.0
    palette = _palette()
    pixels = images.permute(0, 2, 3, 1).reshape(batch, -1, 3)
    nearest_distance, nearest = torch.cdist(pixels, palette.expand(batch, -1, -1)).min(dim=-1)
    labels = torch.where(nearest_distance <= COLOR_TOLERANCE, nearest, 0).view(batch, height, width)
    ids = _components(labels)

    # Per-component pixel boxes and colours, with scatter ops over the batch's foreground pixels.
    foreground = ids > 0
    batch_index, rows, cols = foreground.nonzero(as_tuple=True)
    if batch_index.numel() == 0:
        return results
    stride = height * width + 1
    unique_ids, component = torch.unique(batch_index * stride + ids[foreground], return_inverse=True)
    count = unique_ids.numel()

    def reduce(values: Tensor, how: str) -> Tensor:
        start = torch.full((count,), -1 if how == "amax" else stride, dtype=values.dtype)
        return start.scatter_reduce(0, component, values, reduce=how)

    y0, y1, x0, x1 = reduce(rows, "amin"), reduce(rows, "amax"), reduce(cols, "amin"), reduce(cols, "amax")
    box_h, box_w = (y1 - y0 + 1).float(), (x1 - x0 + 1).float()
    comp_label = reduce(labels[foreground], "amax")
    longest, shortest = torch.maximum(box_w, box_h), torch.minimum(box_w, box_h)
    candidates = (
        (shortest >= SIZE_RAMP_LOW[0] * scale - 1) & (longest <= MAX_BOX * scale) & (longest < 2 * shortest)
    ).nonzero().flatten()
    if candidates.numel() == 0:
        return results

    # Windows at each candidate: its box plus a rim of RIM pixels, of fixed side.
    side = int(MAX_BOX * scale) + 2 * RIM
    pad = side
    cb, own = unique_ids[candidates] // stride, unique_ids[candidates] % stride
    wy0, wx0 = y0[candidates] - RIM + pad, x0[candidates] - RIM + pad
    offsets = torch.arange(side)
    win_rows = (wy0.view(-1, 1) + offsets).view(-1, side, 1)
    win_cols = (wx0.view(-1, 1) + offsets).view(-1, 1, side)
    bidx = cb.view(-1, 1, 1)
    window_ids = F.pad(ids, (pad, pad, pad, pad))[bidx, win_rows, win_cols]  # [C, S, S]
    window_pixels = F.pad(images, (pad, pad, pad, pad))[bidx, :, win_rows, win_cols]  # [C, S, S, 3]
    mask = window_ids == own.view(-1, 1, 1)
    colour = palette[comp_label[candidates]].view(-1, 1, 1, 3)
    along = (window_pixels * colour).sum(-1) / (colour * colour).sum(-1)
    # The rim counts pixels of the object's own colour (a soft edge, a blob's tail), not those of
    # other components or the faint edges of differently coloured neighbours.
    residual = (window_pixels - along.unsqueeze(-1) * colour).norm(dim=-1)
    rim = F.max_pool2d(mask.float().unsqueeze(1), 2 * RIM + 1, stride=1, padding=RIM).squeeze(1).bool()
    rim = rim & (window_ids == 0) & (residual <= RIM_RESIDUAL)
    # Brightness of the object itself (90th percentile inside its mask), so that a uniformly dimmer
    # drawing still reads as full coverage while a blob's soft falloff does not.
    level = torch.nanquantile(torch.where(mask, along, torch.nan).flatten(1), 0.9, dim=1).clamp(0.5, 1.0)
    coverage = (along / level.view(-1, 1, 1)).clamp(0, 1) * (mask | rim)

    mask_area = mask.sum((1, 2)).float()
    sharpness = (coverage * mask).sum((1, 2)) / mask_area
    area = coverage.sum((1, 2)).clamp(min=1e-6)
    centres = torch.arange(side, dtype=torch.float32) + 0.5
    mean_x = (coverage.sum(1) * centres).sum(-1) / area
    mean_y = (coverage.sum(2) * centres).sum(-1) / area
    fitted_side = (area.view(-1, 1) / torch.tensor(AREA_FRACTION)).sqrt()  # [C, 3]
    box_centre_y = mean_y.view(-1, 1) - fitted_side * torch.tensor([0.0, 0.0, 1 / 6])  # triangle centroid is s/6 below
    templates = _shape_coverage(mean_x.view(-1, 1).expand(-1, 3), box_centre_y, fitted_side, side)
    fit = torch.minimum(templates, coverage.unsqueeze(1)).sum((2, 3)) / torch.maximum(
        templates, coverage.unsqueeze(1)
    ).sum((2, 3))
    top2 = fit.topk(2, dim=1).values
    shape_index = fit.argmax(dim=1)
    size = fitted_side.gather(1, shape_index.view(-1, 1)).squeeze(1) / scale
    cw, ch = box_w[candidates], box_h[candidates]

    score = (
        _ramp(top2[:, 0], *FIT_RAMP)
        * _ramp(top2[:, 0] - top2[:, 1], *MARGIN_RAMP)
        * _ramp(size, *SIZE_RAMP_LOW)
        * _ramp(size, *SIZE_RAMP_HIGH)
        * _ramp(torch.maximum(cw, ch) / torch.minimum(cw, ch), *ASPECT_RAMP)
        * _ramp(sharpness, *SHARPNESS_RAMP)
    )
    colour_names = list(COLORS)
    for i in (score >= MIN_SCORE).nonzero().flatten().tolist():
        c = int(candidates[i])
        box = (float(x0[c]), float(y0[c]), float(x1[c] + 1), float(y1[c] + 1))
        results[int(cb[i])].append(
            Detection(SHAPES[int(shape_index[i])], float(score[i]), box, colour_names[int(comp_label[c]) - 1])
        )
    for found in results:
        found.sort(key=lambda d: -d.score)
    return results


def detect(image: Tensor) -> list[Detection]:
    """Detect the shapes in one image ``[3, H, W]`` (see :func:`detect_batch`)."""
    if image.dim() != 3:
        raise ValueError(f"expected one image [3, H, W], got {tuple(image.shape)}")
    return detect_batch(image.unsqueeze(0))[0]


def world_detector() -> Callable[[Tensor], list[list[Detection]]]:
    """The detector factory the world registers as ``"world"``: :func:`detect_batch` (no options)."""
    return detect_batch


# The world provides its detector to the rewards' registry (the rewards never import the world):
# GenEval rewards with ``detector="world"`` find it by name.
register_detector("world", world_detector)
