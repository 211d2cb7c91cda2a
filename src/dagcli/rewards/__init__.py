"""Rewards: a registry of image scorers, built from a spec such as `aesthetic:1.0,clip:0.5`.

Importing this package registers the built-in rewards (no model is loaded until `build_reward`).
"""

from dagcli.rewards import aesthetic, clip, color, jpeg, modes, pickscore  # noqa: F401  (registers the built-ins)
from dagcli.rewards.base import Reward, RewardInfo, RewardOutput, images_from_pil, load_image_folder
from dagcli.rewards.registry import (
    REWARDS,
    WeightedReward,
    build_reward,
    list_rewards,
    parse_spec,
    register_reward,
    validate_spec,
)

__all__ = [
    "REWARDS",
    "Reward",
    "RewardInfo",
    "RewardOutput",
    "WeightedReward",
    "build_reward",
    "images_from_pil",
    "list_rewards",
    "load_image_folder",
    "parse_spec",
    "register_reward",
    "validate_spec",
]
