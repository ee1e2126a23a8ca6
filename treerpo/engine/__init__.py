"""Generation engine: paged KV pool, radix prefix cache, model runner, sampler and the TreeSampler."""
from .kv_pool import KVPool, PoolExhausted, RequestTooLarge
from .model_runner import ModelRunner, SequenceStep, SharedPrefixes
from .radix_cache import RadixCache, TreeNode
from .sampling import SamplingParams, sample_next
from .tree_sampler import TreeSampler

__all__ = ["KVPool", "ModelRunner", "PoolExhausted", "RadixCache", "RequestTooLarge", "SamplingParams",
           "SequenceStep", "SharedPrefixes", "TreeNode", "TreeSampler", "sample_next"]
