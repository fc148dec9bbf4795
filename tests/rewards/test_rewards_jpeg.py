"""JPEG (in)compressibility rewards."""

import numpy as np
import pytest
import torch
from PIL import Image

from dgpo_lightning.rewards import build


def _file_size_kb(image: torch.Tensor, path, quality=95) -> float:
    array = (image.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).save(path, format="JPEG", quality=quality)
    return path.stat().st_size / 1000


def _batch():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 32, 32, generator=g)
    flat = torch.full((3, 32, 32), 0.4)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32).expand(3, 32, 32).clone()
    return torch.stack([noise, flat, ramp])


def test_incompressibility_is_jpeg_file_size(tmp_path):
    images = _batch()
    scores = build("jpeg_incompressibility")(images, ["a", "b", "c"])
    expected = [_file_size_kb(img, tmp_path / f"{i}.jpg") for i, img in enumerate(images)]
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert scores[0] > scores[2] > 0 and scores[0] > scores[1]  # noise is the hardest to compress


def test_compressibility_is_negative_size_and_options(tmp_path):
    images = _batch()
    incompressible = build("jpeg_incompressibility")(images, ["p"] * 3)
    torch.testing.assert_close(build("jpeg_compressibility")(images, ["p"] * 3), -incompressible)
    torch.testing.assert_close(build("jpeg_compressibility", scale=1 / 500)(images, ["p"] * 3), -incompressible / 500)
    low = build("jpeg_incompressibility", quality=10)(images, ["p"] * 3)
    assert low[0] < incompressible[0]
    assert low[0] == pytest.approx(_file_size_kb(images[0], tmp_path / "q10.jpg", quality=10))
    with pytest.raises(ValueError, match="quality"):
        build("jpeg_compressibility", quality=0)


def test_batched_deterministic_and_shape_errors():
    reward = build("jpeg_incompressibility")
    images = _batch()
    scores = reward(images, ["p"] * 3)
    torch.testing.assert_close(scores, torch.cat([reward(images[i : i + 1], ["p"]) for i in range(3)]))
    torch.testing.assert_close(scores, reward(images, ["p"] * 3))
    assert np.all(np.isfinite(scores.numpy()))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(images[:, :1], ["p"] * 3)
