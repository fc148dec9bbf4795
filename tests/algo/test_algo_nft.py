"""DiffusionNFT's loss against an independent recomputation in x0 space (the official script's form),
its gradient against a closed form and finite differences, the optimality mapping, bad inputs."""

import pytest
import torch

from dgpo_lightning.algo import NFTStats, nft_loss, optimality_probability, velocity_target


def official_form(x0, noise, t, v_theta, v_old, advantages, beta, adv_clip_max=5.0):
    """Plain-torch recomputation as in NVlabs/DiffusionNFT scripts/train_nft_sd3.py: x0 predictions
    ``x_t − t·v`` of both implicit policies, each error over its own detached mean |error|."""
    r = torch.clamp((torch.clamp(advantages, -adv_clip_max, adv_clip_max) / adv_clip_max) / 2.0 + 0.5, 0, 1)
    te = t.view(-1, 1, 1, 1)
    xt = (1 - te) * x0 + te * noise
    positive = beta * v_theta + (1 - beta) * v_old.detach()
    negative = (1.0 + beta) * v_old.detach() - beta * v_theta
    x0_pos = xt - te * positive
    x0_neg = xt - te * negative
    w_pos = (x0_pos.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
    w_neg = (x0_neg.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
    l_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=(1, 2, 3))
    l_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=(1, 2, 3))
    return ((r * l_pos / beta + (1 - r) * l_neg / beta) * adv_clip_max).mean()


def draw(n=5, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    v_theta = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    v_old = v_theta + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    advantages = 4 * torch.randn(n, generator=g, dtype=torch.float64)
    return x0, noise, t, v_theta, v_old, advantages


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
def test_value_and_gradient_match_the_official_form(beta):
    x0, noise, t, v_theta, v_old, advantages = draw()
    target = velocity_target(x0, noise)
    a = v_theta.clone().requires_grad_()
    loss, stats = nft_loss(a, v_old, target, t, optimality_probability(advantages, 5.0), beta=beta, scale=5.0)
    loss.backward()
    b = v_theta.clone().requires_grad_()
    expected = official_form(x0, noise, t, b, v_old, advantages, beta)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    assert isinstance(stats, NFTStats) and not any(s.requires_grad for s in stats)
    torch.testing.assert_close(stats.old_deviation, ((v_theta - v_old) ** 2).mean())


def test_gradient_matches_the_closed_form():
    """``∂L/∂v_θ = (c/N)·(2t/D)·(−r·e⁺/w⁺ + (1 − r)·e⁻/w⁻)`` with ``e± = t(v* − v±)`` and detached ``w±``."""
    x0, noise, t, v_theta, v_old, advantages = draw(seed=3)
    target = velocity_target(x0, noise)
    beta, c = 0.4, 5.0
    r = optimality_probability(advantages, c)
    v = v_theta.clone().requires_grad_()
    nft_loss(v, v_old, target, t, r, beta=beta, scale=c)[0].backward()
    te = t.view(-1, 1, 1, 1)
    e_pos = te * (target - (beta * v_theta + (1 - beta) * v_old))
    e_neg = te * (target - ((1 + beta) * v_old - beta * v_theta))
    w_pos = e_pos.abs().mean(dim=(1, 2, 3), keepdim=True)
    w_neg = e_neg.abs().mean(dim=(1, 2, 3), keepdim=True)
    n, d = v_theta.shape[0], v_theta[0].numel()
    rr = r.view(-1, 1, 1, 1)
    expected = c / n * (2 * te / d) * (-rr * e_pos / w_pos + (1 - rr) * e_neg / w_neg)
    torch.testing.assert_close(v.grad, expected, rtol=1e-9, atol=1e-12)


def test_plain_weighting_is_the_velocity_flow_matching_loss_and_passes_gradcheck():
    x0, noise, t, v_theta, v_old, advantages = draw(n=3, shape=(1, 2, 2), seed=5)
    target = velocity_target(x0, noise)
    r = optimality_probability(advantages)
    beta = 0.5
    loss = nft_loss(v_theta, v_old, target, t, r, beta=beta, adaptive_weighting=False)[0]
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    err = lambda v: ((v - target) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(loss, (r * err(positive) + (1 - r) * err(negative)).mean() / beta)
    fn = lambda v: nft_loss(v, v_old, target, t, r, beta=beta, adaptive_weighting=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v_theta.clone().requires_grad_(),))


@pytest.mark.parametrize("adaptive", [True, False])
def test_neutral_samples_do_not_move_the_old_policy(adaptive):
    """At ``v_θ = v_old`` with ``r = ½`` the positive and negative pulls cancel: zero gradient. The
    old policy's velocities never receive a gradient."""
    x0, noise, t, v_theta, _, _ = draw(seed=7)
    target = velocity_target(x0, noise)
    v = v_theta.clone().requires_grad_()
    old = v_theta.clone().requires_grad_()
    loss, _ = nft_loss(v, old, target, t, torch.full((5,), 0.5, dtype=torch.float64), beta=0.3, adaptive_weighting=adaptive)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.zeros_like(v), atol=1e-12, rtol=0)
    assert old.grad is None


def test_positive_samples_are_pulled_towards_the_target():
    x0, noise, t, v_theta, v_old, _ = draw(seed=9)
    target = velocity_target(x0, noise)
    v = v_theta.clone().requires_grad_()
    nft_loss(v, v_old, target, t, torch.ones(5, dtype=torch.float64), beta=1.0)[0].backward()
    step = v_theta - 1e-3 * v.grad
    before = ((v_theta - target) ** 2).sum()
    after = ((step - target) ** 2).sum()
    assert after < before


def test_optimality_probability_by_hand():
    advantages = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(optimality_probability(advantages, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(torch.tensor([1.0, -1.0]), 2.0), torch.tensor([0.75, 0.25]))
    assert optimality_probability(torch.tensor([1.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_bad_inputs():
    v = torch.randn(2, 3)
    t, r = torch.rand(2), torch.rand(2)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v, v, t, r, beta=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        nft_loss(v, torch.randn(2, 4), v, t, r, beta=1.0)
    with pytest.raises(ValueError, match="optimality must hold"):
        nft_loss(v, v, v, t, torch.tensor([0.5, 1.5]), beta=1.0)
    with pytest.raises(ValueError, match="t must lie"):
        nft_loss(v, v, v, torch.tensor([0.5, -0.1]), r, beta=1.0)
    with pytest.raises(ValueError, match="entries"):
        nft_loss(v, v, v, torch.rand(3), r, beta=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        nft_loss(v, v, v * float("nan"), t, r, beta=1.0)
    with pytest.raises(ValueError, match="empty"):
        nft_loss(torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3), torch.rand(0), torch.rand(0), beta=1.0)
    with pytest.raises(ValueError, match="advantage_max"):
        optimality_probability(torch.randn(3), 0.0)
