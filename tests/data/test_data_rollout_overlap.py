"""Rollouts overlap sampling and scoring: chunk k is scored while chunk k + 1 is sampled, with the same
numbers as scoring in turn, errors surfacing from the worker, and the waits logged."""

from __future__ import annotations

import threading

import pytest
import torch

from dgpo_lightning.data.rollout import generate_groups
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.rewards.geneval import GenEvalReward
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone as load_world

RECORDS = [
    {"prompt": "a photo of a red circle", "tag": "color", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {"prompt": "a photo of two squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
    {"prompt": "a photo of a blue triangle", "tag": "color", "include": [{"class": "triangle", "count": 1, "color": "blue"}]},
]


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def world(tiny_world_path):
    return load_world(tiny_world_path)


def _rollout(world, reward, *, overlap, sampler="ode_dpm", batch_size=4, keep_trajectory=False):
    return generate_groups(
        world, RECORDS, 4, reward, seed=7, settings=SamplerSettings(sampler, num_steps=2),
        batch_size=batch_size, overlap_scoring=overlap, keep_trajectory=keep_trajectory,
    )


@pytest.mark.parametrize("sampler", ["ode_dpm", "sde"])
def test_overlapped_scoring_gives_the_sequential_numbers(world, sampler):
    reward = WeightedReward({"geneval_partial": GenEvalReward("world", partial=True), "brightness": brightness}, {"brightness": 0.5})
    overlapped = _rollout(world, reward, overlap=True, sampler=sampler, keep_trajectory=True)
    sequential = _rollout(world, reward, overlap=False, sampler=sampler, keep_trajectory=True)
    assert overlapped.rewards.numel() == 12  # 3 chunks of 4 images
    for name in ("latents", "rewards", "advantages", "group_index", "trajectory"):
        assert torch.equal(getattr(overlapped, name), getattr(sequential, name)), name
    if sampler == "sde":
        assert torch.equal(overlapped.log_probs, sequential.log_probs)
    for name, values in sequential.reward_components.items():
        assert torch.equal(overlapped.reward_components[name], values)
    assert sequential.rewards.std() > 0  # the comparison is not between constants
    # The weighted sum is formed from the per-chunk components.
    expected = sequential.reward_components["geneval_partial"] + 0.5 * sequential.reward_components["brightness"]
    torch.testing.assert_close(sequential.rewards, expected)


def test_the_next_chunk_is_sampled_while_one_is_scored(world):
    decoded = threading.Condition()
    decodes = [0]
    original_decode = world.decode

    def counting_decode(latents):
        images = original_decode(latents)
        with decoded:
            decodes[0] += 1
            decoded.notify_all()
        return images

    threads = []

    def waiting_reward(images, prompts, metadata=None):
        # Scoring chunk k finishes only once chunk k + 1 has been decoded (or the last chunk): it
        # would never finish if sampling waited for it.
        threads.append(threading.current_thread().name)
        chunk = len(threads) - 1
        if chunk < 2:
            with decoded:
                went_on = decoded.wait_for(lambda: decodes[0] >= chunk + 2, timeout=60)
            assert went_on, "the sampler did not go on while a chunk was scored"
        return images.mean(dim=(1, 2, 3))

    world.decode = counting_decode
    try:
        rollout = _rollout(world, WeightedReward({"waiting": waiting_reward}), overlap=True)
    finally:
        world.decode = original_decode
    assert len(threads) == 3 and all(name.startswith("rewards") for name in threads)
    assert rollout.scoring_seconds > 0 and rollout.sampling_seconds > 0
    stats = rollout.stats()
    assert stats["rollout/reward_wait_seconds"] == rollout.reward_wait_seconds <= rollout.seconds


def test_sequential_scoring_waits_for_every_reward(world):
    rollout = _rollout(world, WeightedReward({"brightness": brightness}), overlap=False)
    assert rollout.reward_wait_seconds == pytest.approx(rollout.scoring_seconds, abs=0.05)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_reward_stops_the_rollout_with_its_error(world, overlap):
    calls = []

    def failing(images, prompts, metadata=None):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("reward server http://127.0.0.1:1 is down")
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(RuntimeError, match="127.0.0.1:1 is down"):
        _rollout(world, WeightedReward({"failing": failing}), overlap=overlap)
    assert not [t for t in threading.enumerate() if t.name.startswith("rewards")]  # no worker left behind


def test_advantage_clip_bounds_the_rollouts_advantages(world):
    from dgpo_lightning.algo import group_advantages

    reward = WeightedReward({"brightness": brightness}, {"brightness": 1.0})
    kwargs = dict(seed=7, settings=SamplerSettings("ode_dpm", num_steps=2), batch_size=12)
    plain = generate_groups(world, RECORDS, 4, reward, **kwargs)
    clipped = generate_groups(world, RECORDS, 4, reward, advantage_clip=0.5, **kwargs)
    assert plain.advantages.abs().max() > 0.5  # the clip bites
    expected = group_advantages(plain.rewards, plain.group_index, std="group").clamp(-0.5, 0.5)
    torch.testing.assert_close(clipped.advantages, expected)
    assert torch.equal(clipped.rewards, plain.rewards)
