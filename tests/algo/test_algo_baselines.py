import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgpo_lightning.algo import all_preference_pairs, best_worst_pairs, diffusion_dpo_loss, flow_grpo_loss


def test_flow_grpo_clipping_by_hand():
    c = 0.2
    log_ratio = torch.tensor([0.3, -0.3, 0.3, -0.3, 0.0], dtype=torch.float64)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    old = torch.randn(5, dtype=torch.float64)
    log_prob = (old + log_ratio).requires_grad_()
    loss, stats = flow_grpo_loss(log_prob, old, advantages, clip_range=c)
    up, down = math.exp(0.3), math.exp(-0.3)
    # A>0, ρ>1+c: −A·(1+c) (clipped, no gradient)  | A>0, ρ<1−c: −A·ρ (not clipped)
    # A<0, ρ>1+c: −A·ρ (not clipped)               | A<0, ρ<1−c: −A·(1−c) (clipped)
    # A=2, ρ=1: −2
    expected = (-(1 + c) - down + up + (1 - c) - 2.0) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    expected_grad = torch.tensor([0.0, -down, up, 0.0, -2.0], dtype=torch.float64) / 5  # dρ/dlogp = ρ
    torch.testing.assert_close(log_prob.grad, expected_grad)
    assert stats.clip_frac.item() == pytest.approx(0.8)
    assert stats.approx_kl.item() == pytest.approx(0.5 * 4 * 0.09 / 5)
    assert stats.ratio_mean.item() == pytest.approx((2 * up + 2 * down + 1) / 5)


def test_flow_grpo_on_policy_is_plain_policy_gradient():
    log_prob = torch.randn(6, requires_grad=True)
    advantages = torch.randn(6)
    loss, stats = flow_grpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(loss, -advantages.mean())
    torch.testing.assert_close(log_prob.grad, -advantages / 6)
    assert stats.clip_frac.item() == 0.0 and stats.approx_kl.item() == 0.0


def test_flow_grpo_bad_inputs():
    with pytest.raises(ValueError, match="shape mismatch"):
        flow_grpo_loss(torch.rand(3), torch.rand(3), torch.rand(2), clip_range=0.1)
    with pytest.raises(ValueError, match="clip_range"):
        flow_grpo_loss(torch.rand(3), torch.rand(3), torch.rand(3), clip_range=-0.1)
    with pytest.raises(ValueError, match="non-finite"):
        flow_grpo_loss(torch.tensor([0.0, float("nan")]), torch.rand(2), torch.rand(2), clip_range=0.1)


def test_diffusion_dpo_by_hand():
    on_w = torch.tensor([0.4, 0.5], dtype=torch.float64, requires_grad=True)
    ref_w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    on_l = torch.tensor([0.6, 0.3], dtype=torch.float64, requires_grad=True)
    ref_l = torch.tensor([0.5, 0.5], dtype=torch.float64)
    loss, stats = diffusion_dpo_loss(on_w, ref_w, on_l, ref_l, beta=5.0)
    # pair 0: −β((−0.1) − (0.1)) = 1.0 ; pair 1: −β(0 − (−0.2)) = −1.0
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    weights = torch.tensor([1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-1.0))], dtype=torch.float64)
    torch.testing.assert_close(on_w.grad, 5.0 * weights / 2)  # descent lowers the winner's error
    torch.testing.assert_close(on_l.grad, -5.0 * weights / 2)  # and raises the loser's
    assert stats.reward_margin.item() == pytest.approx(0.0)
    assert stats.reward_accuracy.item() == pytest.approx(0.5)
    assert stats.sigmoid_weight.item() == pytest.approx(0.5)


def test_diffusion_dpo_is_one_pair_dgpo():
    from dgpo_lightning.algo import dgpo_loss

    on = torch.tensor([0.3, 0.8], dtype=torch.float64)
    ref = torch.tensor([0.5, 0.6], dtype=torch.float64)
    dpo, _ = diffusion_dpo_loss(on[:1], ref[:1], on[1:], ref[1:], beta=4.0)
    # a two-sample group with advantages ±1 and β' = 2β is the same Bradley–Terry loss
    dgpo, _ = dgpo_loss(on, ref, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0, 0]), beta=8.0)
    torch.testing.assert_close(dpo, dgpo)


def test_diffusion_dpo_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(torch.rand(2), torch.rand(2), torch.rand(2), torch.rand(2), beta=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        diffusion_dpo_loss(torch.rand(2), torch.rand(2), torch.rand(3), torch.rand(2), beta=1.0)


def test_best_worst_pairs_by_hand():
    rewards = torch.tensor([0.2, 0.9, 0.9, 0.1, 0.5, 0.5, 0.7, 0.3, 0.1])
    group_index = torch.tensor([4, 4, 4, 4, 1, 1, 8, 8, 6])
    winners, losers = best_worst_pairs(rewards, group_index)
    # group 1 is constant, group 6 is a single sample: no pair; ties go to the lowest index
    assert winners.tolist() == [1, 6]
    assert losers.tolist() == [3, 7]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=20))
def test_best_worst_pairs_matches_reference(samples):
    labels = [s[0] for s in samples]
    rewards = [float(s[1]) for s in samples]  # small integers: many ties
    winners, losers = best_worst_pairs(torch.tensor(rewards), torch.tensor(labels))
    expected_w, expected_l = [], []
    for g in sorted(set(labels)):
        members = [i for i, h in enumerate(labels) if h == g]
        values = [rewards[i] for i in members]
        if max(values) > min(values):
            expected_w.append(members[values.index(max(values))])
            expected_l.append(members[values.index(min(values))])
    assert winners.tolist() == expected_w
    assert losers.tolist() == expected_l


def test_all_preference_pairs_by_hand():
    rewards = torch.tensor([0.2, 0.9, 0.9, 0.1, 0.5, 0.5, 0.7, 0.3, 0.1])
    group_index = torch.tensor([4, 4, 4, 4, 1, 1, 8, 8, 6])
    winners, losers = all_preference_pairs(rewards, group_index)
    # group 1 (constant) and 6 (one sample) give nothing; group 4: the tied 0.9s beat 0.2 and 0.1, 0.2 beats 0.1
    pairs = list(zip(winners.tolist(), losers.tolist()))
    assert pairs == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3), (6, 7)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=20))
def test_all_preference_pairs_matches_reference(samples):
    labels = [s[0] for s in samples]
    rewards = [float(s[1]) for s in samples]
    winners, losers = all_preference_pairs(torch.tensor(rewards), torch.tensor(labels))
    expected = [
        (w, l)
        for g in sorted(set(labels))
        for w in range(len(labels)) if labels[w] == g
        for l in range(len(labels)) if labels[l] == g and rewards[w] > rewards[l]
    ]
    assert list(zip(winners.tolist(), losers.tolist())) == expected
    # the best/worst pair of each informative group is one of them
    assert set(zip(*(t.tolist() for t in best_worst_pairs(torch.tensor(rewards), torch.tensor(labels))))) <= set(expected)


def test_best_worst_pairs_rejects_nan():
    with pytest.raises(ValueError, match=r"indices \[0\]"):
        best_worst_pairs(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]))
