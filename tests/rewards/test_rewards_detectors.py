"""The GenEval detector on transformers (Mask2Former instances + CLIP colours), on a tiny random
Mask2Former and a tiny random CLIP saved to temporary directories; references computed independently."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgpo_lightning.models.testing import save_tiny_clip, save_tiny_mask2former
from dgpo_lightning.rewards import build
from dgpo_lightning.rewards.detectors import (
    COLORS,
    Instance,
    Mask2FormerClipDetector,
    mask2former_instances,
    mask_box,
)

LABELS = ("cat", "dog", "mouse", "remote")  # ids 0..3 of the tiny checkpoint
CAT, DOG, MOUSE, REMOTE = range(4)
SIZE = 64  # test images are SIZE x SIZE unless said otherwise
CLIP_SIZE = 32  # the tiny CLIP's input size


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    mask2former = save_tiny_mask2former(tmp_path_factory.mktemp("mask2former"), labels=LABELS)
    clip = save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=CLIP_SIZE)
    return mask2former, clip


@pytest.fixture(scope="module")
def detector(model_dirs):
    # score_floor 0: the random model's scores are low; the rules' thresholds are tested end to end below.
    return Mask2FormerClipDetector(*model_dirs, score_floor=0.0)


@pytest.fixture(scope="module")
def clip_reference(model_dirs):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(model_dirs[1]).eval(), CLIPProcessor.from_pretrained(model_dirs[1])


def _images(batch, height=SIZE, width=SIZE, seed=0):
    # Multiples of 1/255, so the PIL path of the CLIP reference sees exactly the same pixels.
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=generator).float() / 255


def _smooth_images(batch, height=SIZE, width=SIZE, seed=0):
    # Low-frequency images: the random model's masks then have extents smaller than the image.
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _rect(x0, y0, x1, y1, size=SIZE):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _reference_color(clip_reference, image, mask, object_name):
    """GenEval's colour computed from scratch: grey outside the mask, crop to the mask's extent, CLIP
    image features vs. the mean of three normalised template embeddings per colour, argmax."""
    model, processor = clip_reference
    pixels = np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    mask = mask.numpy()
    composite = np.where(mask[..., None], pixels, np.uint8(153))
    rows, cols = np.where(mask)
    crop = Image.fromarray(composite).crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    templates = ["a photo of a {} " + object_name, "a photo of a {}-colored " + object_name, "a photo of a {} object"]
    with torch.no_grad():
        image_features = model.get_image_features(**processor(images=[crop], return_tensors="pt")).pooler_output
        image_features = F.normalize(image_features, dim=-1)[0]
        colour_features = []
        for colour in COLORS:
            tokens = processor.tokenizer([t.format(colour) for t in templates], padding=True, return_tensors="pt")
            text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            colour_features.append(F.normalize(text.mean(dim=0), dim=-1))
    similarities = torch.stack(colour_features) @ image_features
    return COLORS[int(similarities.argmax())], similarities


def _inject(detector, monkeypatch, instances_per_image):
    """Replace the detector's segmentation by known instances ``[(label, score, mask), ...]`` per image."""

    def segment(images):
        assert len(instances_per_image) == images.shape[0]
        return [[Instance(label, score, mask) for label, score, mask in image] for image in instances_per_image]

    monkeypatch.setattr(detector, "segment", segment)


# ---------------------------------------------------------------------------------------- loading


def test_inference_head_matches_transformers_universal_segmentation(model_dirs, detector, monkeypatch, tmp_path):
    """The scipy-free inference head computes Mask2FormerForUniversalSegmentation's logits from its
    weights, and loads that class's own checkpoints (with the loss's buffer) unchanged."""
    from torch import nn
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former

    class LossWithoutMatcher(nn.Module):  # the real loss needs scipy; only its buffer is kept
        def __init__(self, config, weight_dict):
            super().__init__()
            self.num_labels, self.eos_coef = config.num_labels, config.no_object_weight
            self.register_buffer("empty_weight", torch.ones(config.num_labels + 1))

    monkeypatch.setattr(modeling_mask2former, "Mask2FormerLoss", LossWithoutMatcher)
    reference = Mask2FormerForUniversalSegmentation.from_pretrained(model_dirs[0]).eval()
    reference.save_pretrained(tmp_path / "universal")
    assert "criterion.empty_weight" in reference.state_dict()
    detector.load(torch.device("cpu"))
    resaved = Mask2FormerClipDetector(tmp_path / "universal", model_dirs[1], processor_path=model_dirs[0])
    resaved.load(torch.device("cpu"))
    pixels, _ = detector.preprocess(_images(2))
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        for head in (detector.model, resaved.model):
            class_logits, mask_logits = head(pixel_values=pixels)
            torch.testing.assert_close(class_logits, expected.class_queries_logits)
            torch.testing.assert_close(mask_logits, expected.masks_queries_logits)


def test_missing_or_unloadable_paths_name_the_path(model_dirs, tmp_path):
    mask2former, clip = model_dirs
    images = _images(1)
    with pytest.raises(FileNotFoundError, match="model_path=.*no_such_mask2former"):
        Mask2FormerClipDetector(tmp_path / "no_such_mask2former", clip)(images)
    with pytest.raises(FileNotFoundError, match="clip_path=.*no_such_clip"):
        Mask2FormerClipDetector(mask2former, tmp_path / "no_such_clip")(images)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Mask2FormerClipDetector(empty, clip)(images)
    with pytest.raises(ValueError, match="clip_path"):
        Mask2FormerClipDetector(mask2former)


def test_specs_build_lazily_and_reject_unknown_options(model_dirs):
    mask2former, clip = model_dirs
    reward = build("geneval", detector={"kind": "mask2former", "model_path": str(mask2former), "clip_path": str(clip)})
    assert isinstance(reward.detector, Mask2FormerClipDetector) and reward.detector.model is None  # nothing loaded
    with pytest.raises(ValueError, match="score_treshold"):
        build("geneval", detector={"kind": "mask2former", "model_path": str(mask2former), "clip_path": str(clip), "score_treshold": 0.5})
    with pytest.raises(ValueError, match="unknown detector"):
        build("geneval_partial", detector={"kind": "yolo"})


def test_yaml_reward_options_reach_the_detector(model_dirs):
    """``data.reward_options`` from a YAML config, parsed as LightningCLI parses the data module."""
    from jsonargparse import ArgumentParser

    from dgpo_lightning.data.datamodule import RolloutDataModule

    mask2former, clip = model_dirs
    detector = f"{{kind: mask2former, model_path: {mask2former}, clip_path: {clip}, shortest_edge: 48, dtype: float32}}"
    config = f"""
        data:
          rewards: {{geneval_partial: 1.0}}
          eval_rewards: [geneval]
          reward_options:
            geneval_partial: {{detector: {detector}}}
            geneval:
              detector:
                kind: mask2former
                model_path: {mask2former}
                clip_path: {clip}
                aliases: {{remote: remote control}}
        """
    parser = ArgumentParser()
    parser.add_class_arguments(RolloutDataModule, "data")
    data = parser.instantiate(parser.parse_string(config)).data
    train_detector = data.reward.rewards["geneval_partial"].detector
    eval_detector = data.eval_rewards["geneval"].detector
    assert isinstance(train_detector, Mask2FormerClipDetector) and isinstance(eval_detector, Mask2FormerClipDetector)
    assert (train_detector.shortest_edge, train_detector.dtype) == (48, torch.float32)
    eval_detector.load(torch.device("cpu"))
    assert [eval_detector.class_name(i) for i in range(4)] == ["cat", "dog", "mouse", "remote control"]


# ---------------------------------------------------------------------------------------- real forward


def test_output_structure_on_the_tiny_model(detector):
    for height, width in [(SIZE, SIZE), (48, 80)]:
        detections = detector(_smooth_images(3, height, width, seed=height))
        assert len(detections) == 3
        for image_detections in detections:
            assert 0 < len(image_detections) <= 6  # at most one per query of the tiny model
            scores = [d.score for d in image_detections]
            assert scores == sorted(scores, reverse=True)
            for d in image_detections:
                assert d.cls in {"cat", "dog", "computer mouse", "tv remote"}  # GenEval's names
                assert 0 < d.score <= 1
                x0, y0, x1, y1 = d.box
                assert all(float(v).is_integer() for v in d.box)
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                assert d.color in COLORS


def test_deterministic_and_independent_of_batching(detector):
    images = _smooth_images(4, seed=3)
    whole = detector(images)
    assert any(d.box != (0, 0, SIZE, SIZE) for image in whole for d in image)  # boxes that could differ
    assert detector(images) == whole
    halves = detector(images[:2]) + detector(images[2:])
    assert len(halves) == len(whole)
    for split, full in zip(halves, whole):
        assert [(d.cls, d.box, d.color) for d in split] == [(d.cls, d.box, d.color) for d in full]
        assert [d.score for d in split] == pytest.approx([d.score for d in full], abs=1e-5)


def test_per_class_cap_keeps_the_best(model_dirs):
    detections = Mask2FormerClipDetector(*model_dirs, score_floor=0.0, max_per_class=1)(_images(2, seed=5))
    for image_detections in detections:
        classes = [d.cls for d in image_detections]
        assert len(classes) == len(set(classes))


def test_the_per_class_cap_breaks_ties_as_genevals_ranking(model_dirs, monkeypatch):
    detector = Mask2FormerClipDetector(*model_dirs, score_floor=0.0, max_per_class=2)
    masks = [_rect(12 * i, 4, 12 * i + 8, 12) for i in range(4)]
    scores = [0.9, 0.9, 0.9]
    _inject(detector, monkeypatch, [[(CAT, s, m) for s, m in zip(scores, masks)] + [(DOG, 0.8, masks[3])]])
    found = detector(_images(1))[0]
    # GenEval ranks with argsort(scores)[::-1] (stable in its numpy for so few): of three equal
    # scores the two listed last are its top two; the detector returns them in listing order.
    top_two = sorted(np.argsort(np.array(scores), kind="stable")[::-1][:2].tolist())
    assert [d.box for d in found if d.cls == "cat"] == [tuple(float(v) for v in mask_box(masks[i])) for i in top_two]
    assert [d.cls for d in found].count("dog") == 1


# ---------------------------------------------------------------------------------------- post-processing


def test_postprocessing_matches_transformers_where_they_agree():
    """On an unpadded 384x384 input (where transformers' post-processing resizes masks to, with no
    crop), the instances equal transformers' post_process_instance_segmentation with binary maps."""
    from transformers import Mask2FormerImageProcessorPil

    generator = torch.Generator().manual_seed(0)
    class_logits = 3 * torch.randn(5, 4, generator=generator)  # 5 queries, 3 classes + "no object"
    mask_logits = 4 * torch.randn(5, 96, 96, generator=generator)
    ours = mask2former_instances(class_logits, mask_logits, (384, 384), (384, 384), (384, 384))
    theirs = Mask2FormerImageProcessorPil().post_process_instance_segmentation(
        SimpleNamespace(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None]),
        threshold=0.0,
        return_binary_maps=True,
    )[0]
    order = sorted(range(len(theirs["segments_info"])), key=lambda i: -theirs["segments_info"][i]["score"])
    assert len(ours) == len(order) == 5
    for instance, i in zip(ours, order):
        assert instance.label == theirs["segments_info"][i]["label_id"]
        assert instance.score == pytest.approx(theirs["segments_info"][i]["score"], abs=1e-6)
        assert torch.equal(instance.mask, theirs["segmentation"][i].bool())


@pytest.mark.parametrize("image_size, box", [((48, 80), (12, 8, 36, 24)), ((24, 40), (6, 4, 18, 12))])
def test_padding_is_cropped_and_masks_reach_image_pixels(image_size, box):
    """A block of stride-4 mask cells at rows 2-5, columns 3-8 of a 64x96 padded input whose image
    area is 48x80: the mask covers input pixels 8..23 x 12..35, then scales with the image."""
    class_logits = torch.tensor([[0.0, 10.0, 0.0, 0.0, 0.0]])
    mask_logits = torch.full((1, 16, 24), -10.0)
    mask_logits[0, 2:6, 3:9] = 10.0
    (instance,) = mask2former_instances(class_logits, mask_logits, (64, 96), (48, 80), image_size)
    assert instance.label == 1 and instance.mask.shape == image_size
    assert mask_box(instance.mask) == box
    class_probability = torch.softmax(class_logits[0], 0)[1].item()
    assert 0.5 * class_probability < instance.score < class_probability
    assert mask2former_instances(class_logits, mask_logits, (64, 96), (48, 80), image_size, score_floor=0.999) == []


def test_preprocessing_matches_the_image_processor(model_dirs, detector):
    """Where transformers' processor neither stretches to the size divisor nor pads, its pixels are ours."""
    from transformers import Mask2FormerImageProcessorPil

    processor = Mask2FormerImageProcessorPil.from_pretrained(model_dirs[0])
    detector.load(torch.device("cpu"))
    for height, width in [(SIZE, SIZE), (32, 48)]:  # 32x48 → x2 → 64x96, already a multiple of 32
        images = _images(2, height, width, seed=width)
        pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
        expected = processor(images=pil, return_tensors="pt").pixel_values
        ours, resized = detector.preprocess(images)
        assert ours.shape == expected.shape and resized == tuple(expected.shape[-2:])
        if (height, width) == (SIZE, SIZE):
            torch.testing.assert_close(ours, expected)  # no resize: identical
        else:  # bilinear in torch vs PIL on uint8: close on average
            assert (ours - expected).abs().mean() < 0.02
    padded, resized = detector.preprocess(_images(1, 48, 80))
    assert padded.shape == (1, 3, 64, 96) and resized == (58, 96)
    assert padded[..., 58:, :].abs().max() == 0  # zero padding at the bottom, after normalisation


def test_input_geometry_keeps_the_aspect_ratio(model_dirs):
    detector = Mask2FormerClipDetector(*model_dirs)  # processor: shortest edge 64, longest 96, divisor 32
    detector.load(torch.device("cpu"))
    assert detector.input_geometry(64, 64) == ((64, 64), (64, 64))
    assert detector.input_geometry(48, 80) == ((58, 96), (64, 96))  # the longest edge binds: x1.2
    assert detector.input_geometry(512, 512) == ((64, 64), (64, 64))
    mmdet_like = Mask2FormerClipDetector(*model_dirs, shortest_edge=800, longest_edge=1333)
    mmdet_like.load(torch.device("cpu"))
    assert mmdet_like.input_geometry(512, 512) == ((800, 800), (800, 800))
    assert mmdet_like.input_geometry(512, 768) == ((800, 1200), (800, 1216))


# ---------------------------------------------------------------------------------------- injected instances


def test_box_is_the_mask_extent_and_names_follow_the_aliases(model_dirs, monkeypatch):
    detector = Mask2FormerClipDetector(*model_dirs, score_floor=0.0)
    ell = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    ell[10:40, 5:9] = True
    ell[36:40, 5:30] = True
    speck = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    speck[63, 0] = True
    blob = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(1)) > 0.97
    _inject(detector, monkeypatch, [[(MOUSE, 0.8, ell), (REMOTE, 0.6, speck)], [(CAT, 0.7, blob)]])
    detections = detector(_images(2))
    for image_detections, masks in zip(detections, [[ell, speck], [blob]]):
        for detection, mask in zip(image_detections, masks):
            rows, cols = np.where(mask.numpy())
            assert detection.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert detections[0][0].box == (5, 10, 30, 40) and detections[0][1].box == (0, 63, 1, 64)
    assert [(d.cls, d.score) for d in detections[0]] == [("computer mouse", 0.8), ("tv remote", 0.6)]
    plain = Mask2FormerClipDetector(*model_dirs, score_floor=0.0, aliases={})
    _inject(plain, monkeypatch, [[(MOUSE, 0.8, ell)]])
    assert plain(_images(1))[0][0].cls == "mouse"


def test_colour_is_the_argmax_of_clip_similarities_on_the_masked_crop(detector, clip_reference, monkeypatch):
    # Each mask's extent is exactly 32x32, the tiny CLIP's input: no resize, so the PIL reference path
    # sees the very pixels the detector's torch path sees.
    disc = ((torch.arange(32) - 15.5)[:, None] ** 2 + (torch.arange(32) - 15.5)[None] ** 2) <= 16.5**2
    masks = []
    for top, left, shape in [(0, 0, disc), (20, 30, disc), (32, 32, torch.ones(32, 32, dtype=torch.bool))]:
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[top : top + 32, left : left + 32] = shape
        masks.append(mask)
    images = _images(2, seed=7)
    instances = [[(CAT, 0.9, masks[0]), (DOG, 0.8, masks[1])], [(MOUSE, 0.9, masks[2]), (CAT, 0.5, masks[0])]]
    _inject(detector, monkeypatch, instances)
    recorded = []  # the similarities behind the detector's choices, to compare whole profiles below
    color_similarities = detector.color_similarities
    monkeypatch.setattr(detector, "color_similarities", lambda *a: recorded.append(color_similarities(*a)) or recorded[-1])
    detections = detector(images)
    ours = iter(recorded[0])
    for image, image_detections, image_instances in zip(images, detections, instances):
        for detection, (_, _, mask) in zip(image_detections, image_instances):
            expected, similarities = _reference_color(clip_reference, image, mask, detection.cls)
            top2 = similarities.topk(2).values
            assert top2[0] - top2[1] > 1e-5  # the reference's choice is not a numerical tie
            assert detection.color == expected
            # Not only the argmax (a random CLIP favours few colours): the whole similarity profile.
            torch.testing.assert_close(next(ours), similarities, rtol=0, atol=1e-5)


def test_end_to_end_geneval_verdicts(model_dirs, clip_reference, monkeypatch):
    mask2former, clip = model_dirs
    spec = {"kind": "mask2former", "model_path": str(mask2former), "clip_path": str(clip)}  # default floor 0.3
    reward = build("geneval", detector=spec)
    partial = build("geneval_partial", detector=spec)
    left, right, top = _rect(0, 20, 16, 40), _rect(40, 24, 60, 44), _rect(22, 0, 42, 12)
    square = _rect(16, 16, 48, 48)
    images = _images(5, seed=11)
    colour, _ = _reference_color(clip_reference, images[2], square, "cat")
    other_colour = next(c for c in COLORS if c != colour)
    injected = [
        [(CAT, 0.95, left), (CAT, 0.92, right), (CAT, 0.6, top)],  # two cats above the counting threshold
        [(CAT, 0.9, left), (DOG, 0.8, right)],  # a dog right of a cat
        [(CAT, 0.9, square)],
        [(MOUSE, 0.4, left), (REMOTE, 0.3, right)],  # 0.3 is not above GenEval's threshold
        [(DOG, 0.99, top), (CAT, 0.7, left)],
    ]
    for r in (reward, partial):
        _inject(r.detector, monkeypatch, injected)
    metadata = [
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
        {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]},
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": colour}]},
        {"tag": "two_object", "include": [{"class": "computer mouse", "count": 1}, {"class": "tv remote", "count": 1}]},
        {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["below", 0]}]},
    ]
    prompts = ["two cats", "a dog right of a cat", f"a {colour} cat", "a computer mouse and a tv remote", "a dog below a cat"]
    # By hand: 1) cats 0.95, 0.92 > 0.9, 0.6 is not, so 2 < 3 → correct; 2) dog centre x 50 vs cat 8 → right;
    # 3) the colour CLIP picks; 4) the remote (0.3) is not kept; 5) the dog (centre y 6) is above the cat (30).
    assert reward(images, prompts, metadata).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # Partial credit: 4) count terms 1 and 0 → 0.5; 5) dog clause: count 1, position 0 → 0.5, cat 1 → 0.75.
    assert partial(images, prompts, metadata).tolist() == [1.0, 1.0, 1.0, 0.5, 0.75]
    metadata[2] = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": other_colour}]}
    assert reward(images, prompts, metadata).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
