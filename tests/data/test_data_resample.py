"""A rollout without any group of unequal rewards is drawn again (deterministically), then refused."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.rewards.base import _REGISTRY, register
from dgpo_lightning.sampling.seeds import resample_seed, rollout_seed

if "test_constant" not in _REGISTRY:

    @register("test_constant")
    def _constant(**_):
        return lambda images, prompts, metadata=None: torch.zeros(images.shape[0])

if "test_flaky" not in _REGISTRY:
    CALLS = {"n": 0}

    @register("test_flaky")
    def _flaky(**_):
        """Equal rewards on the first call, spread afterwards."""

        def score(images, prompts, metadata=None):
            CALLS["n"] += 1
            return torch.zeros(images.shape[0]) if CALLS["n"] == 1 else images.mean(dim=(1, 2, 3))

        return score


def fake_trainer(tiny_world_path):
    from dgpo_lightning.world.backbone import load_backbone

    module = nn.Module()
    module.backbone = load_backbone(tiny_world_path)
    return SimpleNamespace(lightning_module=module, reload_dataloaders_every_n_epochs=1, current_epoch=0, global_rank=0, world_size=1)


def data(reward, **kwargs):
    options = dict(train_prompts="world:train", group_size=2, prompts_per_rank=2, groups_per_batch=2, num_steps=1,
                   rewards={reward: 1.0}, eval_prompts=None, progress=False)
    return RolloutDataModule(**{**options, **kwargs})


def test_equal_rewards_resample_then_fail_naming_why(tiny_world_path):
    dm = data("test_constant")
    dm.trainer = fake_trainer(tiny_world_path)
    with pytest.warns(UserWarning, match="equal rewards") as record:
        with pytest.raises(ConfigError, match=r"every group had equal rewards.*data\.group_size.*data\.rewards.*skip_zero_std_groups=false"):
            dm.train_dataloader()
    assert sum("equal rewards" in str(w.message) for w in record) == dm.max_resamples
    assert dm.rollouts_done == dm.max_resamples + 1
    assert dm.images_generated == (dm.max_resamples + 1) * 4


def test_skip_zero_std_groups_false_trains_on_them(tiny_world_path):
    dm = data("test_constant", skip_zero_std_groups=False)
    dm.trainer = fake_trainer(tiny_world_path)
    assert len(dm.train_dataloader()) == 1


def test_resampled_rollout_is_deterministic(tiny_world_path):
    trainer = fake_trainer(tiny_world_path)
    results = []
    for _ in range(2):
        CALLS["n"] = 0
        dm = data("test_flaky")
        dm.trainer = trainer
        with pytest.warns(UserWarning, match="equal rewards"):
            batches = list(dm.train_dataloader())
        assert dm.last_resamples == 1 and dm.rollouts_done == 2
        results.append(batches)
    a, b = results
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):
        torch.testing.assert_close(x.latents, y.latents, rtol=0, atol=0)
        assert x.prompts == y.prompts


def test_resample_seeds_are_fresh_and_bounded():
    assert resample_seed(3, 5, 0) == rollout_seed(3, 5)
    seeds = {resample_seed(s, e, a) for s in (0, 1, 1234) for e in range(5) for a in range(1, 4)}
    assert len(seeds) == 3 * 5 * 3
    assert all(0 <= s < 2**40 for s in seeds)
    assert not seeds & {rollout_seed(s, e) for s in (0, 1, 1234) for e in range(100)}
    with pytest.raises(ValueError):
        resample_seed(0, 0, -1)
