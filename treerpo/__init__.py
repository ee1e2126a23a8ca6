"""treerpo: tree-sampling reinforcement learning (TreeRPO) for language models.

The names another RL codebase needs to put tree rollouts into its own loop::

    spec = TreeSpec(branching=(4, 2, 2), segment_tokens=12)
    trees = TreeSampler(model, tokenizer).sample(prompt_ids, spec, infos)  # or ReferenceTreeSampler
    score_trees(trees, tokenizer, reward_fn)            # leaf rewards
    compute_advantages(trees)                           # node values, sibling-group advantages
    batch = pack_trees(trees)                           # one depth-first packed sequence
    logp = packed_logprobs(enable_tree_attention(model), batch)
    loss, stats = policy_loss(logp, old_logp, batch.advantages[batch.loss_mask], ...)

or, for a trainer that works on (prompt, completion) rows, the trees as rows with tree credit per token::

    flat = flatten_trees(trees)   # rows -> (tree, leaf); token_advantages, token_weights, loss_tokens

TRL users: ``treerpo_rollout()`` (GRPOTrainer's rollout_func) and ``TreeRPOTrainer`` / ``TreeRPOConfig``.
See docs/embedding.md.
"""

import importlib

# name -> module; imported on first use, so that light entry points (the math-verify worker processes,
# `python -m treerpo.train --help`) do not pay for torch and transformers
_EXPORTS = {
    "compute_advantages": ".algorithms.advantages",
    "node_values": ".algorithms.advantages",
    "grpo_spec": ".algorithms.grpo",
    "policy_loss": ".algorithms.loss",
    "enable_tree_attention": ".attention",
    "FlatCompletions": ".trees.flatten",
    "flatten_trees": ".trees.flatten",
    "TreeRPOConfig": ".integrations.trl",
    "TreeRPOTrainer": ".integrations.trl",
    "treerpo_rollout": ".integrations.trl",
    "UnsupportedTRLOption": ".integrations.trl",
    "tree_attention": ".attention",
    "TreeSampler": ".engine",
    "packed_logprobs": ".policy.logprobs",
    "load_model_and_tokenizer": ".models.tiny",
    "PackedBatch": ".trees.packing",
    "pack_trees": ".trees.packing",
    "PromptTooLongError": ".sampling.prompt_rules",
    "ReferenceTreeSampler": ".sampling.reference_sampler",
    "score_trees": ".rewards.scoring",
    "Tree": ".tree",
    "TreeSpec": ".tree",
}

__version__ = "0.1.0"
_TRL_EXTRA = {"trl", "accelerate", "datasets"}  # what `pip install treerpo[trl]` brings

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        try:
            return importlib.import_module(f".{name}", __name__)  # treerpo.trees etc. without importing them
        except ModuleNotFoundError:
            raise AttributeError(f"module 'treerpo' has no attribute {name!r}") from None
    try:
        module = importlib.import_module(_EXPORTS[name], __name__)
    except ModuleNotFoundError as err:
        if _EXPORTS[name] == ".integrations.trl" and err.name and err.name.split(".")[0] in _TRL_EXTRA:
            raise ImportError(
                f"treerpo.{name} needs TRL, which is not installed (no module {err.name!r}): pip install treerpo[trl]"
            ) from err
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
