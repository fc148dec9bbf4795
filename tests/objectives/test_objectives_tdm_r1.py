"""TDM-R1 through the plug-in interface on the tiny world backbone with a trajectory batch: each of the
three updates moves only its own model, the fake-score, surrogate and generator losses and gradients
against hand recomputations from the step's seeded draws, exact micro-batches, the auxiliary models
in checkpoints (teacher trimmed, EMA kept), option errors naming their key."""

from __future__ import annotations

import math

import pytest
import torch

from dgpo_lightning import objectives
from dgpo_lightning.errors import ConfigError
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.objectives.tdm_r1 import STEP_SALT
from helpers import random_group_batch

#: The 4-step shift-3 schedule of the student (what ``flow_sigmas(4, 3)`` gives).
SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])


def flat(tensors):
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def make_module(path, perturb=0.02, **kwargs):
    options = {"aux_finetune": "full", **kwargs.pop("algorithm_options", {})}
    kwargs = {"algorithm": "tdm_r1", "finetune": "lora", "lora_rank": 4, "grad_clip": None, **kwargs}
    torch.manual_seed(0)  # LoRA initialisation draws from the global generator
    module = DGPOModule(model_path=str(path), algorithm_options=options, **kwargs)
    module.configure_model()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # online, teacher, fake and surrogate (and the old surrogate) all differ
        for p in module.trainable_parameters():
            p.add_(perturb * torch.randn(p.shape, generator=generator))
        for name in ("fake", "surrogate"):
            for p in module.auxiliary[name].parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        for p in module.auxiliary["old_surrogate"].averaged:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return module


def trajectory_batch(module, seed=1):
    batch = random_group_batch(module.backbone.latent_shape(), n_groups=2, group_size=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = len(batch)
    noise = torch.randn(n, *module.backbone.latent_shape(), generator=g)
    states = [noise]  # a deterministic-looking path: each state a mix of the noise and the final x0
    for t in SIGMAS[1:]:
        states.append((1 - t) * batch.latents + t * noise + 0.05 * torch.randn(noise.shape, generator=g))
    batch.trajectory = torch.stack(states, dim=1)
    batch.latents = batch.trajectory[:, -1].clone()
    batch.sigmas = SIGMAS.clone()
    return batch


def swapped(module, denoiser, x, t, cond, scale=1.0):
    online = module.backbone.denoiser
    module.backbone.denoiser = denoiser
    try:
        return module.backbone.velocity(x, t, cond, guidance_scale=scale)
    finally:
        module.backbone.denoiser = online


def teacher(module, x, t, cond, scale=1.0):
    with torch.no_grad(), module.reference.weights():
        return module.backbone.velocity(x, t, cond, guidance_scale=scale)


def shifted_tau(lower, u):
    """τ by hand: uniform in unshifted time (shift 3) above the bound + 0.02."""
    base = lower / (3 - 2 * lower) + 0.02
    s = base + u * (1 - base)
    return 3 * s / (1 + 2 * s)


def hand_draws(module, batch):
    """The step's draws re-made from the same seeded generators (the order the objective documents)."""
    ctx = module.train_context()
    objective = module.objective
    m, num_steps = objective.trained_steps, batch.sigmas.numel() - 1
    g = ctx.generator(STEP_SALT)
    steps = torch.randperm(num_steps, generator=g)[:m].tolist()
    probs = torch.arange(1, num_steps + 1, dtype=torch.float64) / (num_steps * (num_steps + 1) / 2)
    reward_steps = torch.multinomial(probs, m, replacement=True, generator=g).tolist()
    u = torch.rand(3, m, generator=g, dtype=torch.float64)
    shape = batch.latents.shape[1:]
    n = len(batch)
    fake, reward, gen, gen_group = (torch.empty(m, n, *shape) for _ in range(4))
    for gid in batch.group_index.unique().tolist():
        members = torch.nonzero(batch.group_index == gid).flatten()
        generator = ctx.generator(gid)
        for k in range(m):
            fake[k, members] = torch.randn((len(members), *shape), generator=generator)
            reward[k, members] = torch.randn((1, *shape), generator=generator)
            gen[k, members] = torch.randn((len(members), *shape), generator=generator)
            gen_group[k, members] = torch.randn((1, *shape), generator=generator)
    return steps, reward_steps, u, fake, reward, gen, gen_group


def transition(x, a, tau, noise):
    alpha = (1 - tau) / (1 - a)
    beta = math.sqrt(tau**2 - (a * alpha) ** 2)
    return alpha * x + beta * noise, alpha, beta


def hand_fake_loss(module, batch, draws):
    steps, _, u, fake_noise, *_ = draws
    cond = module.backbone.encode_prompts(batch.prompts)
    n = len(batch)
    total = 0
    for k, j in enumerate(steps):
        t, a = float(batch.sigmas[j]), float(batch.sigmas[j + 1])
        tau = shifted_tau(a, float(u[0, k]))
        x = batch.trajectory[:, j]
        with torch.no_grad():
            v = module.backbone.velocity(x, torch.full((n,), t), cond)
        x0_hat, x_next = x - t * v, x - (t - a) * v
        x_tau, _, _ = transition(x_next, a, tau, fake_noise[k])
        target = (x_tau - x0_hat) / tau
        v_real = teacher(module, x_tau, torch.full((n,), tau), cond)
        v_fake = swapped(module, module.auxiliary["fake"], x_tau, torch.full((n,), tau), cond)
        total = total + ((target - v_fake) ** 2).mean() + 0.02 * ((v_real - v_fake) ** 2).mean()
    return total / len(steps)


def hand_surrogate_loss(module, batch, draws, *, beta=1.0, clip=1e-3, threshold=0.05):
    """The official surrogate update by hand: target, both clips, detached group sigmoid, t-weight."""
    steps, reward_steps, u, _, reward_noise, *_ = draws
    cond = module.backbone.encode_prompts(batch.prompts)
    n, num_steps = len(batch), batch.sigmas.numel() - 1
    adv = batch.advantages.clamp(-5, 5)
    groups = batch.group_index.unique(return_inverse=True)[1]
    total, clip_fracs = 0, []
    for k, jr in enumerate(reward_steps):
        a = float(batch.sigmas[jr + 1])
        tau = shifted_tau(max(a, 0.55), float(u[2, k]))
        x, e = batch.trajectory[:, jr + 1], reward_noise[k]
        x_tau, alpha, b = transition(x, a, tau, e)
        target = -x / (1 - a) + e / b * (tau + a**2 * alpha / (1 - a))
        taus = torch.full((n,), tau)
        v_ref = teacher(module, x_tau, taus, cond)
        with torch.no_grad(), module.auxiliary["old_surrogate"].weights():
            v_old = swapped(module, module.auxiliary["surrogate"], x_tau, taus, cond)
        v = swapped(module, module.auxiliary["surrogate"], x_tau, taus, cond)
        dsm = ((target - v) ** 2).flatten(1).mean(1)
        dsm_old = ((target - v_old) ** 2).flatten(1).mean(1)
        dsm_ref = ((target - v_ref) ** 2).flatten(1).mean(1)
        reg = ((v - v_ref) ** 2).flatten(1).mean(1)
        ratio = torch.exp(dsm_old - dsm.detach())
        clipped = torch.where(adv > 0, ratio > 1 + clip, ratio < 1 - clip)
        ref_ratio = torch.exp(dsm_ref - dsm.detach())
        clipped_ref = (reg.detach().mean() > threshold) & torch.where(adv > 0, ref_ratio > 1, ref_ratio < 1)
        kept = torch.where(clipped | clipped_ref, dsm.detach(), dsm)
        z = torch.zeros(2).index_add_(0, groups, adv * beta * (dsm.detach() - dsm_ref) / 4)
        loss = (torch.sigmoid(z)[groups] * adv * kept).mean()
        total = total + (jr + 1) / num_steps * (loss + 0.001 * reg.mean())
        clip_fracs.append(clipped.float().mean())
    return total / len(reward_steps), torch.stack(clip_fracs).mean()


def hand_generator_loss(module, batch, draws, *, tdm=0.3, cfg=3.5, guidance=4.5, rl_cfg=4.5, t_min=0.25, trunc=4):
    steps, _, u, _, _, gen_noise, gen_group = draws
    cond = module.backbone.encode_prompts(batch.prompts)
    n = len(batch)
    total = 0
    for k, j in enumerate(steps):
        t, a = float(batch.sigmas[j]), float(batch.sigmas[j + 1])
        tau = shifted_tau(a, float(u[0, k]))
        lower = max(a, t_min)
        tau_d = max(shifted_tau(lower, float(u[1, k])), lower)
        x = batch.trajectory[:, j]
        v = module.backbone.velocity(x, torch.full((n,), t), cond)
        x0_hat, x_next = x - t * v, x - (t - a) * v
        with torch.no_grad():
            x_tau, _, _ = transition(x_next, a, tau, gen_noise[k])
            taus = torch.full((n,), tau)
            fake_x0 = x_tau - tau * swapped(module, module.auxiliary["fake"], x_tau, taus, cond)
            real_x0 = x_tau - tau * teacher(module, x_tau, taus, cond, guidance)
            cond_x0 = x_tau - tau * teacher(module, x_tau, taus, cond)
            uncond_x0 = x_tau - tau * teacher(module, x_tau, taus, cond, 0.0)
            w = (x0_hat - real_x0).abs().mean(dim=[1, 2, 3], keepdim=True)
        cfg_rev = (x0_hat + cfg * (cond_x0 - uncond_x0)).detach()
        kl_rev = (x0_hat + cond_x0 - fake_x0).detach()
        if j < trunc:
            with torch.no_grad():
                x_d, _, _ = transition(x_next, a, tau_d, gen_group[k])
                taus_d = torch.full((n,), tau_d)
                sur_x0 = x_d - tau_d * swapped(module, module.auxiliary["surrogate"], x_d, taus_d, cond, rl_cfg)
                ref_x0 = x_d - tau_d * teacher(module, x_d, taus_d, cond)
                wd = (x0_hat - sur_x0).abs().mean(dim=[1, 2, 3], keepdim=True)
            sur_rev = (x0_hat + sur_x0 - ref_x0).detach()
            loss = tdm * ((cfg_rev - x0_hat) ** 2 / w).mean() + (1 - tdm) * ((sur_rev - x0_hat) ** 2 / wd).mean() + ((kl_rev - x0_hat) ** 2 / w).mean()
        else:
            loss = tdm * (((cfg_rev - x0_hat) ** 2 + (kl_rev - x0_hat) ** 2) / w).mean()
        total = total + loss
    return total / len(steps)


@pytest.fixture
def module(tiny_world_path):
    return make_module(tiny_world_path)


def test_registered_with_trajectory_needs():
    assert "tdm_r1" in objectives.BUILTIN and "tdm_r1" in objectives.available()
    cls = objectives.get("tdm_r1")
    assert cls.needs.trajectory and cls.needs.sampler == "any" and not cls.uses_old_policy


def test_each_update_moves_only_its_own_model_and_the_losses_match_hand_recomputations(module):
    batch = trajectory_batch(module)
    draws = hand_draws(module, batch)
    # Recomputed before the step (each is computed by the objective before its own model's update).
    fake_expected = hand_fake_loss(module, batch, draws)
    module.zero_grad()
    fake_expected.backward()
    fake_grad = flat(p.grad for p in module.auxiliary["fake"].parameters())
    sur_expected, clip_frac = hand_surrogate_loss(module, batch, draws)
    module.zero_grad()
    sur_expected.backward()
    sur_grad = flat(p.grad for p in module.auxiliary["surrogate"].parameters())
    module.zero_grad()

    models = {
        "online": lambda: flat(module.trainable_parameters()),
        "fake": lambda: flat(module.auxiliary["fake"].parameters()),
        "surrogate": lambda: flat(module.auxiliary["surrogate"].parameters()),
        "old": lambda: flat(module.auxiliary["old_surrogate"].averaged),
        "frozen": lambda: flat(p for p in module.backbone.denoiser.parameters() if not p.requires_grad),
    }
    snapshots, grads = [{k: f() for k, f in models.items()}], {}
    ctx = module.train_context()
    real_step = ctx._step_auxiliary

    def step_and_snapshot(name):
        grads[name] = flat(p.grad for p in module.auxiliary[name].parameters())
        assert all(p.grad is None for p in module.trainable_parameters())  # the generator has not run yet
        real_step(name)
        snapshots.append({k: f() for k, f in models.items()})

    ctx._step_auxiliary = step_and_snapshot
    module.objective.settings = module.training_settings()
    out = module.objective.step(batch, ctx)
    before, after_fake, after_surrogate = snapshots
    changed = lambda x, y: {k for k in x if not torch.equal(x[k], y[k])}  # noqa: E731
    assert changed(before, after_fake) == {"fake"}
    assert changed(after_fake, after_surrogate) == {"surrogate"}
    # the old surrogate's EMA follows after the surrogate step: decay min(0.3, 0.001 + 0.001·0) = 0.001
    old_after = models["old"]()
    trained = flat(p for p in module.auxiliary["surrogate"].parameters() if p.requires_grad)
    torch.testing.assert_close(old_after, 0.001 * after_surrogate["old"] + 0.999 * trained)
    # the generator only accumulated gradients (the module steps it), on the online weights only
    assert torch.equal(models["online"](), before["online"])
    assert all(p.grad is not None for p in module.trainable_parameters())
    assert all(p.grad is None for name in ("fake", "surrogate") for p in module.auxiliary[name].parameters())

    torch.testing.assert_close(out.stats["fake_loss"], fake_expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["fake"], fake_grad, rtol=1e-4, atol=1e-5 * fake_grad.abs().max().item())
    torch.testing.assert_close(out.stats["surrogate_loss"], sur_expected.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.stats["surrogate_clip_frac"], clip_frac)
    torch.testing.assert_close(grads["surrogate"], sur_grad, rtol=1e-4, atol=1e-5 * sur_grad.abs().max().item())
    assert sur_grad.abs().max() > 0 and fake_grad.abs().max() > 0

    # The generator's loss and gradient, recomputed with the fake score and surrogate as updated.
    online_grad = flat(p.grad for p in module.trainable_parameters())
    module.zero_grad()
    gen_expected = hand_generator_loss(module, batch, draws)
    gen_expected.backward()
    torch.testing.assert_close(out.loss, gen_expected.detach(), rtol=1e-5, atol=1e-7)
    expected_grad = flat(p.grad for p in module.trainable_parameters())
    torch.testing.assert_close(online_grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grad.abs().max().item())


def test_micro_batches_give_the_single_pass_step(tiny_world_path):
    one = make_module(tiny_world_path)
    batch = trajectory_batch(one)
    loss, stats = one.backward_step(batch)
    micro = make_module(tiny_world_path, micro_batch_size=3)  # splits both groups of 4
    loss_micro, stats_micro = micro.backward_step(batch)
    torch.testing.assert_close(loss_micro, loss, rtol=1e-5, atol=1e-7)
    for key in stats:
        torch.testing.assert_close(stats_micro[key], stats[key], rtol=1e-4, atol=1e-7)
    # Adam's first step is ~lr·sign(g): a grad at float-noise level may move by up to the step size,
    # so the tolerance is a fraction of that step (lr · auxiliary_lr_scale).
    step_size = one.hparams.lr * one.objective.auxiliary_lr_scale
    for name in ("fake", "surrogate"):
        after, after_micro = flat(one.auxiliary[name].parameters()), flat(micro.auxiliary[name].parameters())
        torch.testing.assert_close(after_micro, after, rtol=0, atol=0.05 * step_size)
    g, g_micro = flat(p.grad for p in one.trainable_parameters()), flat(p.grad for p in micro.trainable_parameters())
    torch.testing.assert_close(g_micro, g, rtol=1e-4, atol=1e-6 * g.abs().max().item())


def test_teacher_from_a_path_is_frozen_and_trimmed_from_checkpoints(tmp_path, tiny_world_path):
    from dgpo_lightning.world.backbone import save_backbone, tiny_backbone

    torch.manual_seed(5)
    teacher_dir = save_backbone(tiny_backbone(), tmp_path / "teacher")
    module = make_module(tiny_world_path, algorithm_options={"teacher_path": str(teacher_dir), "aux_finetune": "lora", "aux_lora_rank": 2})
    teacher = module.auxiliary["teacher"]
    assert not any(p.requires_grad for p in teacher.parameters())
    # fake and surrogate start from the teacher's weights (their adapters start at zero)
    from dgpo_lightning.world.backbone import load_backbone

    loaded = flat(load_backbone(teacher_dir).denoiser.parameters())
    assert torch.equal(flat(teacher.parameters()), loaded)
    fake_trained = [n for n, p in module.auxiliary["fake"].named_parameters() if p.requires_grad]
    assert fake_trained and all("lora" in n for n in fake_trained)
    batch = trajectory_batch(module)
    module.backward_step(batch)  # runs with the loaded teacher
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith("auxiliary.teacher.") for k in keys)
    kept_fake = {k for k in keys if k.startswith("auxiliary.fake.")}
    assert kept_fake == {f"auxiliary.fake.{n}" for n in fake_trained}  # the copied base is trimmed, the adapter kept
    assert sum(k.startswith("auxiliary.old_surrogate.") for k in keys) == len(module.auxiliary["old_surrogate"].averaged)


def test_a_batch_without_trajectory_is_refused(module):
    batch = random_group_batch(module.backbone.latent_shape())
    with pytest.raises(ValueError, match="trajectory"):
        module.backward_step(batch)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(algorithm_options={"trained_steps": 0}), r"model\.algorithm_options\.trained_steps"),
        (dict(algorithm_options={"surrogate_clip": 0.0}), r"model\.algorithm_options\.surrogate_clip"),
        (dict(algorithm_options={"t_min_reward": 0.95}), r"model\.algorithm_options\.t_min_reward"),
        (dict(algorithm_options={"tdm_weight": 1.5}), r"model\.algorithm_options\.tdm_weight"),
        (dict(algorithm_options={"aux_finetune": "half"}), r"model\.algorithm_options\.aux_finetune"),
        (dict(algorithm_options={"auxiliary_lr_scale": -1}), r"model\.algorithm_options\.auxiliary_lr_scale"),
        (dict(clip_range=1e-3), r"model\.clip_range"),
        (dict(timesteps_per_sample=4), r"model\.timesteps_per_sample"),
        (dict(t_min=0.3), r"model\.t_min"),
        (dict(kl_beta=0.1), r"model\.kl_beta"),
        (dict(reference_guidance_scale=4.5), r"model\.reference_guidance_scale"),
    ],
)
def test_bad_options_name_the_key(tiny_world_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DGPOModule(model_path=str(tiny_world_path), algorithm="tdm_r1", **kwargs)


def test_too_many_trained_steps_for_the_rollout_name_the_key(tiny_world_path):
    module = make_module(tiny_world_path, algorithm_options={"trained_steps": 5})
    with pytest.raises(ConfigError, match=r"trained_steps"):
        module.backward_step(trajectory_batch(module))


def test_unknown_options_are_refused(tiny_world_path):
    with pytest.raises(ValueError, match="takes no options"):
        DGPOModule(model_path=str(tiny_world_path), algorithm="tdm_r1", algorithm_options={"beta_dpo": 1.0})
