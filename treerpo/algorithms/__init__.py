"""TreeRPO and GRPO: node values, sibling-group advantages, the PPO-clip loss."""

from treerpo.algorithms.advantages import NORMALIZATIONS, VALUE_MODES, compute_advantages, node_values, sibling_groups
from treerpo.algorithms.grpo import grpo_spec
from treerpo.algorithms.loss import policy_loss

__all__ = [
    "NORMALIZATIONS",
    "VALUE_MODES",
    "compute_advantages",
    "grpo_spec",
    "node_values",
    "policy_loss",
    "sibling_groups",
]
