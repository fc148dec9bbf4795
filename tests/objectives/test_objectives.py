"""The objectives as plug-ins: each loss and gradient against an independent recomputation, the exact
micro-batched backward, group weightings, the clip against the EMA reference and the old policy."""

from __future__ import annotations

import functools

import pytest
import torch

from dgpo_lightning import objectives
from dgpo_lightning.algo import dgpo_loss, flow_grpo_loss, group_weights, ppo_clip_mask
from dgpo_lightning.data.rollout import generate_groups
from dgpo_lightning.module import DGPOModule
from dgpo_lightning.objectives import GroupBatch, Objective, RolloutNeeds, StepOutput, TrainContext, register
from dgpo_lightning.objectives.base import micro_batched_backward, noisy_copies, sample_chunks
from dgpo_lightning.rewards.base import WeightedReward
from dgpo_lightning.sampling import sde_step_log_prob
from dgpo_lightning.sampling.settings import SamplerSettings
from helpers import random_group_batch

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]


def flat(tensors):
    return torch.cat([t.detach().flatten().clone() for t in tensors])


def make_batch(module, **kwargs):
    return random_group_batch(module.backbone.latent_shape(), **kwargs)


def make_module(tiny_world_path, perturb=0.02, **kwargs):
    module = DGPOModule(model_path=str(tiny_world_path), grad_clip=None, **kwargs)
    module.configure_model()
    with torch.no_grad():  # move away from the reference so that the sigmoid is not exactly 1/2
        generator = torch.Generator().manual_seed(7)
        for p in module.trainable_parameters():
            p.add_(perturb * torch.randn(p.shape, generator=generator))
    return module


def gradient(module, batch):
    for p in module.trainable_parameters():
        p.grad = None
    loss, stats = module.backward_step(batch)
    return loss, flat(p.grad for p in module.trainable_parameters()), stats


def recompute_errors(module, batch, old=None):
    """Online/reference(/old) denoising errors on the step's noisy copies, computed here."""
    hp = module.hparams
    group_ids, groups = batch.group_index.unique(return_inverse=True)
    x_t, t, target = noisy_copies(
        batch.latents, groups, group_ids, module.train_context(), k=hp.timesteps_per_sample, t_min=module.current_t_min, t_max=hp.t_max
    )
    k = hp.timesteps_per_sample
    cond = module.backbone.encode_prompts(batch.prompts * k)
    cond = {key: torch.cat([value[: len(batch)]] * k) for key, value in cond.items()}
    err = lambda v: ((v - target) ** 2).mean(dim=(1, 2, 3)).view(k, -1).mean(0)  # noqa: E731
    online = err(module.backbone.velocity(x_t, t, cond))
    with torch.no_grad(), module.reference.weights():
        reference = err(module.backbone.velocity(x_t, t, cond))
    dsm_old = None
    if old is not None:
        with torch.no_grad(), old():
            dsm_old = err(module.backbone.velocity(x_t, t, cond))
    return online, reference, dsm_old, groups, t


@pytest.mark.parametrize("scheme", ["rank", "softmax"])
def test_dgpo_with_rank_and_softmax_weights_matches_a_recomputation(tiny_world_path, scheme):
    module = make_module(tiny_world_path, beta=30.0, group_weighting=scheme)
    batch = make_batch(module)
    loss, grad, _ = gradient(module, batch)
    online, reference, _, groups, _ = recompute_errors(module, batch)
    weights = group_weights(batch.advantages, groups, scheme=scheme)
    assert not torch.allclose(weights, batch.advantages)  # the scheme really changes the weights
    expected = dgpo_loss(online, reference, weights, groups, beta=30.0)[0]
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    module.zero_grad()
    expected.backward()
    torch.testing.assert_close(grad, flat(p.grad for p in module.trainable_parameters()), rtol=1e-4, atol=1e-7)


def test_rank_weights_by_hand():
    advantages = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, -5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    ranks = torch.tensor([1.5, 0.0, 3.0, 1.5, 1.0, 0.0])  # ties share their mean rank
    standardise = lambda r: (r - r.mean()) / r.std(unbiased=False)  # noqa: E731
    expected = torch.cat([standardise(ranks[:4]), standardise(ranks[4:])])
    torch.testing.assert_close(group_weights(advantages, groups, scheme="rank"), expected)
    softmax = group_weights(advantages, groups, scheme="softmax")
    first = 4 * (torch.softmax(advantages[:4], 0) - 0.25)
    torch.testing.assert_close(softmax[:4], first)
    assert torch.allclose(softmax[:4].sum(), torch.tensor(0.0), atol=1e-6)


@pytest.mark.parametrize("micro_batch_size", [1, 5])
def test_dgpo_clip_against_the_ema_reference(tiny_world_path, micro_batch_size):
    """With ``reference=ema`` the clip compares with the (slow EMA) reference; exact in micro-batches."""
    kwargs = dict(finetune="full", reference="ema", clip_range=2e-3, beta=30.0, perturb=0.05)
    module = make_module(tiny_world_path, **kwargs)
    batch = make_batch(module)
    loss, grad, stats = gradient(module, batch)
    online, reference, _, groups, _ = recompute_errors(module, batch)
    keep = ppo_clip_mask(online, reference, batch.advantages, 2e-3)
    assert 0 < int(keep.sum()) < keep.numel()  # some samples clipped, some not
    torch.testing.assert_close(stats["clip_frac"], 1 - keep.float().mean())
    expected = dgpo_loss(torch.where(keep, online, online.detach()), reference, batch.advantages, groups, beta=30.0)[0]
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    module.zero_grad()
    expected.backward()
    torch.testing.assert_close(grad, flat(p.grad for p in module.trainable_parameters()), rtol=1e-4, atol=1e-7)
    micro = make_module(tiny_world_path, micro_batch_size=micro_batch_size, **kwargs)
    loss_micro, grad_micro, _ = gradient(micro, batch)
    torch.testing.assert_close(loss_micro, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_micro, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_official_recipe_clip_reads_the_fast_ema_old_policy(tiny_world_path, finetune):
    """Three models: the frozen reference in the implicit reward and KL, the old policy in the clip."""
    module = make_module(tiny_world_path, finetune=finetune, lora_rank=4, old_policy=True, clip_range=2e-3, beta=30.0,
                         kl_beta=0.1, perturb=0.05)
    with torch.no_grad():  # an old policy that differs from both the online and the reference weights
        for old in module.old_policy.averaged:
            old.add_(0.03 * torch.randn_like(old))
    batch = make_batch(module)
    loss, grad, stats = gradient(module, batch)
    online, reference, dsm_old, groups, _ = recompute_errors(module, batch, old=module.old_policy.weights)
    assert not torch.allclose(dsm_old, reference) and not torch.allclose(dsm_old, online)
    keep = ppo_clip_mask(online, dsm_old, batch.advantages, 2e-3)
    assert 0 < int(keep.sum()) < keep.numel()
    torch.testing.assert_close(stats["clip_frac"], 1 - keep.float().mean())
    dgpo = dgpo_loss(torch.where(keep, online, online.detach()), reference, batch.advantages, groups, beta=30.0)[0]
    # the KL term is to the reference, not the old policy: recompute it from velocities
    assert stats["kl"] > 0
    expected = dgpo + 0.1 * stats["kl"]
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)


def test_old_policy_follows_the_official_decay_schedule(tiny_world_path):
    from dgpo_lightning.models.reference import OldPolicy

    module = make_module(tiny_world_path, finetune="lora", lora_rank=4, perturb=0.0)
    trained = module.trainable_parameters()
    old = OldPolicy(module.backbone.denoiser, decay_max=0.3, decay_rate=0.1)
    expected = [p.detach().clone() for p in trained]
    generator = torch.Generator().manual_seed(3)
    for step in range(6):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn(p.shape, generator=generator))
        old.update(step)
        decay = min(0.3, 0.1 * step)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, trained)]
    torch.testing.assert_close(flat(old.averaged), flat(expected))
    online = flat(trained)
    with old.weights():
        torch.testing.assert_close(flat(trained), flat(expected))
    assert torch.equal(flat(trained), online)  # swapped back untouched


def test_clip_without_an_old_policy_is_refused(tiny_world_path):
    with pytest.raises(ValueError, match=r"model\.clip_range.*old_policy"):
        DGPOModule(model_path=str(tiny_world_path), clip_range=1e-2)


@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_flow_grpo_micro_batches_give_the_single_pass_gradient(tiny_world_path, micro_batch_size):
    reward = WeightedReward({"brightness": lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3))})
    records = [{"prompt": p} for p in PROMPTS]
    kwargs = dict(algorithm="flow_grpo", clip_range=0.2, timesteps_per_sample=2, kl_beta=0.1)
    module = make_module(tiny_world_path, **kwargs)
    rollout = generate_groups(module.backbone, records, 3, reward, seed=0, settings=SamplerSettings("sde", 4), keep_trajectory=True)
    batch = rollout.batches(3)[0]
    with torch.no_grad():  # off-policy, so that ratios differ from 1 and some are clipped
        for p in module.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, grad, stats = gradient(module, batch)
    # independent recomputation of the ratio loss on the same trajectory steps
    candidates = (batch.sigmas[1:] > 0).nonzero().flatten()
    steps = candidates[torch.randperm(candidates.numel(), generator=module.train_context().generator(int(batch.group_index.min())))[:2]]
    total = 0
    for s in steps.tolist():
        x, x_next = batch.trajectory[:, s], batch.trajectory[:, s + 1]
        sigma = batch.sigmas[s].expand(len(batch))
        cond = module.backbone.encode_prompts(batch.prompts)
        v = module.backbone.velocity(x, sigma, cond, guidance_scale=batch.settings.guidance_scale)
        dims = x[0].numel()
        log_prob = sde_step_log_prob(v, x, x_next, sigma, batch.sigmas[s + 1].expand(len(batch)), noise_level=0.7) / dims
        total = total + flow_grpo_loss(log_prob, batch.log_probs[:, s] / dims, batch.advantages, clip_range=0.2)[0] / 2
        with torch.no_grad(), module.reference.weights():
            v_ref = module.backbone.velocity(x, sigma, cond)
        total = total + 0.1 * ((v - v_ref) ** 2).mean() / 2
    torch.testing.assert_close(loss, total.detach(), rtol=1e-5, atol=1e-6)
    micro = make_module(tiny_world_path, micro_batch_size=micro_batch_size, **kwargs)
    with torch.no_grad():
        for p, q in zip(micro.trainable_parameters(), module.trainable_parameters()):
            p.copy_(q)
    loss_micro, grad_micro, _ = gradient(micro, batch)
    torch.testing.assert_close(loss_micro, loss, rtol=1e-5, atol=1e-6)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad_micro, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_annealed_t_min_moves_linearly_and_bounds_the_timesteps(tiny_world_path):
    module = make_module(tiny_world_path, t_min=0.2, t_min_final=0.8, t_min_anneal_epochs=4, timesteps_per_sample=3)
    batch = make_batch(module)
    seen = []
    for epoch in range(6):
        module._trainer = type("T", (), {"current_epoch": epoch, "global_step": epoch})()
        expected = 0.2 + 0.6 * min(1.0, epoch / 4)
        assert module.current_t_min == pytest.approx(expected)
        assert module.training_settings().t_min == pytest.approx(expected)
        group_ids, groups = batch.group_index.unique(return_inverse=True)
        ctx = TrainContext(module.backbone, module.reference.velocity, seed=0, step=epoch)
        _, t, _ = noisy_copies(batch.latents, groups, group_ids, ctx, k=3, t_min=module.current_t_min, t_max=1.0)
        assert bool((t >= expected).all()) and bool((t <= 1.0).all())
        seen.append(t.min().item())
    module._trainer = None
    assert seen[-1] >= 0.8 > seen[0]


def test_micro_batched_backward_is_exact_on_a_coupled_toy_loss():
    """softmax-coupled loss: chunks with the no-grad coupling give autograd's whole-batch gradient."""
    w = torch.randn(7, requires_grad=True)
    x = torch.randn(7)
    ctx = TrainContext(type("B", (), {"denoiser": torch.nn.Linear(1, 1)})(), None, device="cpu")
    whole_loss = torch.logsumexp(w * x, 0)
    (expected,) = torch.autograd.grad(whole_loss, w)

    forward = lambda idx: w[idx] * x[idx]  # noqa: E731

    def couple(values):
        return torch.logsumexp(values, 0), torch.logsumexp(values, 0), {}

    def loss_of(values, idx, coupling):
        if coupling is None:
            return torch.logsumexp(values, 0), {}
        return (torch.exp(values - coupling).detach() * values).sum(), {}  # gradient share of logsumexp

    out = micro_batched_backward(ctx, sample_chunks(7, 3), forward, loss_of, couple=couple)
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(out.loss, whole_loss.detach())


def test_a_new_objective_needs_no_edit_of_the_module(tiny_world_path):
    """One class + its registry entry: the module trains it by name, with its own options."""

    @register("test_mean_error")
    class MeanError(Objective):
        needs = RolloutNeeds()

        def __init__(self, settings, scale: float = 1.0):
            super().__init__(settings)
            self.scale = scale

        def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
            x = batch.latents.to(ctx.device)
            t = torch.full((len(batch),), 0.5)
            v = ctx.velocity(x, t, ctx.backbone.encode_prompts(batch.prompts))
            loss = self.scale * (v**2).mean()
            ctx.backward(loss)
            return StepOutput(loss.detach(), {"scale": torch.tensor(self.scale)})

    assert "test_mean_error" in objectives.available()
    module = make_module(tiny_world_path, algorithm="test_mean_error", algorithm_options={"scale": 3.0})
    loss, grad, stats = gradient(module, make_batch(module))
    assert stats["scale"] == 3.0 and grad.abs().max() > 0
    with pytest.raises(ValueError, match="not a known objective"):
        DGPOModule(model_path=str(tiny_world_path), algorithm="no_such_objective")
    with pytest.raises(ValueError, match="takes no options"):
        DGPOModule(model_path=str(tiny_world_path), algorithm="dgpo", algorithm_options={"bogus": 1})


def test_optimizer_and_scheduler_are_configurable(tiny_world_path):
    module = make_module(
        tiny_world_path,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["momentum"] == 0.9
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert isinstance(make_module(tiny_world_path).configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"model\.lr"):
        DGPOModule(model_path=str(tiny_world_path), lr=1e-3, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
