"""The reward contract, a weighted multi-reward and the registry.

A reward maps a batch of images in ``[0, 1]`` with their prompts (and optional per-prompt metadata,
e.g. GenEval clauses) to one float per image. Heavy scorers load their weights lazily, on first
call, from a local path; nothing is loaded or downloaded at import time.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """``reward(images[B, 3, H, W] in [0, 1], prompts, metadata=None) -> Tensor[B]``."""

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class/function decorator adding a reward factory under ``name``."""

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Names accepted by :func:`build`."""
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def reward_kind(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The registered reward that ``name`` builds: its ``kind`` option, else ``name`` itself."""
    return str((options or {}).get("kind", name))


def build(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` (see :func:`available`).

    A ``kind`` option names the registered reward and makes ``name`` a free label, so one reward can
    be used twice with different options: ``{"deqa": {"kind": "vlm_judge", "preset": "deqa", ...},
    "unified_reward": {"kind": "vlm_judge", "preset": "unified_reward", ...}}``.
    """
    _import_builtin_rewards()
    kind = kwargs.pop("kind", name)
    if kind not in _REGISTRY:
        label = f"reward {name!r}" + (f" (kind {kind!r})" if kind != name else "")
        raise ValueError(
            f"unknown {label}; available: {', '.join(sorted(_REGISTRY))} "
            "(a label of your own needs a 'kind' option naming one of them)"
        )
    return _REGISTRY[kind](**kwargs)


def check_scores(name: str, scores: Tensor, batch_size: int, *, allow_non_finite: bool = False) -> Tensor:
    """Validate a reward's output: shape ``[B]`` and (unless allowed) finite, else a clear error naming
    the reward. Returns the scores as detached float32 on the CPU."""
    if not isinstance(scores, Tensor) or scores.shape != (batch_size,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"reward {name!r} returned {shape}, expected a tensor of shape ({batch_size},)")
    if not allow_non_finite:
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {name!r} returned non-finite scores at indices {bad}")
    return scores.detach().float().cpu()


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move a lazily loaded scorer to ``device`` unless it is there (``Module.to`` walks every
    parameter, so it is skipped on the calls that need no move)."""
    if next(model.parameters()).device != device:
        model.to(device)


def check_images(name: str, images: Tensor, prompts: Sequence[str] | None = None) -> None:
    """Refuse anything but ``images [B, 3, H, W]`` (with ``B`` prompts, when given), naming the reward."""
    if images.ndim == 5 and images.shape[2] == 3:
        raise ValueError(f"reward {name!r} scores images but got videos {tuple(images.shape)}: "
                         f"score the frames with the frame_mean reward (reward: {name})")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {name!r}: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(prompts)} prompts")


class WeightedReward:
    """``r(x) = Σ_k w_k · r_k(x)``; also exposes each component through :meth:`components`."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None):
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        self.rewards = dict(rewards)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.rewards}
        bad = {name: weight for name, weight in self.weights.items() if not math.isfinite(weight)}
        if bad:
            raise ValueError(f"reward weights must be finite numbers, got {bad}")

    def components(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        batch_size: int | None = None,
        allow_non_finite: bool = False,
    ) -> dict[str, Tensor]:
        """Each component's scores ``[N]`` (CPU float32), ``batch_size`` images per reward call.

        ``allow_non_finite`` keeps NaN/inf scores so that the caller can report and drop the groups
        they hit (rollouts); otherwise they raise, naming the reward."""
        size = batch_size or images.shape[0]
        metadata = list(metadata) if metadata is not None else [None] * len(prompts)
        parts: dict[str, list[Tensor]] = {name: [] for name in self.rewards}
        for start in range(0, images.shape[0], size):
            chunk = slice(start, start + size)
            count = images[chunk].shape[0]
            for name, reward in self.rewards.items():
                scores = reward(images[chunk], list(prompts[chunk]), metadata[chunk])
                parts[name].append(check_scores(name, scores, count, allow_non_finite=allow_non_finite))
        return {name: torch.cat(values) for name, values in parts.items()}

    def total(self, components: Mapping[str, Tensor]) -> Tensor:
        """``Σ_k w_k · components[k]``."""
        return sum(self.weights[name] * components[name] for name in self.rewards)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> Tensor:
        return self.total(self.components(images, prompts, metadata))


def build_weighted(spec: Mapping[str, float] | Sequence[str], **kwargs_by_name: Mapping[str, Any]) -> WeightedReward:
    """Build a :class:`WeightedReward` from ``{name: weight}`` (or a list of names, weight 1)."""
    weights = dict(spec) if isinstance(spec, Mapping) else {name: 1.0 for name in spec}
    return WeightedReward({n: build(n, **dict(kwargs_by_name.get(n, {}))) for n in weights}, weights)


#: Rewards defined above this layer, by module string (importing the module registers them), so a
#: config can name them without importing anything first and this layer never imports the world.
REWARD_PROVIDERS: dict[str, str] = {
    "world_video": "dgpo_lightning.world.video.reward",
    "world_video_partial": "dgpo_lightning.world.video.reward",
}


def _import_builtin_rewards() -> None:
    # Importing the modules registers their rewards; heavy libraries are imported lazily inside them.
    import importlib
    import pkgutil

    import dgpo_lightning.rewards as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")
    for provider in sorted(set(REWARD_PROVIDERS.values())):
        importlib.import_module(provider)
