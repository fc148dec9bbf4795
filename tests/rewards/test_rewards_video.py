"""Video rewards on ``[B, F, 3, H, W]`` videos: ``frame_mean`` against the image reward applied frame by
frame, ``temporal_consistency`` against sums written out frame pair by frame pair, its open_clip
features against a tiny random open_clip model loaded by hand through open_clip's own PIL transform."""

import pytest
import torch
from PIL import Image

import open_clip
from dgpo_lightning.models.testing import TINY_OPEN_CLIP_CONFIG, save_tiny_open_clip
from dgpo_lightning.rewards import available, build, build_weighted, register
from dgpo_lightning.rewards.video import frame_indices

SIZE = TINY_OPEN_CLIP_CONFIG["vision_cfg"]["image_size"]
PROMPTS = ["a cat", "a red apple on a table"]


@register("_test_video_brightness")
def _brightness(power: float = 2.0):
    """Mean brightness to a power, and the prompt length added (to see prompts travel with frames)."""
    def reward(images, prompts, metadata=None):
        assert images.ndim == 4 and images.shape[0] == len(prompts) == len(metadata)
        return images.mean(dim=(1, 2, 3)) ** power + torch.tensor([len(p) for p in prompts], dtype=torch.float32)
    return reward


def _ramp(frames=5, batch=2, size=8):
    """Video ``b``'s frame ``f`` is the constant ``(f / (F - 1)) * (b + 1) / batch``."""
    level = torch.arange(frames).float() / (frames - 1)
    scale = (torch.arange(batch).float() + 1) / batch
    return (scale[:, None] * level[None, :])[:, :, None, None, None].expand(batch, frames, 3, size, size).clone()


def _videos(batch=2, frames=4, size=SIZE, seed=0):
    # Multiples of 1/255, so that a PIL path sees exactly the same pixels.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, size, size), generator=g).float() / 255


def test_video_rewards_are_registered():
    assert {"frame_mean", "temporal_consistency"} <= set(available())


def test_frame_mean_is_the_mean_of_the_image_reward_over_frames():
    videos = _ramp()
    image_reward = build("jpeg_incompressibility")
    expected = torch.stack([image_reward(videos[:, f], PROMPTS) for f in range(5)], dim=1).mean(dim=1)
    got = build("frame_mean", reward="jpeg_incompressibility")(videos, PROMPTS)
    torch.testing.assert_close(got, expected)
    # Options reach the image reward (JPEG quality changes the size).
    low = build("frame_mean", reward="jpeg_incompressibility", options={"quality": 10})(videos, PROMPTS)
    assert not torch.allclose(low, got)


@pytest.mark.parametrize(("options", "indices"), [({}, [0, 1, 2, 3, 4]), ({"frames": 3}, [0, 2, 4]),
                                                  ({"frames": 1}, [2]), ({"stride": 4}, [0, 4]),
                                                  ({"frames": 9}, [0, 1, 2, 3, 4])])
def test_frame_selection_and_prompts_travel_with_their_frames(options, indices):
    videos = _ramp()
    got = build("frame_mean", reward="_test_video_brightness", options={"power": 2.0}, **options)(videos, PROMPTS)
    scale = torch.tensor([0.5, 1.0])
    levels = torch.tensor([[(f / 4 * s) ** 2 for f in indices] for s in scale.tolist()])
    expected = levels.mean(dim=1) + torch.tensor([len(p) for p in PROMPTS], dtype=torch.float32)
    torch.testing.assert_close(got, expected)
    assert frame_indices(33, stride=4).tolist() == list(range(0, 33, 4))  # Flow-GRPO's video OCR frames


def test_frame_mean_batches_frames_and_takes_images_as_one_frame_videos():
    videos = _ramp(frames=5, batch=3)
    prompts = PROMPTS + ["x"]
    whole = build("frame_mean", reward="_test_video_brightness")(videos, prompts)
    chunked = build("frame_mean", reward="_test_video_brightness", batch_size=4)(videos, prompts)
    torch.testing.assert_close(chunked, whole)
    images = videos[:, 2]
    torch.testing.assert_close(build("frame_mean", reward="_test_video_brightness")(images, prompts),
                               build("_test_video_brightness")(images, prompts, [None] * 3))


def test_frame_mean_errors_name_the_problem():
    with pytest.raises(ValueError, match="reward=<name"):
        build("frame_mean")
    with pytest.raises(ValueError, match="video reward"):
        build("frame_mean", reward="temporal_consistency")
    with pytest.raises(ValueError, match="not both"):
        build("frame_mean", reward="jpeg_incompressibility", frames=2, stride=2)
    reward = build("frame_mean", reward="jpeg_incompressibility")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(torch.rand(2, 5, 4, 8, 8), PROMPTS)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        reward(torch.rand(2, 5, 3, 8, 8), PROMPTS[:1])


def test_pixel_consistency_is_one_minus_the_mean_frame_difference():
    videos = _videos(frames=4, size=8)
    expected = []
    for video in videos:
        diffs = [(video[f + 1] - video[f]).abs().mean() for f in range(3)]
        expected.append(1 - sum(diffs) / 3)
    reward = build("temporal_consistency")
    torch.testing.assert_close(reward(videos, PROMPTS), torch.stack(expected))
    static = videos[:, :1].expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(reward(static, PROMPTS), torch.ones(2))
    assert (reward(videos, PROMPTS) < 0.9).all()  # independent random frames are far from steady
    torch.testing.assert_close(build("temporal_consistency", scale=2.0)(videos, PROMPTS), 2 * reward(videos, PROMPTS))
    torch.testing.assert_close(reward(videos[:, 0], PROMPTS), torch.ones(2))  # images: one frame


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


def _embed_by_hand(weights, frames):
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    transform = open_clip.image_transform(SIZE, is_train=False)
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in frames]
    with torch.no_grad():
        e = model.encode_image(torch.stack([transform(p) for p in pil]))
    return e / e.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("reference", ["previous", "first_and_previous"])
def test_open_clip_feature_consistency_matches_embeddings_by_hand(clip_weights, reference):
    videos = _videos(frames=4)
    reward = build("temporal_consistency", features="open_clip", reference=reference, model_path=str(clip_weights),
                   model_config=TINY_OPEN_CLIP_CONFIG, batch_size=3)
    expected = []
    for video in videos:
        e = _embed_by_hand(clip_weights, video)
        previous = [float(e[f] @ e[f - 1]) for f in range(1, 4)]
        if reference == "previous":
            expected.append(sum(previous) / 3)
        else:
            expected.append(sum((float(e[f] @ e[0]) + previous[f - 1]) / 2 for f in range(1, 4)) / 3)
    torch.testing.assert_close(reward(videos, PROMPTS), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    static = videos[:, :1].expand(-1, 4, -1, -1, -1)
    torch.testing.assert_close(reward(static, PROMPTS), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_temporal_consistency_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="features must be"):
        build("temporal_consistency", features="dino")
    with pytest.raises(ValueError, match="need features: open_clip"):
        build("temporal_consistency", model_path="x.pt")
    with pytest.raises(ValueError, match="reference"):
        build("temporal_consistency", reference="first_and_previous")
    reward = build("temporal_consistency", features="open_clip", model_config=TINY_OPEN_CLIP_CONFIG)
    with pytest.raises(ValueError, match="model_path"):
        reward(_videos(), PROMPTS)


def test_weighted_video_rewards_score_decoded_videos():
    videos = _ramp(frames=5, size=SIZE)
    weighted = build_weighted({"frame_mean": 1.0, "temporal_consistency": 0.5},
                              frame_mean={"reward": "jpeg_incompressibility", "frames": 2})
    parts = weighted.components(videos, PROMPTS, batch_size=1)
    assert parts.keys() == {"frame_mean", "temporal_consistency"} and parts["frame_mean"].shape == (2,)
    torch.testing.assert_close(weighted.total(parts), parts["frame_mean"] + 0.5 * parts["temporal_consistency"])


def test_an_image_reward_given_videos_points_to_frame_mean():
    from dgpo_lightning.rewards.base import check_images

    with pytest.raises(ValueError, match="frame_mean"):
        check_images("sharpness", torch.rand(2, 4, 3, 8, 8))
