"""Reward plugins: ``build(name, **kwargs)`` returns ``reward(images, prompts, metadata) -> Tensor[B]``."""

from dgpo_lightning.rewards.base import (
    Reward,
    WeightedReward,
    available,
    build,
    build_weighted,
    check_scores,
    register,
    reward_kind,
)

__all__ = ["Reward", "WeightedReward", "available", "build", "build_weighted", "check_scores", "register", "reward_kind"]
