"""Generation engine: paged KV pool, radix prefix cache (and, beside them, the model runner and samplers)."""
from .kv_pool import KVPool, PoolExhausted, RequestTooLarge
from .radix_cache import RadixCache, TreeNode

__all__ = ["KVPool", "PoolExhausted", "RadixCache", "RequestTooLarge", "TreeNode"]
