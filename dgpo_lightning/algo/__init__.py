"""Pure-torch maths of DGPO and its baselines (no Lightning, no diffusers).

TDM-R1's surrogate-reward and generator maths: :mod:`.tdm_r1`.

Time convention: ``x_t = (1 − t)·x0 + t·ε``, ``t = 1`` is pure noise, velocity target ``v* = ε − x0``.
"""

from .advantages import group_advantages, group_weights
from .baselines import DPOStats, FlowGRPOStats, all_preference_pairs, best_worst_pairs, diffusion_dpo_loss, flow_grpo_loss
from .flow import denoising_error, flow_interpolate, velocity_target
from .loss import DGPOStats, dgpo_group_weight, dgpo_loss
from .nft import NFTStats, nft_loss, optimality_probability
from .regularizers import ppo_clip_mask, velocity_kl
from .tdm_r1 import (
    FakeScoreStats,
    GeneratorStats,
    SurrogateMasks,
    Transition,
    draw_tau,
    fake_score_loss,
    fake_score_target,
    forward_transition,
    generator_loss,
    reward_step_probabilities,
    shift_time,
    surrogate_clip_masks,
    surrogate_reward_loss,
    surrogate_target,
    unshift_time,
)
from .timesteps import sample_timesteps, schedule_timesteps

__all__ = [
    "DGPOStats",
    "DPOStats",
    "FakeScoreStats",
    "FlowGRPOStats",
    "GeneratorStats",
    "NFTStats",
    "SurrogateMasks",
    "Transition",
    "all_preference_pairs",
    "best_worst_pairs",
    "denoising_error",
    "dgpo_group_weight",
    "dgpo_loss",
    "diffusion_dpo_loss",
    "draw_tau",
    "fake_score_loss",
    "fake_score_target",
    "flow_grpo_loss",
    "flow_interpolate",
    "forward_transition",
    "generator_loss",
    "group_advantages",
    "group_weights",
    "nft_loss",
    "optimality_probability",
    "ppo_clip_mask",
    "reward_step_probabilities",
    "sample_timesteps",
    "schedule_timesteps",
    "shift_time",
    "surrogate_clip_masks",
    "surrogate_reward_loss",
    "surrogate_target",
    "unshift_time",
    "velocity_kl",
    "velocity_target",
]
