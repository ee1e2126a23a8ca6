"""treerpo: tree-sampling reinforcement learning (TreeRPO) for language models.

The names another RL codebase needs to put tree rollouts into its own loop::

    spec = TreeSpec(branching=(4, 2, 2), segment_tokens=12)
    trees = TreeSampler(model, tokenizer).sample(prompt_ids, spec, infos)  # or ReferenceTreeSampler
    score_trees(trees, tokenizer, reward_fn)            # leaf rewards
    compute_advantages(trees)                           # node values, sibling-group advantages
    batch = pack_trees(trees)                           # one depth-first packed sequence
    logp = packed_logprobs(enable_tree_attention(model), batch)
    loss, stats = policy_loss(logp, old_logp, batch.advantages[batch.loss_mask], ...)
"""
from .algorithms.advantages import compute_advantages, node_values
from .algorithms.grpo import grpo_spec
from .algorithms.loss import policy_loss
from .attention import enable_tree_attention, tree_attention
from .engine import TreeSampler
from .logprobs import packed_logprobs
from .models.tiny import load_model_and_tokenizer
from .packing import PackedBatch, pack_trees
from .reference_sampler import PromptTooLongError, ReferenceTreeSampler
from .scoring import score_trees
from .tree import Tree, TreeSpec

__version__ = "0.1.0"

__all__ = ["PackedBatch", "PromptTooLongError", "ReferenceTreeSampler", "Tree", "TreeSampler", "TreeSpec", "compute_advantages",
           "enable_tree_attention", "grpo_spec", "load_model_and_tokenizer", "node_values", "pack_trees",
           "packed_logprobs", "policy_loss", "score_trees", "tree_attention"]
