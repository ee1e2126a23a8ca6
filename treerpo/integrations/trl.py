"""treerpo for TRL users (``pip install treerpo[trl]``).

    GRPOTrainer(..., rollout_func=treerpo_rollout())     # TRL's GRPO, completions sampled by treerpo's engine
    TreeRPOTrainer(model, reward_funcs, args=TreeRPOConfig(branching=[4, 2, 2], segment_tokens=12, ...))

See docs/embedding.md.
"""

from treerpo.integrations.trl_rollout import treerpo_rollout
from treerpo.integrations.trl_sampling import UnsupportedTRLOption
from treerpo.integrations.trl_trainer import TreeRPOConfig, TreeRPOTrainer

__all__ = ["TreeRPOConfig", "TreeRPOTrainer", "UnsupportedTRLOption", "treerpo_rollout"]
