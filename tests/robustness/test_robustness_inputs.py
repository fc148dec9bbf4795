"""Bad input fails early with an error naming the problem; same seed on the same machine repeats exactly.

Covers: empty/malformed prompt files through ``RolloutDataModule``; a reward that needs GenEval
metadata on plain-text prompts; rewards returning NaN/inf for some images (their groups are skipped
with a warning naming the reward) or the wrong shape (``ValueError`` naming the reward); missing
model paths; out-of-range ``t_min`` and ``G``; reproducible rollouts and first training steps.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch

from dgpo_lightning.algo import group_advantages
from dgpo_lightning.data.datamodule import RolloutDataModule
from dgpo_lightning.data.rollout import generate_groups
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.sampling.settings import SamplerSettings
from dgpo_lightning.world.backbone import load_backbone as load_world

RECORDS = [{"prompt": "a photo of a red circle"}, {"prompt": "a photo of a bad square"}, {"prompt": "a photo of two triangles"}]


def brightness(images, prompts, metadata=None):
    return images.mean(dim=(1, 2, 3))


def data(**kwargs):
    defaults = dict(
        group_size=3, prompts_per_rank=2, num_steps=2, rewards={"test_brightness": 1.0}, eval_prompts=None, progress=False
    )
    defaults.update(kwargs)
    return RolloutDataModule(**defaults)


def trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="module")
def world(tiny_world_path):
    return load_world(tiny_world_path)


def rollout(world, reward, records=RECORDS, sampler="ode_dpm", **kwargs):
    options = dict(seed=3, settings=SamplerSettings(sampler, num_steps=2))
    options.update(kwargs)
    return generate_groups(world, records, 2, reward, **options)


# ---------------------------------------------------------------- prompt files


def test_empty_prompt_files_are_rejected_naming_the_file(tmp_path):
    for name, text in [("empty.txt", ""), ("blank.txt", "\n  \n\n"), ("empty.jsonl", "\n")]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="no prompts") as error:
            data(train_prompts=str(path))
        assert str(path) in str(error.value)
    # the held-out file is checked the same way (good.txt has the 2 distinct prompts a rollout of
    # prompts_per_rank=2 needs, so only the empty held-out file is at fault)
    good = tmp_path / "good.txt"
    good.write_text("a photo of a circle\na photo of a square\n", encoding="utf-8")
    assert [r["prompt"] for r in data(train_prompts=str(good)).records] == ["a photo of a circle", "a photo of a square"]
    empty = tmp_path / "empty.txt"
    with pytest.raises(ValueError, match="no prompts") as error:
        data(train_prompts=str(good), eval_prompts=str(empty))
    assert "data.eval_prompts" in str(error.value) and str(empty) in str(error.value)


@pytest.mark.parametrize(
    "lines, line_number, expected",
    [
        (['{"prompt": "a red circle"}', '{"prompt": "a blue', '{"prompt": "x"}'], 2, "not valid JSON"),
        (['{"prompt": "a red circle"}', '{"text": "no prompt key"}'], 2, "non-empty string 'prompt'"),
        (['["a list, not an object"]'], 1, "non-empty string 'prompt'"),
        (['{"prompt": ""}'], 1, "non-empty string 'prompt'"),
        (['{"prompt": 3}'], 1, "non-empty string 'prompt'"),
    ],
)
def test_malformed_jsonl_is_rejected_naming_file_and_line(tmp_path, lines, line_number, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        data(train_prompts=str(path))
    message = str(error.value)
    assert f"{path}:{line_number}:" in message and expected in message


def test_missing_prompt_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "prompts.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data(train_prompts=str(missing))


def test_geneval_reward_on_prompts_without_metadata_fails_when_the_data_module_is_built(tmp_path):
    """A plain-text prompt file has no include/exclude clauses: building the data module (before any
    model is loaded or rollout drawn) refuses it, naming the key, the file and what is missing."""
    from dgpo_lightning.errors import ConfigError

    path = tmp_path / "plain.txt"
    path.write_text("a photo of a red circle\na photo of two squares\n", encoding="utf-8")
    options = dict(train_prompts=str(path), group_size=2, prompts_per_rank=1)
    with pytest.raises(ConfigError) as error:
        data(rewards={"geneval": 1.0}, **options)
    message = str(error.value)
    assert "GenEval" in message and "metadata" in message and "include" in message
    assert "data.train_prompts" in message and f"{path}:1" in message
    # The file itself is fine: a reward that needs no metadata accepts it.
    assert len(data(rewards={"test_brightness": 1.0}, **options).records) == 2


# ---------------------------------------------------------------- rewards that misbehave


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_skip_their_groups_with_a_warning_naming_the_reward(world, bad_value):
    def flaky(images, prompts, metadata=None):
        scores = images.mean(dim=(1, 2, 3)).clone()
        hit = [i for i, p in enumerate(prompts) if "bad" in p][:1]  # one image of one group
        scores[hit] = bad_value
        return scores

    reward = WeightedReward({"flaky_scorer": flaky, "brightness": brightness}, {"flaky_scorer": 1.0, "brightness": 0.5})
    with pytest.warns(UserWarning) as caught:
        result = rollout(world, reward)
    message = " ".join(str(w.message) for w in caught)
    assert "flaky_scorer" in message and "brightness" not in message.split("reward(s)")[1].split("returned")[0]
    assert result.dropped_groups == [1]
    assert sorted(result.group_index.unique().tolist()) == [0, 2]
    assert result.prompts == [RECORDS[0]["prompt"]] * 2 + [RECORDS[2]["prompt"]] * 2
    assert torch.isfinite(result.rewards).all() and torch.isfinite(result.advantages).all()
    # the kept groups are scored and normalised exactly as if the bad group had never been there
    clean = rollout(world, WeightedReward({"brightness": brightness}), records=[RECORDS[0], RECORDS[2]], group_ids=[0, 2])
    torch.testing.assert_close(result.latents, clean.latents)
    torch.testing.assert_close(result.rewards, 1.5 * clean.rewards)
    torch.testing.assert_close(result.advantages, group_advantages(1.5 * clean.rewards, clean.group_index))


def test_a_reward_that_is_non_finite_everywhere_stops_the_rollout(world):
    nan_everywhere = WeightedReward({"broken_scorer": lambda images, prompts, metadata=None: torch.full((images.shape[0],), math.nan)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="every rollout group"):
            rollout(world, nan_everywhere)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda images: images.mean(dim=(2, 3)),  # [B, 3]
        lambda images: images.mean(dim=(1, 2, 3))[:-1],  # [B - 1]
        lambda images: images.mean(),  # scalar
        lambda images: images.mean(dim=(1, 2, 3)).tolist(),  # not a tensor
    ],
    ids=["per-channel", "one-short", "scalar", "list"],
)
def test_wrong_shape_rewards_raise_naming_the_reward(world, wrong):
    reward = WeightedReward({"brightness": brightness, "misshapen_scorer": lambda images, prompts, metadata=None: wrong(images)})
    with pytest.raises(ValueError, match="misshapen_scorer") as error:
        rollout(world, reward)
    assert "expected a tensor of shape" in str(error.value)


# ---------------------------------------------------------------- model paths and config values


@pytest.mark.parametrize("backbone", ["world", "sd3"])
def test_missing_model_path_is_named(tmp_path, backbone):
    missing = tmp_path / "no_such_model"
    module = DGPOModule(backbone=backbone, model_path=str(missing))
    with pytest.raises((FileNotFoundError, OSError)) as error:
        module.configure_model()
    assert str(missing) in str(error.value)


def test_model_directory_of_the_wrong_kind_is_named(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    for backbone, expected in [("world", "unet/"), ("sd3", "model_index.json")]:
        with pytest.raises(FileNotFoundError) as error:
            DGPOModule(backbone=backbone, model_path=str(empty)).configure_model()
        assert str(empty) in str(error.value) and expected in str(error.value)


def test_sd3_without_a_model_path_is_named():
    with pytest.raises(ValueError, match="model.model_path"):
        DGPOModule(backbone="sd3", model_path=None).configure_model()


@pytest.mark.parametrize("t_min", [1.0, 1.5, -0.1, math.nan])
def test_t_min_outside_the_unit_interval_names_the_key(t_min):
    with pytest.raises(ValueError, match=r"model\.t_min="):
        DGPOModule(t_min=t_min)


def test_t_min_final_at_one_names_the_key():
    with pytest.raises(ValueError, match=r"model\.t_min_final="):
        DGPOModule(t_min=0.2, t_min_final=1.0)


@pytest.mark.parametrize("group_size", [1, 0, -2])
def test_group_size_below_two_names_the_key(world, group_size):
    with pytest.raises(ValueError, match=r"data\.group_size="):
        data(group_size=group_size)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        reward = WeightedReward({"brightness": brightness})
        generate_groups(world, RECORDS, group_size, reward, seed=0, settings=SamplerSettings(num_steps=1))


def test_a_batch_larger_than_the_ranks_groups_names_the_key():
    with pytest.raises(ValueError, match=r"data\.groups_per_batch="):
        data(prompts_per_rank=2, groups_per_batch=3)


# ---------------------------------------------------------------- same seed, same machine


@pytest.mark.parametrize("sampler", ["ode_dpm", "sde"])
def test_same_seed_gives_identical_rollouts(world, sampler):
    reward = WeightedReward({"brightness": brightness})
    first = rollout(world, reward, sampler=sampler, keep_trajectory=True)
    second = rollout(world, reward, sampler=sampler, keep_trajectory=True)
    other = rollout(world, reward, sampler=sampler, keep_trajectory=True, seed=4)
    for name in ["latents", "rewards", "advantages", "group_index", "trajectory"]:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    if sampler == "sde":
        assert torch.equal(first.log_probs, second.log_probs)
    assert first.prompts == second.prompts
    assert not torch.equal(first.latents, other.latents)  # the seed matters


def test_same_seed_gives_identical_first_two_training_steps(tmp_path, tiny_world_path):
    """Two fresh 2-step fits (rollout + two optimizer steps) end with bit-identical weights."""

    runs = []

    def fit(seed):
        L.seed_everything(seed)
        module = DGPOModule(model_path=str(tiny_world_path), lr=1e-3, seed=seed, t_min=0.3)
        runs.append(seed)
        run = trainer(tmp_path / f"run{len(runs)}", max_steps=2)
        run.fit(module, data(seed=seed, group_size=3, prompts_per_rank=2, groups_per_batch=1))
        assert run.global_step == 2
        return torch.cat([p.detach().flatten() for p in module.backbone.denoiser.parameters()])

    init = torch.cat([p.flatten() for p in load_world(tiny_world_path).denoiser.parameters()])
    a, b, c = fit(0), fit(0), fit(1)
    assert not torch.equal(a, init)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
