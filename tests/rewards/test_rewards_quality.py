"""The weight-free sharpness proxy (variance of the Laplacian)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgpo_lightning.rewards import build


def _numpy_laplacian_variance(image: torch.Tensor) -> float:
    # Independent computation with array slicing instead of a convolution.
    rgb = image.double().numpy()
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    return float(lap.var())


def test_sharpness_matches_independent_laplacian():
    images = torch.rand(3, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    scores = build("sharpness")(images, ["p"] * 3)
    expected = torch.tensor([100 * _numpy_laplacian_variance(img) for img in images], dtype=torch.float32)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(build("sharpness", scale=1.0)(images, ["p"] * 3), expected / 100, rtol=1e-5, atol=1e-8)


def test_flat_and_affine_images_score_zero_and_blur_lowers_sharpness():
    flat = torch.full((1, 3, 16, 16), 0.3)
    yy, xx = torch.meshgrid(torch.linspace(0, 0.5, 16), torch.linspace(0, 0.4, 16), indexing="ij")
    ramp = (yy + xx).expand(1, 3, 16, 16)  # an affine luma has zero Laplacian
    reward = build("sharpness")
    assert reward(flat, ["p"]).item() == pytest.approx(0.0, abs=1e-9)
    assert reward(ramp, ["p"]).item() == pytest.approx(0.0, abs=1e-8)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blurred = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    more_blurred = F.avg_pool2d(blurred, 3, stride=1, padding=1, count_include_pad=False)
    scores = [reward(x, ["p"]).item() for x in (noise, blurred, more_blurred)]
    assert scores[0] > scores[1] > scores[2] > 0


def test_batched_deterministic_and_errors():
    reward = build("sharpness")
    images = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    scores = reward(images, ["p"] * 4)
    torch.testing.assert_close(scores, torch.cat([reward(images[i : i + 1], ["p"]) for i in range(4)]))
    torch.testing.assert_close(scores, reward(images, ["p"] * 4))
    assert np.all(np.isfinite(scores.numpy()))
    with pytest.raises(ValueError, match="sharpness"):
        reward(torch.rand(1, 3, 2, 8), ["p"])
