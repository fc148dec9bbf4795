"""PickScore, Aesthetic and CLIPScore on a tiny random CLIP saved to a temporary directory, checked
against transformers' own CLIPProcessor (PIL) + CLIPModel forward."""

import pytest
import torch
from PIL import Image
from torch import nn

from dgpo_lightning.models.testing import save_tiny_clip
from dgpo_lightning.rewards import build
from dgpo_lightning.rewards.clip_scores import clip_preprocess, load_linear_head

SIZE = 32  # the tiny CLIP's input size
PROMPTS = ["a photo of a cat", "a red apple", "two blue cars"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def reference(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)


def _images(batch=3, size=SIZE, seed=0):
    # Multiples of 1/255, so the PIL path of the reference sees exactly the same pixels.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


def _reference_outputs(reference, images, prompts):
    model, processor = reference
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    inputs = processor(text=prompts, images=pil, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


def test_preprocessing_matches_clip_processor(reference):
    _, processor = reference
    for h, w in [(SIZE, SIZE), (64, 48), (33, 97)]:
        images = torch.randint(0, 256, (2, 3, h, w), generator=torch.Generator().manual_seed(w)).float() / 255
        ours = clip_preprocess(images, processor.image_processor)
        pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
        ref = processor(images=pil, return_tensors="pt").pixel_values
        assert ours.shape == ref.shape == (2, 3, SIZE, SIZE)
        if (h, w) == (SIZE, SIZE):
            torch.testing.assert_close(ours, ref)  # no resize: identical
        else:  # bicubic in torch vs PIL (uint8 rounding, kernel): close on average
            assert (ours - ref).abs().mean() < 0.02


def test_pickscore_is_scaled_cosine_of_reference_clip(clip_dir, reference):
    images = _images()
    reward = build("pickscore", model_path=str(clip_dir), processor_path=str(clip_dir))
    scores = reward(images, PROMPTS)
    expected = _reference_outputs(reference, images, PROMPTS).logits_per_image.diagonal()
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    scaled = build("pickscore", model_path=str(clip_dir), scale=1 / 26)(images, PROMPTS)
    torch.testing.assert_close(scaled, expected / 26, rtol=1e-4, atol=1e-4)


def test_clip_score_is_clipped_cosine(clip_dir, reference):
    images = _images(seed=1)
    scores = build("clip_score", model_path=str(clip_dir))(images, PROMPTS)
    out = _reference_outputs(reference, images, PROMPTS)
    cosine = (out.image_embeds * out.text_embeds).sum(-1) / (out.image_embeds.norm(dim=-1) * out.text_embeds.norm(dim=-1))
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert (scores >= 0).all()


class _LaionMLP(nn.Module):
    """The improved LAION predictor's layout: Linear/Dropout stack, no activations."""

    def __init__(self, dim):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 24), nn.Dropout(0.2), nn.Linear(24, 12), nn.Dropout(0.2), nn.Linear(12, 8),
            nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1),
        )

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_head_on_normalised_image_embedding(clip_dir, reference, tmp_path):
    model, _ = reference
    dim = model.config.projection_dim
    torch.manual_seed(0)
    mlp = _LaionMLP(dim).eval()
    torch.save(mlp.state_dict(), tmp_path / "head.pth")
    linear = nn.Linear(dim, 1)
    torch.save(linear.state_dict(), tmp_path / "linear.pth")

    images = _images(seed=2)
    out = _reference_outputs(reference, images, PROMPTS)
    embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        expected_mlp, expected_linear = mlp(embeds).squeeze(-1), linear(embeds).squeeze(-1)

    scores = build("aesthetic", model_path=str(clip_dir), head_path=str(tmp_path / "head.pth"))(images, PROMPTS)
    torch.testing.assert_close(scores, expected_mlp, rtol=1e-4, atol=1e-5)
    scores = build("aesthetic", model_path=str(clip_dir), head_path=str(tmp_path / "linear.pth"))(images, PROMPTS)
    torch.testing.assert_close(scores, expected_linear, rtol=1e-4, atol=1e-5)

    torch.save(nn.Linear(dim, 3).state_dict(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="must chain"):
        load_linear_head(tmp_path / "bad.pth", in_features=dim)
    with pytest.raises(ValueError, match="head_path"):
        build("aesthetic", model_path=str(clip_dir))(images, PROMPTS)


@pytest.mark.parametrize("name", ["pickscore", "clip_score"])
def test_batched_deterministic_any_resolution(clip_dir, name):
    reward = build(name, model_path=str(clip_dir))
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS + ["a green bench"]
    scores = reward(images, prompts)
    singles = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(scores, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, reward(images, prompts))
    assert torch.isfinite(scores).all() and scores.shape == (4,)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward(images, PROMPTS)


def test_weights_load_lazily_and_errors_name_the_path(tmp_path):
    missing = tmp_path / "PickScore_v1"
    reward = build("pickscore", model_path=str(missing))  # nothing loaded yet: no error
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):
        reward(_images(1), PROMPTS[:1])
    with pytest.raises(ValueError, match="model_path"):
        build("clip_score")(_images(1), PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_linear_head(tmp_path / "nothing.pth")
