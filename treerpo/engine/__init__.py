"""Generation engine: paged KV pool, radix prefix cache, model runner, sampler and the TreeSampler."""

from treerpo.engine.kv_pool import KVPool, PoolExhausted, RequestTooLarge
from treerpo.engine.model_runner import ModelRunner
from treerpo.engine.radix_cache import RadixCache, TreeNode
from treerpo.engine.sampling import SamplingParams
from treerpo.engine.tree_sampler import TreeSampler

__all__ = [
    "KVPool",
    "ModelRunner",
    "PoolExhausted",
    "RadixCache",
    "RequestTooLarge",
    "SamplingParams",
    "TreeNode",
    "TreeSampler",
]
