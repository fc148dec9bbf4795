"""The objective interface, its registry, and the pieces every objective shares.

An objective turns a :class:`~dgpo_lightning.objectives.batch.GroupBatch` of whole groups into a
loss, back-propagates it (in micro-batches when memory asks for it) and returns detached
diagnostics. It sees the models only through a :class:`TrainContext`: the online backbone, the
reference, the optional fast-EMA old policy, a seeded generator per group and a ``backward``
function; it never imports Lightning.

Adding an algorithm: one file in this package with an :class:`Objective` subclass decorated with
``@register("name")``, its entry in ``objectives/__init__.py``, a YAML with ``model.algorithm: name``
(its own options under ``model.algorithm_options``) and its tests.

Auxiliary models. An objective that trains or reads models besides the online one (TDM-R1: a frozen
teacher, a fake score, a surrogate reward and its EMA) declares them in
:meth:`Objective.auxiliary_models`; the module builds them once with the backbone, keeps them in its
state dict (checkpoints, resume, device moves), gives each trained one an AdamW optimizer and lets the
objective step it inside :meth:`Objective.step` with :meth:`TrainContext.step_auxiliary`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgpo_lightning.errors import check
from dgpo_lightning.algo import flow_interpolate, sample_timesteps, velocity_target
from dgpo_lightning.models.backbone import Backbone, Conditioning, concat_conditioning, index_conditioning
from dgpo_lightning.objectives.batch import GroupBatch
from dgpo_lightning.sampling.seeds import training_generator


@dataclass(frozen=True)
class RolloutNeeds:
    """What an objective needs from the rollouts it trains on.

    Attributes:
        sampler: ``any`` (ODE or SDE), ``sde`` (stochastic transitions with log-probabilities).
        trajectory: keep every sampler state ``[N, S + 1, ...]`` (and the SDE's log-probs).
    """

    sampler: Literal["any", "sde"] = "any"
    trajectory: bool = False


@dataclass(frozen=True)
class TrainingSettings:
    """Settings every objective may read (the module's constructor arguments of the same names).

    Attributes:
        beta: ``β`` of the implicit reward (DGPO, Diffusion-DPO).
        t_min, t_max: training timesteps ``t ~ U[t_min, t_max]`` (``t_min`` here is the current
            value; the module anneals it when asked).
        timesteps_per_sample: ``K`` timesteps (or trajectory steps) per sample per optimizer step.
        group_weighting: per-sample weights in DGPO's group sum: ``advantage`` | ``rank`` | ``softmax``.
        kl_beta: weight of the velocity KL to the reference.
        clip_range: the PPO-style clip (Flow-GRPO's ratio clip; DGPO's clip against the old policy).
        train_guidance_scale: CFG scale of the velocities in the loss.
        reference_guidance_scale: CFG scale of the reference only (``None``: ``train_guidance_scale``).
        micro_batch_size: samples per forward/backward pass (``None``: the whole batch).
    """

    beta: float = 30.0
    t_min: float = 0.0
    t_max: float = 1.0
    timesteps_per_sample: int = 1
    group_weighting: str = "advantage"
    kl_beta: float = 0.0
    clip_range: float | None = None
    train_guidance_scale: float = 1.0
    reference_guidance_scale: float | None = None
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        check(finite(self.beta) and self.beta >= 0, "model.beta", self.beta, "must be a finite number >= 0")
        check(finite(self.t_min) and 0.0 <= self.t_min < 1.0, "model.t_min", self.t_min, "must lie in [0, 1) (t = 1 is pure noise)")
        check(finite(self.t_max) and self.t_min < self.t_max <= 1.0, "model.t_max", self.t_max, f"must lie in (t_min={self.t_min}, 1]")
        check(self.timesteps_per_sample >= 1, "model.timesteps_per_sample", self.timesteps_per_sample, "must be >= 1")
        check(finite(self.kl_beta) and self.kl_beta >= 0, "model.kl_beta", self.kl_beta, "must be a finite number >= 0")
        check(self.clip_range is None or (finite(self.clip_range) and self.clip_range > 0), "model.clip_range", self.clip_range, "must be > 0 or null")
        check(finite(self.train_guidance_scale) and self.train_guidance_scale > 0, "model.train_guidance_scale", self.train_guidance_scale, "must be > 0")
        check(
            self.reference_guidance_scale is None or (finite(self.reference_guidance_scale) and self.reference_guidance_scale > 0),
            "model.reference_guidance_scale", self.reference_guidance_scale, "must be > 0 or null",
        )
        check(self.micro_batch_size is None or self.micro_batch_size >= 1, "model.micro_batch_size", self.micro_batch_size, "must be >= 1 or null")


@dataclass
class Auxiliary:
    """A model an objective trains or reads besides the online backbone.

    Attributes:
        module: the model (for a denoiser: called through :meth:`TrainContext.denoiser_velocity`);
            its trained tensors are those with ``requires_grad``.
        lr_scale: trained models: AdamW with ``lr = lr_scale ×`` the online optimizer's learning rate;
            ``None``: not trained (no optimizer).
        betas: that AdamW's betas.
        weight_decay: that AdamW's weight decay (``None``: ``model.weight_decay``).
        checkpoint_frozen: keep the module's frozen tensors in checkpoints because training changes
            them (an EMA copy). Otherwise frozen tensors are rebuilt from disk by ``configure_model``
            (a teacher, the base under an adapter) and trimmed from checkpoints like the backbone's.
    """

    module: nn.Module
    lr_scale: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float | None = None
    checkpoint_frozen: bool = False

    @property
    def trained(self) -> bool:
        return self.lr_scale is not None


@dataclass(frozen=True)
class AuxiliarySetup:
    """What :meth:`Objective.auxiliary_models` may build from.

    Attributes:
        backbone: the loaded backbone *before* any adapter is added: its ``denoiser`` holds the
            starting weights (``model.model_path``), frozen.
        load_denoiser: ``path -> denoiser``: another checkpoint through the same backbone loader and
            options, frozen (a teacher).
        trainable_copy: ``(denoiser, finetune, rank, alpha) -> copy``: a deep copy of ``denoiser``,
            entirely trainable (``finetune="full"``) or frozen with a fresh LoRA adapter of that rank
            and alpha (``"lora"``, the online model's targets; ``alpha=None``: ``2·rank``).
        moving_average: ``model -> average``: an EMA of ``model``'s trainable tensors, with a
            ``weights()`` context that swaps them into ``model`` (no gradients) and
            ``update_with(decay)`` (``θ̄ ← decay·θ̄ + (1 − decay)·θ``).
        lora_targets: the LoRA targets the online model uses (``None``: the backbone's defaults).
    """

    backbone: Backbone
    load_denoiser: Callable[[str], nn.Module]
    trainable_copy: Callable[..., nn.Module]
    moving_average: Callable[[nn.Module], nn.Module]
    lora_targets: Sequence[str] | None = None


class TrainContext:
    """The models and hooks an objective uses for one optimizer step.

    Args:
        backbone: the online model (its ``denoiser`` carries the gradients).
        reference_velocity: ``(x_t, t, cond, guidance_scale) -> v_ref`` without gradients.
        old_velocity: the same for the fast-EMA old policy (``None``: there is none).
        backward: back-propagates a loss (Lightning's ``manual_backward`` in the module).
        no_sync: a context manager that defers the cross-rank gradient sync (all but the last
            micro-batch); ``None``: nothing to defer.
        seed, step: the run seed and the optimizer step (all draws are functions of them).
        device: where the online model computes.
        auxiliary: the objective's auxiliary models by name (:meth:`Objective.auxiliary_models`).
        step_auxiliary: ``name -> None``: clip the gradients of auxiliary model ``name``, step its
            optimizer and zero its gradients (``None``: the objective has no trained auxiliary model).
    """

    def __init__(
        self,
        backbone: Backbone,
        reference_velocity: Callable[..., Tensor],
        *,
        old_velocity: Callable[..., Tensor] | None = None,
        backward: Callable[[Tensor], None] = lambda loss: loss.backward(),
        no_sync: Callable[[], ContextManager] | None = None,
        seed: int = 0,
        step: int = 0,
        device: torch.device | str | None = None,
        auxiliary: Mapping[str, nn.Module] | None = None,
        step_auxiliary: Callable[[str], None] | None = None,
    ):
        self.backbone = backbone
        self.auxiliary: Mapping[str, nn.Module] = dict(auxiliary or {})
        self._step_auxiliary = step_auxiliary
        self.reference_velocity = reference_velocity
        self.old_velocity = old_velocity
        self.backward = backward
        self.no_sync = no_sync
        self.seed, self.step = int(seed), int(step)
        self.device = torch.device(device) if device is not None else next(backbone.denoiser.parameters()).device

    def generator(self, salt: int = 0) -> torch.Generator:
        """The generator of this step's draws for ``salt`` (a group id)."""
        return training_generator(self.seed, self.step, salt)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v_θ(x_t, t, c)`` of the online model (with gradients)."""
        return self.backbone.velocity(x_t, t, cond, guidance_scale=guidance_scale)

    def denoiser_velocity(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v(x_t, t, c)`` of another denoiser of the backbone's architecture (an auxiliary model),
        computed by the backbone (its text conditioning, CFG and time scale) with ``denoiser`` swapped
        in; gradients flow into ``denoiser`` unless the caller is under ``no_grad``."""
        online = self.backbone.denoiser
        self.backbone.denoiser = denoiser
        try:
            return self.backbone.velocity(x_t, t, cond, guidance_scale=guidance_scale)
        finally:
            self.backbone.denoiser = online

    def step_auxiliary(self, name: str, loss: Tensor | None = None) -> None:
        """Back-propagate ``loss`` (when given; earlier ``backward`` calls accumulate), then clip, step
        and zero the gradients of the trained auxiliary model ``name``."""
        if name not in self.auxiliary:
            raise KeyError(f"no auxiliary model {name!r}; the objective declared {sorted(self.auxiliary)}")
        if self._step_auxiliary is None:
            raise RuntimeError("this TrainContext was built without step_auxiliary (no auxiliary optimizers)")
        if loss is not None:
            self.backward(loss)
        self._step_auxiliary(name)


@dataclass
class StepOutput:
    """An objective's result: the (detached) loss of the batch and named detached diagnostics."""

    loss: Tensor
    stats: dict[str, Tensor]


class Objective(ABC):
    """One training algorithm. Subclasses set ``needs`` and implement :meth:`step`.

    Args:
        settings: the shared :class:`TrainingSettings`.
        **options: the algorithm's own options (``model.algorithm_options``); unknown ones raise.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[RolloutNeeds] = RolloutNeeds()
    #: Whether the objective's clip reads the old policy (the module then keeps one).
    uses_old_policy: ClassVar[bool] = False

    def __init__(self, settings: TrainingSettings, **options: Any):
        if options:
            raise ValueError(f"model.algorithm_options: {self.name} takes no options {sorted(options)}")
        self.settings = settings

    def auxiliary_models(self, setup: AuxiliarySetup) -> dict[str, Auxiliary]:
        """The extra models this objective trains or reads (none by default). Called once, by the
        module's ``configure_model``, before the online model gets its adapter."""
        return {}

    @abstractmethod
    def step(self, batch: GroupBatch, ctx: TrainContext) -> StepOutput:
        """Compute the loss of ``batch``, back-propagate it through ``ctx.backward`` and return it."""


_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an objective available as ``model.algorithm: name``."""

    def decorate(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


# --------------------------------------------------------------------------- shared pieces


def noisy_copies(
    x0: Tensor, groups: Tensor, group_ids: Tensor, ctx: TrainContext, *, k: int, t_min: float, t_max: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``K`` noisy versions of each sample with timesteps and noise shared inside each group.

    Group ``group_ids[g]``'s ``K`` timesteps ``t ~ U[t_min, t_max]`` and noises ``ε`` at optimizer
    step ``s`` come from ``(seed, s, group id)`` alone, so a group trains the same whichever rank or
    batch holds it. ``x_t = (1 − t)·x0 + t·ε``, target ``v* = ε − x0``.

    Args:
        x0: ``[N, ...]`` clean latents; ``groups``: ``[N]`` dense group position ``0..P-1``;
            group_ids: ``[P]`` global group ids.

    Returns:
        ``x_t, t, v*`` stacked k-major: ``[K·N, ...]``, ``[K·N]``, ``[K·N, ...]``.
    """
    draws_t, draws_noise = [], []
    for gid in group_ids.tolist():
        generator = ctx.generator(gid)
        draws_t.append(sample_timesteps(1, k, t_min=t_min, t_max=t_max, generator=generator)[0])
        draws_noise.append(torch.randn((k, *x0.shape[1:]), generator=generator))
    t, noise = torch.stack(draws_t), torch.stack(draws_noise)
    t = t.to(x0.device, x0.dtype)[groups].T.reshape(-1)
    noise = noise.to(x0.device, x0.dtype)[groups].transpose(0, 1).reshape(-1, *x0.shape[1:])
    x0 = x0.repeat(k, *([1] * (x0.dim() - 1)))
    return flow_interpolate(x0, noise, t), t, velocity_target(x0, noise)


def repeat_for_timesteps(cond: Conditioning, k: int) -> Conditioning:
    """The conditioning of ``N`` samples stacked ``K`` times (k-major, as :func:`noisy_copies`)."""
    return concat_conditioning([cond] * k) if k > 1 else cond


def rows(idx: Tensor, n: int, k: int) -> Tensor:
    """Rows of samples ``idx`` in a k-major ``[K·N]`` stack."""
    return (torch.arange(k, device=idx.device)[:, None] * n + idx[None, :]).reshape(-1)


def sample_chunks(n: int, micro_batch_size: int | None, device: torch.device | str | None = None) -> list[Tensor]:
    """Sample indices ``0..n-1`` in micro-batches of ``micro_batch_size`` (one chunk when ``None``)."""
    size = micro_batch_size or n
    return [torch.arange(i, min(i + size, n), device=device) for i in range(0, n, size)]


def chunked(fn: Callable[..., Tensor], x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float, size: int | None) -> Tensor:
    """``fn(x_t, t, cond, guidance_scale)`` over all rows, ``size`` rows at a time (no-grad passes)."""
    size = size or x_t.shape[0]
    parts = [
        fn(x_t[i : i + size], t[i : i + size], index_conditioning(cond, slice(i, i + size)), guidance_scale)
        for i in range(0, x_t.shape[0], size)
    ]
    return torch.cat(parts)


def reference_velocity(ctx: TrainContext, settings: TrainingSettings, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """``v_ref`` on every row with the reference's CFG scale (``reference_guidance_scale`` when set:
    the official ``kl_cfg`` mode guides only the reference)."""
    scale = settings.train_guidance_scale if settings.reference_guidance_scale is None else settings.reference_guidance_scale
    return chunked(ctx.reference_velocity, x_t, t, cond, scale, settings.micro_batch_size)


def micro_batched_backward(
    ctx: TrainContext,
    chunks: Sequence[Tensor],
    forward: Callable[[Tensor], Any],
    loss_of: Callable[[Any, Tensor, Any], tuple[Tensor, dict[str, Tensor]]],
    *,
    couple: Callable[[Any], tuple[Any, Tensor, dict[str, Tensor]]] | None = None,
) -> StepOutput:
    """Back-propagate a batch loss in micro-batches with the exact whole-batch gradient.

    ``forward(idx)`` computes the per-sample quantities of the samples ``idx`` (with autograd);
    ``loss_of(outputs, idx, coupling)`` turns them into that chunk's share of the batch loss and its
    share of the diagnostics (both sum over chunks to the batch's).

    - One chunk: ``loss_of(forward(all), all, None)`` is the batch loss; one backward.
    - Several chunks, samples independent (``couple=None``): each chunk's share is back-propagated
      on its own; loss and diagnostics are the sums of the shares.
    - Several chunks, samples coupled (DGPO's group weight ``σ(z_g)`` depends on every member):
      a no-grad pass over all chunks gives ``couple(all outputs) -> (coupling, loss, stats)``, the
      constants that decouple the chunks, the batch loss and its diagnostics; then each chunk
      back-propagates ``loss_of(forward(idx), idx, coupling)``, whose gradients sum to the batch's.

    The cross-rank gradient sync is deferred (``ctx.no_sync``) to the last chunk.
    """
    if len(chunks) == 1:
        loss, stats = loss_of(forward(chunks[0]), chunks[0], None)
        ctx.backward(loss)
        return StepOutput(loss.detach(), {k: v.detach() for k, v in stats.items()})
    coupling, total, totals = None, None, None
    if couple is not None:
        with torch.no_grad():
            parts = [forward(idx) for idx in chunks]
        coupling, total, totals = couple(_concat(parts))
    shares, share_stats = [], []
    for number, idx in enumerate(chunks):
        last = number == len(chunks) - 1
        with ctx.no_sync() if (ctx.no_sync is not None and not last) else nullcontext():
            loss, stats = loss_of(forward(idx), idx, coupling)
            ctx.backward(loss)
        shares.append(loss.detach())
        share_stats.append({k: v.detach() for k, v in stats.items()})
    if couple is None:
        total = torch.stack(shares).sum()
        totals = {key: sum(s[key] for s in share_stats) for key in share_stats[0]}
    return StepOutput(total.detach(), {k: v.detach() for k, v in totals.items()})


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-chunk outputs: tensors, or tuples of tensors."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    items = [torch.cat(column) for column in zip(*parts)]
    return type(parts[0])(*items) if hasattr(parts[0], "_fields") else type(parts[0])(items)


__all__ = [
    "Auxiliary",
    "AuxiliarySetup",
    "Objective",
    "RolloutNeeds",
    "StepOutput",
    "TrainContext",
    "TrainingSettings",
    "chunked",
    "micro_batched_backward",
    "noisy_copies",
    "reference_velocity",
    "register",
    "repeat_for_timesteps",
    "rows",
    "sample_chunks",
]
