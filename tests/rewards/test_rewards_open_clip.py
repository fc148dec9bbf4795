"""open_clip rewards (HPSv2, CLIPScore/PickScore on open_clip, GenEval's colour classifier) on a tiny
random open_clip CLIP, checked against open_clip's own documented path: its PIL eval transform,
``open_clip.tokenize`` and ``encode_image``/``encode_text`` of a model loaded by hand."""

import json

import pytest
import torch
from PIL import Image

import open_clip
from dgpo_lightning.models.testing import TINY_OPEN_CLIP_CONFIG, save_tiny_mask2former, save_tiny_open_clip
from dgpo_lightning.rewards import available, build
from dgpo_lightning.rewards.detectors import COLOR_TEMPLATES, COLORS, Mask2FormerClipDetector

SIZE = TINY_OPEN_CLIP_CONFIG["vision_cfg"]["image_size"]
PROMPTS = ["a photo of a cat", "a red apple", "two blue cars"]


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt", seed=0, wrap="state_dict")


@pytest.fixture(scope="module")
def reference(hps_checkpoint):
    """The tiny model loaded by hand (prefix stripped here, not by open_clip's loader)."""
    state = torch.load(hps_checkpoint, weights_only=True)["state_dict"]
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()})
    return model


def _images(batch=3, height=SIZE, width=SIZE, seed=0):
    # Multiples of 1/255, so that the PIL path of the reference sees exactly the same pixels.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g).float() / 255


def _reference_features(model, images, prompts):
    transform = open_clip.image_transform(SIZE, is_train=False)
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    with torch.no_grad():
        image = model.encode_image(torch.stack([transform(p) for p in pil]))
        text = model.encode_text(open_clip.tokenize(prompts))
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def test_open_clip_rewards_are_registered():
    assert {"hpsv2", "clip_score", "pickscore", "aesthetic"} <= set(available())


def test_hps_is_the_cosine_of_image_and_prompt(hps_checkpoint, reference):
    images = _images()
    scores = build("hpsv2", model_path=str(hps_checkpoint), model_config=TINY_OPEN_CLIP_CONFIG)(images, PROMPTS)
    image, text = _reference_features(reference, images, PROMPTS)
    torch.testing.assert_close(scores, (image * text).sum(-1), atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # a random model still separates these inputs
    shuffled = build("hpsv2", model_path=str(hps_checkpoint), model_config=TINY_OPEN_CLIP_CONFIG)(images, PROMPTS[::-1])
    assert not torch.allclose(shuffled, scores)


def test_resizing_follows_open_clips_transform(hps_checkpoint, reference):
    images = _images(2, 48, 70, seed=3)
    scores = build("hpsv2", model_path=str(hps_checkpoint), model_config=TINY_OPEN_CLIP_CONFIG)(images, PROMPTS[:2])
    image, text = _reference_features(reference, images, PROMPTS[:2])
    # Tensor bicubic resize vs PIL's (uint8 rounding, kernel): close, not equal.
    torch.testing.assert_close(scores, (image * text).sum(-1), atol=2e-2, rtol=0)


def test_a_named_architecture_loads_a_bare_state_dict(tmp_path, hps_checkpoint, reference):
    config = tmp_path / "dgpo-tiny-open-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    bare = tmp_path / "bare.pt"
    torch.save(reference.state_dict(), bare)
    images = _images(seed=1)
    named = build("hpsv2", model_name="dgpo-tiny-open-clip", model_path=str(bare))(images, PROMPTS)
    wrapped = build("hpsv2", model_path=str(hps_checkpoint), model_config=TINY_OPEN_CLIP_CONFIG)(images, PROMPTS)
    torch.testing.assert_close(named, wrapped)


def test_clip_score_and_pickscore_on_open_clip(hps_checkpoint, reference):
    images = _images(seed=2)
    image, text = _reference_features(reference, images, PROMPTS)
    cosine = (image * text).sum(-1)
    options = dict(backend="open_clip", model_path=str(hps_checkpoint), model_config=TINY_OPEN_CLIP_CONFIG)
    clip_score = build("clip_score", weight=2.5, **options)(images, PROMPTS)
    torch.testing.assert_close(clip_score, 2.5 * cosine.clamp_min(0), atol=1e-5, rtol=1e-5)
    pickscore = build("pickscore", **options)(images, PROMPTS)
    torch.testing.assert_close(pickscore, reference.logit_scale.exp() * cosine, atol=1e-4, rtol=1e-5)


def test_open_clip_errors_name_the_option(tmp_path, hps_checkpoint):
    images = _images(1)
    with pytest.raises(ValueError, match="model_path="):
        build("hpsv2", model_config=TINY_OPEN_CLIP_CONFIG)(images, PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="model_path='nowhere.pt' is neither a local file nor a pretrained tag"):
        build("hpsv2", model_path="nowhere.pt")(images, PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="not in the local hub cache"):
        build("clip_score", backend="open_clip", model_name="ViT-B-32", model_path="openai")(images, PROMPTS[:1])
    other = dict(TINY_OPEN_CLIP_CONFIG, embed_dim=8)
    with pytest.raises(ValueError, match="do not fit the model"):
        build("hpsv2", model_path=str(hps_checkpoint), model_config=other)(images, PROMPTS[:1])
    with pytest.raises(ValueError, match="processor_path is an option of backend='transformers'"):
        build("clip_score", backend="open_clip", model_name="ViT-B-32", model_path="x", processor_path="y")
    with pytest.raises(ValueError, match="backend='torchvision' is not one of"):
        build("clip_score", backend="torchvision")


def test_genevals_colour_classifier_on_open_clip(tmp_path, hps_checkpoint, reference):
    mask2former = save_tiny_mask2former(tmp_path / "mask2former")
    detector = Mask2FormerClipDetector(
        mask2former, hps_checkpoint, clip_backend="open_clip", clip_model_config=TINY_OPEN_CLIP_CONFIG
    )
    crops = [_images(1, 40, 24, seed=5)[0], _images(1, SIZE, SIZE, seed=6)[0]]
    names = ["cat", "dog"]
    similarities = detector.color_similarities(crops, names)

    transform = open_clip.image_transform(SIZE, is_train=False)
    expected = []
    with torch.no_grad():
        for crop, name in zip(crops, names):
            image = reference.encode_image(transform(crop)[None])[0]
            image = image / image.norm()
            colours = []
            for colour in COLORS:
                text = reference.encode_text(open_clip.tokenize([t.format(color=colour, object=name) for t in COLOR_TEMPLATES]))
                mean = (text / text.norm(dim=-1, keepdim=True)).mean(0)
                colours.append(mean / mean.norm())
            expected.append(torch.stack(colours) @ image)
    torch.testing.assert_close(similarities, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert detector.classify_colors(crops, names) == [COLORS[int(i)] for i in torch.stack(expected).argmax(-1)]
    with pytest.raises(ValueError, match="clip_path="):
        Mask2FormerClipDetector(mask2former, None, clip_backend="open_clip")
