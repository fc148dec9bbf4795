"""Samplers on Gaussian data, whose flow velocity and ODE solution are known in closed form.

Data ``x0 ~ N(mu, diag(s²))``, ``ε ~ N(0, I)``, ``x_t = (1 − t)x0 + tε``. Per dimension ``x_t`` is
Gaussian with mean ``(1 − t)mu`` and variance ``V_t = (1 − t)²s² + t²``; ``Cov(ε, x_t) = t`` and
``Cov(x0, x_t) = (1 − t)s²``, so the flow velocity ``v = E[ε − x0 | x_t]`` is

    v(x, t) = (t − (1 − t)s²)·(x − (1 − t)mu) / V_t − mu.

The ODE solution is ``x_t = (1 − t)mu + sqrt(V_t)·z`` (check: ``d/dt`` gives ``v``), so noise ``z`` at
``t = 1`` maps exactly to ``mu + s·z`` at ``t = 0``.
"""

import pytest
import torch

from dgpo_lightning.sampling import flow_sigmas, initial_noise, ode_dpm, ode_euler, sde

MU = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
STD = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)


def gaussian_velocity(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 * STD**2 + t**2
    return (t - (1 - t) * STD**2) * (x - (1 - t) * MU) / var - MU


def marginal(t):
    return (1 - t) * MU, torch.sqrt((1 - t) ** 2 * STD**2 + t**2)


@pytest.fixture(scope="module")
def noise():
    return initial_noise((3,), list(range(20000)), dtype=torch.float64)


def test_closed_form_velocity_is_the_conditional_expectation():
    """Monte-Carlo check of v = E[ε − x0 | x_t] by regressing ε − x0 on x_t (linear in the Gaussian case)."""
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 0.6
    x0 = MU + STD * torch.randn(n, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    target = eps - x0
    xc, yc = xt - xt.mean(0), target - target.mean(0)
    slope = (xc * yc).mean(0) / (xc**2).mean(0)
    intercept = target.mean(0) - slope * xt.mean(0)
    probe = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian_velocity(probe, torch.tensor([t], dtype=torch.float64)), intercept + slope * probe, atol=0.02, rtol=0)


@pytest.mark.parametrize("sampler", [ode_euler, ode_dpm])
def test_ode_maps_noise_to_the_target_gaussian(sampler, noise):
    sample = sampler(gaussian_velocity, noise, flow_sigmas(100, dtype=torch.float64)).sample
    torch.testing.assert_close(sample.mean(0), MU + STD * noise.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(sample.mean(0), MU, atol=0.05, rtol=0)
    torch.testing.assert_close(sample.std(0) / STD, torch.ones(3, dtype=torch.float64), atol=0.05, rtol=0)
    # pointwise (RMS) against the exact deterministic map z -> mu + s z
    tolerance = 0.04 if sampler is ode_euler else 0.004
    assert (sample - (MU + STD * noise)).pow(2).mean().sqrt() < tolerance


def test_dpm_beats_euler_at_ten_steps_and_converges_faster(noise):
    exact = MU + STD * noise
    errors = {}
    for name, sampler in (("euler", ode_euler), ("dpm", ode_dpm)):
        for steps in (10, 20):
            sample = sampler(gaussian_velocity, noise, flow_sigmas(steps, dtype=torch.float64)).sample
            errors[name, steps] = (sample - exact).pow(2).mean().sqrt().item()
    assert errors["dpm", 10] < 0.5 * errors["euler", 10]
    # first order halves the error when the steps double; second order does better
    assert 1.6 < errors["euler", 10] / errors["euler", 20] < 2.4
    assert errors["dpm", 10] / errors["dpm", 20] > 2.5


def test_sde_marginals_match_with_enough_steps(noise):
    sigmas = flow_sigmas(100, shift=1.0, dtype=torch.float64)
    out = sde(gaussian_velocity, noise, sigmas, generator=torch.Generator().manual_seed(1), return_trajectory=True)
    n = noise.shape[0]
    for index in (25, 50, 75, 100):  # t = 0.75, 0.5, 0.25, 0
        mean, std = marginal(sigmas[index])
        states = out.trajectory[index]
        assert ((states.mean(0) - mean).abs() < 4 * std / n**0.5).all(), (index, states.mean(0), mean)
        assert ((states.std(0) / std - 1).abs() < 0.04).all(), (index, states.std(0), std)
    # stochastic: the SDE sample is not the ODE's deterministic image of the same noise
    assert (out.sample - (MU + STD * noise)).abs().mean() > 0.1
