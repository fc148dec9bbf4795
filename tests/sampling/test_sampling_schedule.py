"""Sigma schedules and seeded noise, checked against diffusers' schedulers and torch's own RNG; the seed
derivation (sampling/seeds.py) and the sampler settings (sampling/settings.py)."""


import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from dgpo_lightning.sampling import SAMPLERS, flow_sigmas, initial_noise, time_shift
from dgpo_lightning.sampling.seeds import (
    MIX,
    chain,
    draw_seeds,
    member_seeds,
    rollout_seed,
    sde_noise_seeds,
    training_generator,
)
from dgpo_lightning.sampling.settings import SAMPLER_NAMES, SamplerSettings


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
def test_flow_sigmas_ends_and_monotone(num_steps):
    sigmas = flow_sigmas(num_steps)
    assert sigmas.shape == (num_steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_shift_one_is_linear_and_shift_formula():
    torch.testing.assert_close(flow_sigmas(8, shift=1.0, dtype=torch.float64), torch.linspace(1, 0, 9, dtype=torch.float64))
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = 3.0
    # the shift is the map that turns SNR-like ratio t/(1-t) into s·t/(1-t)
    shifted = time_shift(t, s)[1:-1]
    torch.testing.assert_close(shifted / (1 - shifted), s * t[1:-1] / (1 - t[1:-1]))
    with pytest.raises(ValueError):
        flow_sigmas(0)
    with pytest.raises(ValueError):
        flow_sigmas(10, shift=0.0)


@pytest.mark.parametrize("num_steps", [5, 10, 28])
def test_flow_sigmas_equal_diffusers_flow_match_euler_on_the_flux_grid(num_steps):
    """FlowMatchEulerDiscreteScheduler(shift=3) given the grid linspace(1, 1/N, N) gives our schedule."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps))
    torch.testing.assert_close(scheduler.sigmas, flow_sigmas(num_steps, shift=3.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_steps", [5, 10])
def test_diffusers_default_grids_are_our_shift_on_slightly_different_grids(num_steps):
    """Documented difference: diffusers' default grids stop short of t = 1 / t = 0 before shifting."""
    ours = flow_sigmas(num_steps, shift=3.0, dtype=torch.float64)
    # FlowMatchEuler default: linspace(1, time_shift(1/1000), N), shifted (again), then 0 appended
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(num_steps)
    grid = np.linspace(1.0, float(time_shift(1 / 1000, 3.0)), num_steps)
    torch.testing.assert_close(euler.sigmas[:-1].double(), time_shift(torch.from_numpy(grid), 3.0), rtol=1e-6, atol=1e-6)
    assert euler.sigmas[0].item() == 1.0 and euler.sigmas[-1].item() == 0.0
    # DPM-Solver++ with flow sigmas: linspace(1 - 1/1000, 0, N + 1), shifted: within 1e-3 of ours
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    dpm.set_timesteps(num_steps)
    grid = torch.linspace(1 - 1 / 1000, 0, num_steps + 1, dtype=torch.float64)
    torch.testing.assert_close(dpm.sigmas.double(), time_shift(grid, 3.0), rtol=1e-6, atol=1e-6)
    assert (dpm.sigmas.double() - ours).abs().max() < 1e-3
    assert dpm.sigmas[0].item() < 1.0


def test_initial_noise_is_per_seed_torch_randn_and_batch_split_free():
    shape = (3, 5, 4)
    seeds = [11, 7, 2**40, 0, 123456789, 5]
    noise = initial_noise(shape, seeds)
    assert noise.shape == (6, *shape)
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(noise[i], torch.randn(shape, generator=torch.Generator().manual_seed(seed)), rtol=0, atol=0)
    halves = torch.cat([initial_noise(shape, seeds[:3]), initial_noise(shape, seeds[3:])])
    assert torch.equal(noise, halves)
    assert torch.equal(initial_noise(shape, seeds, dtype=torch.float64), noise.double())
    assert not torch.allclose(noise[0], noise[1])


# ------------------------------------------------------------------ sampling/seeds.py


def test_member_seeds_of_a_group_do_not_depend_on_the_other_groups_listed():
    seeds = member_seeds(7, [0, 1, 2, 3, 4], 4)
    assert len(seeds) == 20 and len(set(seeds)) == 20
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in seeds)
    # group-major: entry g·G + j is member j of group g, whichever groups are listed, in any order
    assert member_seeds(7, [3], 4) == seeds[12:16]
    assert member_seeds(7, [4, 1], 4) == seeds[16:20] + seeds[4:8]
    assert member_seeds(7, range(2), 4) == seeds[:8]
    # the formula every measured number rests on: G draws from the seed chained with the group id
    for g in range(5):
        assert seeds[4 * g : 4 * g + 4] == draw_seeds(chain(7, g), 4)
        generator = torch.Generator().manual_seed(7 * 1_000_003 + g)
        assert seeds[4 * g : 4 * g + 4] == torch.randint(0, 2**62, (4,), generator=generator).tolist()


def test_raising_group_size_only_appends_seeds():
    small, large = member_seeds(3, [0, 5, 9], 2), member_seeds(3, [0, 5, 9], 6)
    for g in range(3):
        assert large[6 * g : 6 * g + 2] == small[2 * g : 2 * g + 2]
    assert draw_seeds(11, 8)[:3] == draw_seeds(11, 3)


def test_different_seeds_and_epochs_give_disjoint_seeds():
    assert rollout_seed(5, 2) == chain(5, 2) == 5 * 1_000_003 + 2
    groups, size = range(6), 4
    runs = {(seed, epoch): member_seeds(rollout_seed(seed, epoch), groups, size) for seed in (0, 1, 1234) for epoch in (0, 1, 2)}
    everything = [s for seeds in runs.values() for s in seeds]
    assert len(set(everything)) == len(everything) == 9 * 6 * 4
    # held-out images use the evaluation seed directly, one "group" per prompt: also disjoint from rollouts
    assert set(member_seeds(1234, range(6), 4)).isdisjoint(runs[(0, 1)])


def test_sde_noise_seeds_differ_from_the_initial_seeds():
    seeds = member_seeds(rollout_seed(0, 0), range(4), 4)
    noise_seeds = sde_noise_seeds(seeds)
    assert len(noise_seeds) == len(seeds) and len(set(noise_seeds)) == len(seeds)
    assert noise_seeds == [s + MIX for s in seeds] and MIX == 1_000_003
    assert set(noise_seeds).isdisjoint(seeds)
    # a sample's step noise is not its initial noise (nor any other sample's of the same rollout)
    initial, step = initial_noise((2, 3, 3), seeds), initial_noise((2, 3, 3), noise_seeds)
    assert not any(torch.allclose(step[i], initial[j]) for i in range(len(seeds)) for j in range(len(seeds)))
    # per sample: independent of which other samples are in the batch
    assert sde_noise_seeds(seeds[5:7]) == noise_seeds[5:7]


def test_training_generator_is_a_pure_function_of_seed_step_and_salt():
    def draws(seed, step, salt=0):
        generator = training_generator(seed, step, salt)
        return torch.rand(3, generator=generator), torch.randn(2, 2, generator=generator)

    reference = draws(1, 10, 4)
    torch.manual_seed(999)  # the global RNG state plays no part
    torch.rand(5)
    again = draws(1, 10, 4)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))
    assert training_generator(1, 10, 4).initial_seed() == chain(1, 10) * 65_537 + 4
    others = [draws(2, 10, 4), draws(1, 11, 4), draws(1, 10, 5), draws(1, 10)]
    for other in others:
        assert not torch.equal(other[0], reference[0]) and not torch.equal(other[1], reference[1])
    assert len({training_generator(seed, step, salt).initial_seed() for seed in range(3) for step in range(3) for salt in range(3)}) == 27


# ------------------------------------------------------------------ sampling/settings.py


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sampler="heun"),
        dict(sampler=None),
        dict(num_steps=0),
        dict(num_steps=-3),
        dict(num_steps=2.5),
        dict(num_steps=True),
        dict(shift=0.0),
        dict(shift=-1.0),
        dict(shift=float("nan")),
        dict(guidance_scale=0.0),
        dict(guidance_scale=float("inf")),
        dict(noise_level=-0.1),
        dict(noise_level=float("nan")),
    ],
)
def test_sampler_settings_reject_invalid_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplerSettings(**kwargs)


def test_sampler_settings_defaults_and_stochastic():
    settings = SamplerSettings()
    assert (settings.sampler, settings.num_steps, settings.shift, settings.guidance_scale, settings.noise_level) == (
        "ode_dpm", 10, None, None, 0.7
    )
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert [SamplerSettings(name).stochastic for name in SAMPLER_NAMES] == [name == "sde" for name in SAMPLER_NAMES]
    assert SamplerSettings(noise_level=0.0).noise_level == 0.0 and SamplerSettings(num_steps=1).num_steps == 1


def test_sampler_settings_resolve_against_a_backbone():
    class Declares:
        shift, default_guidance_scale = 2.0, 4.5

    class DeclaresNothing:
        pass

    unresolved = SamplerSettings("sde", num_steps=4, noise_level=0.5)
    with pytest.raises(ValueError, match="resolve"):
        unresolved.sigmas()
    resolved = unresolved.resolve(Declares())
    assert resolved == SamplerSettings("sde", num_steps=4, shift=2.0, guidance_scale=4.5, noise_level=0.5)
    assert unresolved.shift is None  # resolve() returns a copy
    assert SamplerSettings().resolve(DeclaresNothing()) == SamplerSettings(shift=3.0, guidance_scale=1.0)
    # explicit values win over the backbone's; resolving twice changes nothing
    explicit = SamplerSettings(shift=1.5, guidance_scale=2.0)
    assert explicit.resolve(Declares()) == explicit == explicit.resolve(Declares()).resolve(DeclaresNothing())
    torch.testing.assert_close(resolved.sigmas(), flow_sigmas(4, shift=2.0), rtol=0, atol=0)
    assert resolved.sigmas("cpu").device.type == "cpu"
