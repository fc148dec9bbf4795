"""Pure-torch maths of DGPO and its baselines (no Lightning, no diffusers).

Time convention: ``x_t = (1 − t)·x0 + t·ε``, ``t = 1`` is pure noise, velocity target ``v* = ε − x0``.
"""

from .advantages import group_advantages, group_weights
from .baselines import DPOStats, FlowGRPOStats, best_worst_pairs, diffusion_dpo_loss, flow_grpo_loss
from .flow import denoising_error, flow_interpolate, velocity_target
from .loss import DGPOStats, dgpo_group_weight, dgpo_loss
from .nft import NFTStats, nft_loss, optimality_probability
from .regularizers import ppo_clip_mask, velocity_kl
from .timesteps import sample_timesteps, schedule_timesteps

__all__ = [
    "DGPOStats",
    "DPOStats",
    "FlowGRPOStats",
    "NFTStats",
    "best_worst_pairs",
    "denoising_error",
    "dgpo_group_weight",
    "dgpo_loss",
    "diffusion_dpo_loss",
    "flow_grpo_loss",
    "flow_interpolate",
    "group_advantages",
    "group_weights",
    "nft_loss",
    "optimality_probability",
    "ppo_clip_mask",
    "sample_timesteps",
    "schedule_timesteps",
    "velocity_kl",
    "velocity_target",
]
