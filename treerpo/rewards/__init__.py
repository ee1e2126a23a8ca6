"""Reward functions."""

from treerpo.rewards.math_verify_reward import MathVerifyReward, extract_boxed, prepare_gold

__all__ = ["MathVerifyReward", "extract_boxed", "prepare_gold"]
