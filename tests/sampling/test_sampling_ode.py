"""ODE samplers step by step against diffusers' own schedulers on the same velocity function."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from dgpo_lightning.sampling import flow_sigmas, ode_dpm, ode_euler

SHAPE = (4, 3, 6, 6)


def make_velocity():
    """A fixed nonlinear, time-dependent velocity field (no learned model needed)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(SHAPE[1], SHAPE[1], generator=g) / 2
    b = torch.randn(SHAPE[1:], generator=g) / 4

    def velocity(x, t):
        t = t.view(-1, 1, 1, 1)
        mixed = torch.einsum("ij,bjhw->bihw", w.to(x.dtype), x)
        return torch.tanh(mixed) * (1 + t) + b.to(x.dtype) * torch.cos(3 * t) + 0.3 * x * t

    return velocity


def diffusers_rollout(scheduler, velocity, x, sigmas):
    """Run a diffusers scheduler's ``step`` loop, feeding the velocity at the scheduler's sigma."""
    states = [x]
    for i, timestep in enumerate(scheduler.timesteps):
        t = sigmas[i].expand(x.shape[0])
        x = scheduler.step(velocity(x, t), timestep, x).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("num_steps", [1, 10, 20])
def test_euler_matches_flow_match_euler_scheduler(num_steps):
    velocity = make_velocity()
    x = torch.randn(SHAPE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)  # diffusers' own (SD3 default) schedule
    expected = diffusers_rollout(scheduler, velocity, x, scheduler.sigmas)
    out = ode_euler(velocity, x, scheduler.sigmas, return_trajectory=True)
    assert out.trajectory.shape == (num_steps + 1, *SHAPE) and out.log_probs is None
    torch.testing.assert_close(out.trajectory, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sample, expected[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [2, 10, 20])
def test_dpm_matches_dpm_solver_multistep_on_its_own_flow_sigmas(num_steps):
    velocity = make_velocity()
    x = torch.randn(SHAPE)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    scheduler.set_timesteps(num_steps)
    expected = diffusers_rollout(scheduler, velocity, x, scheduler.sigmas)
    out = ode_dpm(velocity, x, scheduler.sigmas, return_trajectory=True)
    torch.testing.assert_close(out.trajectory, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("num_steps", [3, 10])
def test_dpm_matches_dpm_solver_multistep_on_flow_sigmas_from_one(num_steps):
    """Our schedule starts at exactly 1 (λ = −∞): diffusers gives the same steps on it."""
    velocity = make_velocity()
    x = torch.randn(SHAPE)
    sigmas = flow_sigmas(num_steps, shift=3.0)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    scheduler.set_timesteps(num_steps)
    scheduler.sigmas = sigmas.clone()  # same solver, our sigmas (diffusers cannot start at sigma = 1 itself)
    expected = diffusers_rollout(scheduler, velocity, x, sigmas)
    assert torch.isfinite(expected).all()
    out = ode_dpm(velocity, x, sigmas, return_trajectory=True)
    torch.testing.assert_close(out.trajectory, expected, rtol=1e-5, atol=2e-5)


def test_dpm_differs_from_euler_and_first_step_is_euler():
    velocity = make_velocity()
    x = torch.randn(SHAPE)
    sigmas = flow_sigmas(10)
    euler = ode_euler(velocity, x, sigmas, return_trajectory=True).trajectory
    dpm = ode_dpm(velocity, x, sigmas, return_trajectory=True).trajectory
    # first-order DPM-Solver++ is DDIM, which for flow matching is the Euler step
    torch.testing.assert_close(dpm[1], euler[1], rtol=1e-6, atol=1e-6)
    assert (dpm[-1] - euler[-1]).abs().max() > 1e-3


def test_ode_dtype_and_partial_schedule():
    velocity = make_velocity()
    x = torch.randn(SHAPE, dtype=torch.float64)
    sigmas = flow_sigmas(6, dtype=torch.float64)
    for sampler in (ode_euler, ode_dpm):
        full = sampler(velocity, x, sigmas, return_trajectory=True)
        assert full.sample.dtype == torch.float64 and full.trajectory is not None
        assert sampler(velocity, x, sigmas).trajectory is None
        # restarting from an intermediate state on the tail of the schedule (Euler: identical steps)
        if sampler is ode_euler:
            tail = sampler(velocity, full.trajectory[2], sigmas[2:])
            torch.testing.assert_close(tail.sample, full.sample)
