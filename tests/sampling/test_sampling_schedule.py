"""Sigma schedules and seeded noise, checked against diffusers' schedulers and torch's own RNG."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from dgpo_lightning.sampling import flow_sigmas, group_seeds, initial_noise, time_shift


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


def test_group_seeds_shared_and_distinct():
    seeds = group_seeds(0, num_groups=5, group_size=4)
    assert len(seeds) == 20 and len(set(seeds)) == 20
    assert all(0 <= s < 2**63 for s in seeds)
    shared = group_seeds(0, num_groups=5, group_size=4, shared_in_group=True)
    assert [len(set(shared[g * 4 : (g + 1) * 4])) for g in range(5)] == [1] * 5
    assert len(set(shared)) == 5
    # group g's seeds do not depend on how many groups are drawn, but do depend on the base seed
    assert group_seeds(0, num_groups=2, group_size=4) == seeds[:8]
    assert set(group_seeds(1, num_groups=5, group_size=4)).isdisjoint(seeds)
    noise = initial_noise((2, 3, 3), shared)
    torch.testing.assert_close(noise[0], noise[3], rtol=0, atol=0)
    assert not torch.allclose(noise[0], noise[4])
