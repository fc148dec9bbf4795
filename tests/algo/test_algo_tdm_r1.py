"""TDM-R1's maths against independent recomputations: the τ draw (bounds, the shifted-uniform law),
the forward transition's marginal, the targets (as path derivatives / the flow velocity), the fake-score
loss, the surrogate's clips and group loss (vs DGPO's softplus loss by autograd), the generator loss
(value and closed-form gradient on a hand-built case)."""

import math

import pytest
import torch

from dgpo_lightning.algo import (
    dgpo_loss,
    draw_tau,
    fake_score_loss,
    fake_score_target,
    flow_interpolate,
    forward_transition,
    generator_loss,
    reward_step_probabilities,
    shift_time,
    surrogate_clip_masks,
    surrogate_reward_loss,
    surrogate_target,
    unshift_time,
    velocity_target,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- τ draws


def test_shift_and_unshift_are_inverse_and_match_the_official_1000_scale():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(unshift_time(shift_time(u, 3.0), 3.0), u)
    # official convert(x, s) = s·x/1000 / (1 + (s−1)·x/1000) · 1000, inv_convert(y) = 1000 y / (1000 s − (s−1) y)
    x = 1000 * u
    torch.testing.assert_close(1000 * shift_time(u, 3.0), 3 * x / 1000 / (1 + 2 * x / 1000) * 1000)
    torch.testing.assert_close(1000 * unshift_time(u, 3.0), 1000 * x / (3000 - 2 * x))
    assert float(shift_time(0.75, 3.0)) == pytest.approx(0.9)  # the 4-step schedule's t_1


@pytest.mark.parametrize("lower", [0.0, 0.25, 0.55, 0.9])
def test_tau_lies_above_its_bound_and_is_uniform_in_unshifted_time(lower):
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tau = draw_tau(lower, u, shift=3.0, margin=0.02)
    base = lower / (3 - 2 * lower) + 0.02  # unshifted bound + margin, by hand
    assert float(tau.min()) >= 3 * base / (1 + 2 * base) - 1e-12 and float(tau.max()) <= 1.0
    assert bool((tau > lower).all())
    # the law: P(τ <= q) = (unshift(q) − base) / (1 − base), checked at a few quantiles
    for q in (0.3, 0.6, 0.8, 0.95):
        if q <= 3 * base / (1 + 2 * base):
            continue
        expected = (q / (3 - 2 * q) - base) / (1 - base)
        assert float((tau <= q).double().mean()) == pytest.approx(expected, abs=4e-3)
    # u = 0 and u = 1 are the interval's ends
    assert float(draw_tau(lower, 1.0)) == pytest.approx(1.0)
    assert float(draw_tau(lower, 0.0)) == pytest.approx(3 * base / (1 + 2 * base))


def test_tau_without_room_above_the_bound_is_refused():
    with pytest.raises(ValueError, match="no room"):
        draw_tau(0.999, 0.5)  # unshifted 0.997 + 0.02 > 1
    with pytest.raises(ValueError, match="lower"):
        draw_tau(1.0, 0.5)
    with pytest.raises(ValueError, match="u must"):
        draw_tau(0.5, 1.5)


def test_reward_step_probabilities_grow_linearly():
    p = reward_step_probabilities(4)
    torch.testing.assert_close(p, torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 10)


# --------------------------------------------------------------------------- forward transition


@pytest.mark.parametrize(("a", "tau"), [(0.0, 0.3), (0.5, 0.75), (0.9, 0.97)])
def test_forward_transition_has_exactly_the_flow_marginal(a, tau):
    """x = (1−a)x0 + a ε₁ ⇒ x_τ = (1−τ) x0 + (α a ε₁ + β ε₂) with noise variance τ² (exact per draw
    in the decomposition; the empirical std over many draws checks the Gaussian law)."""
    x0, e1, e2 = randn(4000, 3, seed=0), randn(4000, 3, seed=1), randn(4000, 3, seed=2)
    x = flow_interpolate(x0, e1, a)
    out = forward_transition(x, a, tau, e2)
    alpha = (1 - tau) / (1 - a)
    beta = math.sqrt(tau**2 - (a * alpha) ** 2)
    assert float(out.alpha) == pytest.approx(alpha) and float(out.beta) == pytest.approx(beta)
    torch.testing.assert_close(out.x_tau, (1 - tau) * x0 + alpha * a * e1 + beta * e2)
    assert (alpha * a) ** 2 + beta**2 == pytest.approx(tau**2)  # the noise has the flow's scale τ
    residual = (out.x_tau - (1 - tau) * x0) / tau  # should be a standard normal
    assert float(residual.std()) == pytest.approx(1.0, abs=0.03) and abs(float(residual.mean())) < 0.03


def test_forward_transition_per_sample_levels_and_bad_levels():
    x, e = randn(3, 2, 2, seed=3), randn(3, 2, 2, seed=4)
    a, tau = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.6, 0.9], dtype=torch.float64)
    out = forward_transition(x, a, tau, e)
    for i in range(3):
        torch.testing.assert_close(out.x_tau[i], forward_transition(x[i : i + 1], float(a[i]), float(tau[i]), e[i : i + 1]).x_tau[0])
    with pytest.raises(ValueError, match="tau"):
        forward_transition(x, 0.5, 0.5, e)
    with pytest.raises(ValueError, match="a must"):
        forward_transition(x, 1.0, 1.0, e)


# --------------------------------------------------------------------------- targets


def test_fake_target_is_the_flow_velocity_of_its_x0():
    x0, e = randn(5, 2, 3, seed=5), randn(5, 2, 3, seed=6)
    tau = 0.37
    torch.testing.assert_close(fake_score_target(flow_interpolate(x0, e, tau), x0, tau), velocity_target(x0, e))


@pytest.mark.parametrize(("a", "tau"), [(0.0, 0.4), (0.5, 0.7), (0.75, 0.95)])
def test_surrogate_target_is_the_derivative_of_the_transition_path(a, tau):
    """d/dτ (α(τ) x + β(τ) ε) by autograd, at fixed x, ε."""
    x, e = randn(4, 3, 2, seed=7), randn(4, 3, 2, seed=8)
    level = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    path = forward_transition(x, a, level, e).x_tau
    expected = torch.stack([torch.autograd.grad(path.flatten()[i], level, retain_graph=True)[0] for i in range(path.numel())]).view_as(x)
    torch.testing.assert_close(surrogate_target(x, e, a, tau), expected)
    # the official closed form, written out
    alpha = (1 - tau) / (1 - a)
    beta = math.sqrt(tau**2 - (a * alpha) ** 2)
    torch.testing.assert_close(surrogate_target(x, e, a, tau), -x / (1 - a) + e / beta * (tau + a**2 * alpha / (1 - a)))


def test_surrogate_target_at_the_clean_end_is_flow_matching():
    x0, e = randn(3, 4, seed=9), randn(3, 4, seed=10)
    torch.testing.assert_close(surrogate_target(x0, e, 0.0, 0.6), velocity_target(x0, e))


# --------------------------------------------------------------------------- fake score


def test_fake_score_loss_value_and_gradient():
    v_fake, target, real = randn(4, 3, 3, seed=11), randn(4, 3, 3, seed=12), randn(4, 3, 3, seed=13)
    v = v_fake.clone().requires_grad_()
    loss, stats = fake_score_loss(v, target, real, reg=0.02)
    loss.backward()
    expected = ((target - v_fake) ** 2).mean() + 0.02 * ((real - v_fake) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    # d/dv of mean (t − v)² + r mean (q − v)² = (2/D)(v − t) + (2r/D)(v − q), D = all elements
    d = v_fake.numel()
    torch.testing.assert_close(v.grad, 2 / d * (v_fake - target) + 2 * 0.02 / d * (v_fake - real))
    torch.testing.assert_close(stats.regression, ((target - v_fake) ** 2).mean())


# --------------------------------------------------------------------------- surrogate


def test_surrogate_clip_masks_on_a_hand_built_case():
    # samples: A>0 moved far (ratio > 1+c) | A>0 small move | A<0 moved far down | A<0 small | A=0 (treated as A<=0)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    dsm_old = torch.ones(5)
    dsm = torch.tensor([0.9, 0.9995, 1.1, 1.0005, 1.0])  # ratio = exp(old − dsm)
    dsm_ref = torch.tensor([1.0, 1.1, 1.0, 0.9, 1.0])  # ref ratio = exp(ref − dsm)
    near = surrogate_clip_masks(dsm, dsm_old, dsm_ref, adv, 0.01, clip_range=1e-3, reference_threshold=0.05)
    assert near.ratio_clipped.tolist() == [True, False, True, False, False]
    assert not near.reference_clipped.any()  # the gap 0.01 is below the threshold
    far = surrogate_clip_masks(dsm, dsm_old, dsm_ref, adv, 0.2, clip_range=1e-3, reference_threshold=0.05)
    # ref ratios: exp(0.1) > 1 (A>0: clip) | exp(0.1005) > 1 (A>0: clip) | exp(−0.1) < 1 (A<0: clip) |
    # exp(−0.1005) < 1 (A<0: clip) | exp(0) = 1, A = 0 needs < 1: kept
    assert far.reference_clipped.tolist() == [True, True, True, True, False]
    assert far.keep.tolist() == [False, False, False, False, True]


def test_surrogate_loss_gradient_is_dgpo_softplus_over_beta():
    """The official detached-sigmoid form has DGPO's group-loss gradient divided by β (equal groups)."""
    n, groups = 12, torch.arange(3).repeat_interleave(4)
    dsm, ref = randn(n, seed=14).abs(), randn(n, seed=15).abs()
    adv = randn(n, seed=16)
    for beta in (1.0, 10.0):
        a = dsm.clone().requires_grad_()
        loss, sigma = surrogate_reward_loss(a, ref, adv, groups, beta=beta)
        loss.backward()
        b = dsm.clone().requires_grad_()
        softplus, _ = dgpo_loss(b, ref, adv, groups, beta=beta)
        softplus.backward()
        torch.testing.assert_close(a.grad, b.grad / beta)
        # the value, by hand
        z = torch.zeros(3, dtype=torch.float64).index_add_(0, groups, beta * adv * (dsm - ref) / 4)
        torch.testing.assert_close(sigma, torch.sigmoid(z)[groups])
        torch.testing.assert_close(loss, (torch.sigmoid(z)[groups] * adv * dsm).mean())


def test_surrogate_loss_in_pieces_sums_to_the_whole():
    n, groups = 8, torch.arange(2).repeat_interleave(4)
    dsm, ref, adv = randn(n, seed=17).abs(), randn(n, seed=18).abs(), randn(n, seed=19)
    whole, sigma = surrogate_reward_loss(dsm, ref, adv, groups, beta=2.0)
    parts = [surrogate_reward_loss(dsm[i], ref[i], adv[i], groups[i], beta=2.0, group_weight=sigma[i], num_samples=n)[0]
             for i in (torch.arange(0, 3), torch.arange(3, 8))]
    torch.testing.assert_close(sum(parts), whole)


# --------------------------------------------------------------------------- generator


def generator_inputs(seed=20, n=3, shape=(2, 2, 2)):
    names = ("x0_hat", "real_x0", "real_cond_x0", "real_uncond_x0", "fake_x0", "surrogate_x0", "surrogate_reference_x0")
    return {name: randn(n, *shape, seed=seed + i) for i, name in enumerate(names)}


@pytest.mark.parametrize("with_reward", [True, False])
def test_generator_loss_value_and_gradient_against_the_closed_form(with_reward):
    d = generator_inputs()
    x0 = d.pop("x0_hat")
    if not with_reward:
        d.pop("surrogate_x0"), d.pop("surrogate_reference_x0")
    v = x0.clone().requires_grad_()
    per_sample, stats = generator_loss(v, **d, tdm_weight=0.3, cfg_scale=3.5)
    per_sample.mean().backward()
    dims = (1, 2, 3)
    w = (x0 - d["real_x0"]).abs().mean(dims)
    d_cfg = 3.5 * (d["real_cond_x0"] - d["real_uncond_x0"])
    d_kl = d["real_cond_x0"] - d["fake_x0"]
    e_cfg, e_kl = (d_cfg**2).mean(dims) / w, (d_kl**2).mean(dims) / w
    wv = w.view(-1, 1, 1, 1)
    numel, n = x0[0].numel(), x0.shape[0]
    if with_reward:
        wd = (x0 - d["surrogate_x0"]).abs().mean(dims)
        d_r = d["surrogate_x0"] - d["surrogate_reference_x0"]
        expected = 0.3 * e_cfg + 0.7 * (d_r**2).mean(dims) / wd + e_kl
        grad = -2 / (numel * n) * (0.3 * d_cfg / wv + 0.7 * d_r / wd.view(-1, 1, 1, 1) + d_kl / wv)
    else:
        expected = 0.3 * (e_cfg + e_kl)
        grad = -2 / (numel * n) * 0.3 * (d_cfg + d_kl) / wv
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(v.grad, grad)
    torch.testing.assert_close(stats.weight, w)


def test_generator_loss_matches_a_straightforward_formula_by_autograd():
    """The official form, written as sg(revised x0) − x0 with the official batch mean over elements."""
    d = generator_inputs(seed=40)
    x0 = d.pop("x0_hat")
    a = x0.clone().requires_grad_()
    ours, _ = generator_loss(a, **d, tdm_weight=0.3, cfg_scale=3.5)
    ours.mean().backward()
    b = x0.clone().requires_grad_()
    w = (b.detach() - d["real_x0"]).abs().mean(dim=[1, 2, 3], keepdim=True)
    wd = (b.detach() - d["surrogate_x0"]).abs().mean(dim=[1, 2, 3], keepdim=True)
    cfg_rev = (b + 3.5 * (d["real_cond_x0"] - d["real_uncond_x0"])).detach()
    kl_rev = (b + d["real_cond_x0"] - d["fake_x0"]).detach()
    sur_rev = (b + d["surrogate_x0"] - d["surrogate_reference_x0"]).detach()
    official = 0.3 * ((cfg_rev - b) ** 2 / w).mean() + 0.7 * ((sur_rev - b) ** 2 / wd).mean() + ((kl_rev - b) ** 2 / w).mean()
    official.backward()
    torch.testing.assert_close(ours.mean(), official)
    torch.testing.assert_close(a.grad, b.grad)


def test_generator_loss_refuses_half_a_reward():
    d = generator_inputs()
    x0 = d.pop("x0_hat")
    d.pop("surrogate_reference_x0")
    with pytest.raises(ValueError, match="together"):
        generator_loss(x0, **d)
