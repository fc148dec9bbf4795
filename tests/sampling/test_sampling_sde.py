"""Flow-GRPO flow-SDE: reduction to Euler, log-probs against torch.distributions, recomputation,
per-sample noise seeds."""

import math

import pytest
import torch
from torch.distributions import Normal

from dgpo_lightning.sampling import flow_sigmas, initial_noise, ode_euler, sde, sde_step_log_prob

SHAPE = (3, 2, 4, 4)


def velocity(x, t):
    """A fixed nonlinear velocity field."""
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return torch.sin(2 * x) * (1 + t) - 0.5 * x * t + 0.2


def flow_grpo_transition(v, x, sigma, sigma_next, sigma_max, a):
    """Flow-GRPO's SDE step written in the authors' (multiplicative) form, ``sigma_max = sigmas[1]``
    (github.com/yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py)."""
    dt = sigma_next - sigma
    std_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


def test_zero_noise_level_is_exactly_ode_euler():
    x = torch.randn(SHAPE)
    sigmas = flow_sigmas(10)
    ode = ode_euler(velocity, x, sigmas, return_trajectory=True)
    out = sde(velocity, x, sigmas, noise_level=0.0, return_trajectory=True)
    assert torch.equal(out.trajectory, ode.trajectory) and torch.equal(out.sample, ode.sample)
    assert torch.equal(out.log_probs, torch.zeros(10, SHAPE[0]))


@pytest.mark.parametrize("noise_level", [0.7, 1.2])
def test_transitions_and_log_probs_match_flow_grpo_and_torch_normal(noise_level):
    x = torch.randn(SHAPE, dtype=torch.float64)
    sigmas = flow_sigmas(8, dtype=torch.float64)
    out = sde(velocity, x, sigmas, noise_level=noise_level, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert out.log_probs.shape == (8, SHAPE[0]) and out.trajectory.shape == (9, *SHAPE)
    s = sigmas.tolist()
    residuals = []
    for i in range(7):
        x_t, x_next = out.trajectory[i], out.trajectory[i + 1]
        v = velocity(x_t, torch.full((SHAPE[0],), s[i], dtype=torch.float64))
        mean, std = flow_grpo_transition(v, x_t, s[i], s[i + 1], s[1], noise_level)
        expected = Normal(mean, std).log_prob(x_next).flatten(1).sum(1)
        torch.testing.assert_close(out.log_probs[i], expected, rtol=1e-10, atol=1e-8)
        residuals.append(((x_next - mean) / std).flatten())
    # the noise actually added has the std the log-prob assumes
    z = torch.cat(residuals)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.08
    # the last step (to sigma = 0) is the deterministic Euler step to the data prediction
    v_last = velocity(out.trajectory[7], torch.full((SHAPE[0],), s[7], dtype=torch.float64))
    torch.testing.assert_close(out.sample, out.trajectory[7] - s[7] * v_last, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.log_probs[7], torch.zeros(SHAPE[0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_log_prob_recomputes_the_recorded_log_probs(dtype):
    x = torch.randn(SHAPE, dtype=dtype)
    sigmas = flow_sigmas(6, dtype=dtype)
    out = sde(velocity, x, sigmas, noise_seeds=[4, 5, 6], return_trajectory=True)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    for i in range(6):
        x_t = out.trajectory[i]
        v = velocity(x_t, sigmas[i].expand(SHAPE[0]))
        for sigma, sigma_next in ((sigmas[i].item(), sigmas[i + 1].item()), (sigmas[i], sigmas[i + 1])):
            got = sde_step_log_prob(v, x_t, out.trajectory[i + 1], sigma, sigma_next)
            torch.testing.assert_close(got, out.log_probs[i], rtol=rtol, atol=rtol)
    # all steps at once with per-row sigmas (how the Flow-GRPO training step batches them)
    steps = torch.arange(6).repeat_interleave(SHAPE[0])
    rows = torch.arange(SHAPE[0]).repeat(6)
    x_t, x_next = out.trajectory[steps, rows], out.trajectory[steps + 1, rows]
    v = velocity(x_t, sigmas[steps])
    got = sde_step_log_prob(v, x_t, x_next, sigmas[steps], sigmas[steps + 1])
    torch.testing.assert_close(got, out.log_probs.reshape(-1), rtol=rtol, atol=rtol)
    assert (got.view(6, -1)[-1] == 0).all()


def test_step_log_prob_gradient_and_precision():
    x = torch.randn(SHAPE, dtype=torch.float64)
    sigmas = flow_sigmas(4, dtype=torch.float64)
    out = sde(velocity, x, sigmas, generator=torch.Generator().manual_seed(2), return_trajectory=True)
    # steps 0..3 with per-row sigmas; the last (deterministic) rows must not poison the gradient
    steps = torch.arange(4).repeat_interleave(SHAPE[0])
    rows = torch.arange(SHAPE[0]).repeat(4)
    x_t, x_next = out.trajectory[steps, rows], out.trajectory[steps + 1, rows]
    v = velocity(x_t, sigmas[steps]).detach().requires_grad_(True)
    # a different velocity than the one sampled with, so the gradient is not ~0
    v_new = v + 0.05
    sde_step_log_prob(v_new, x_t, x_next, sigmas[steps], sigmas[steps + 1], noise_level=0.7).sum().backward()
    assert torch.isfinite(v.grad).all()
    # analytic: d/dv log N(x'; mean, std²) = (x' − mean)/std² · dmean/dv, dmean/dv = (1 + k(1 − σ))·dt
    for j in range(steps.numel()):
        s, s_next = sigmas[steps[j]].item(), sigmas[steps[j] + 1].item()
        if s_next == 0:
            assert (v.grad[j] == 0).all()
            continue
        mean, std = flow_grpo_transition(v_new[j].detach(), x_t[j], s, s_next, sigmas[1].item(), 0.7)
        std_t = std / math.sqrt(s - s_next)
        dmean_dv = (1 + std_t**2 * (1 - s) / (2 * s)) * (s_next - s)
        torch.testing.assert_close(v.grad[j], (x_next[j] - mean) / std**2 * dmean_dv, rtol=1e-9, atol=1e-9)
    # bf16 velocities are upcast (Flow-GRPO computes the step in float32)
    lp = sde_step_log_prob(v.detach().bfloat16(), x_t.float(), x_next.float(), sigmas[steps].float(), sigmas[steps + 1].float())
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_noise_seeds_make_results_independent_of_batch_split():
    shape = (2, 5, 5)
    seeds = [10, 11, 12, 13, 14, 15]
    noise_seeds = [s + 1000 for s in seeds]
    sigmas = flow_sigmas(5)
    whole = sde(velocity, initial_noise(shape, seeds), sigmas, noise_seeds=noise_seeds, return_trajectory=True)
    parts = [
        sde(velocity, initial_noise(shape, seeds[k : k + 3]), sigmas, noise_seeds=noise_seeds[k : k + 3], return_trajectory=True)
        for k in (0, 3)
    ]
    torch.testing.assert_close(whole.sample, torch.cat([p.sample for p in parts]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole.trajectory, torch.cat([p.trajectory for p in parts], dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole.log_probs, torch.cat([p.log_probs for p in parts], dim=1), rtol=1e-5, atol=1e-4)
    # different seeds give different noise; a single generator is reproducible; both at once is an error
    other = sde(velocity, initial_noise(shape, seeds), sigmas, noise_seeds=[s + 1 for s in noise_seeds])
    assert not torch.allclose(other.sample, whole.sample)
    a = sde(velocity, initial_noise(shape, seeds), sigmas, generator=torch.Generator().manual_seed(3))
    b = sde(velocity, initial_noise(shape, seeds), sigmas, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sample, b.sample) and torch.equal(a.log_probs, b.log_probs)
    with pytest.raises(ValueError, match="not both"):
        sde(velocity, initial_noise(shape, seeds), sigmas, noise_seeds=noise_seeds, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise_seeds"):
        sde(velocity, initial_noise(shape, seeds), sigmas, noise_seeds=noise_seeds[:4])
    with pytest.raises(ValueError, match="noise_level"):
        sde(velocity, initial_noise(shape, seeds), sigmas, noise_level=-0.1)
