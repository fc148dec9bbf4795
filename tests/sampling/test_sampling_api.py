"""The sampler registry, the shared signature and input checks."""

import pytest
import torch

from dgpo_lightning.sampling import SAMPLERS, SampleOutput, flow_sigmas, get_sampler, ode_dpm, ode_euler, sde


def test_registry_names_and_unknown_name():
    assert set(SAMPLERS) == {"ode_euler", "ode_dpm", "sde"}
    assert get_sampler("ode_euler") is ode_euler and get_sampler("ode_dpm") is ode_dpm and get_sampler("sde") is sde
    with pytest.raises(ValueError, match="ode_dpm, ode_euler, sde") as info:
        get_sampler("ddim")
    assert "'ddim'" in str(info.value)


@pytest.mark.parametrize("name", ["ode_euler", "ode_dpm", "sde"])
def test_shared_signature_trajectory_on_request_and_velocity_calls(name):
    calls = []

    def velocity(x, t):
        calls.append(t.clone())
        return -x

    x = torch.randn(5, 2, 3, 3)
    sigmas = flow_sigmas(4)
    out = get_sampler(name)(velocity, x, sigmas)
    assert isinstance(out, SampleOutput) and out.sample.shape == x.shape and out.trajectory is None
    assert (out.log_probs is not None) == (name == "sde")
    # one velocity call per step, at the step's start time, as a [B] vector in x's dtype
    assert len(calls) == 4
    for t, sigma in zip(calls, sigmas[:-1]):
        assert t.shape == (5,) and t.dtype == x.dtype and torch.all(t == sigma)
    out = get_sampler(name)(velocity, x, sigmas, return_trajectory=True)
    assert out.trajectory.shape == (5, 5, 2, 3, 3)
    assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.sample)


def test_progress_bar_over_steps(capsys):
    ode_dpm(lambda x, t: -x, torch.randn(2, 3), flow_sigmas(7), progress=True)
    err = capsys.readouterr().err
    assert "ode_dpm" in err and "0/7" in err  # a bar with one tick per step


@pytest.mark.parametrize(
    "sigmas",
    [torch.tensor([1.0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.5, 0.5, 0.0]), torch.ones(2, 2)],
)
def test_bad_schedules_are_rejected(sigmas):
    for sampler in SAMPLERS.values():
        with pytest.raises(ValueError, match="sigmas"):
            sampler(lambda x, t: x, torch.randn(2, 3), sigmas)


def test_wrong_velocity_shape_is_reported():
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        ode_euler(lambda x, t: x[:, :1], torch.randn(2, 3), flow_sigmas(2))
