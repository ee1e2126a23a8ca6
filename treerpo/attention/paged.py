"""Attention of a forward that reads and writes the engine's paged KV pool (PyTorch reference backend).

The model sees the new tokens of many sequences packed in one row, without padding. Each
layer writes the new tokens' K/V into their pool slots, then every sequence attends to its
own slots (its cached ancestors' and its new tokens') with a causal rule inside the new
part. Sequences are gathered into a padded batch only inside the attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PagedAttentionMetadata:
    pool: "KVPool"  # noqa: F821  (treerpo.engine.kv_pool)
    write_slots: torch.Tensor  # long [N]: pool slot of each new token
    query_rows: torch.Tensor  # long [B, Q]: packed row of each sequence's i-th new token, -1 = padding
    kv_slots: torch.Tensor  # long [B, K]: pool slots each sequence attends to, in path order (padding: any slot)
    query_key_pos: torch.Tensor  # long [B, Q]: index in kv_slots of each new token (key j visible iff j <= it)
    backend: str = "torch"

    @classmethod
    def build(cls, pool, sequences: list[tuple], device) -> "PagedAttentionMetadata":
        """``sequences``: per sequence (slots of its cached path, slots of its new tokens), in packed order."""
        olds = [np.asarray(old, dtype=np.int64) for old, _ in sequences]
        news = [np.asarray(new, dtype=np.int64) for _, new in sequences]
        old_len = np.array([len(o) for o in olds], dtype=np.int64)
        new_len = np.array([len(n) for n in news], dtype=np.int64)
        kv_slots = np.zeros((len(sequences), int((old_len + new_len).max())), dtype=np.int64)
        for i, (old, new) in enumerate(zip(olds, news)):
            kv_slots[i, :len(old)] = old
            kv_slots[i, len(old):len(old) + len(new)] = new
        q = np.arange(int(new_len.max()))[None, :]
        pad = q >= new_len[:, None]
        query_rows = np.where(pad, -1, (np.cumsum(new_len) - new_len)[:, None] + q)
        query_key_pos = np.where(pad, -1, old_len[:, None] + q)
        as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return cls(pool, as_tensor(np.concatenate(news)), as_tensor(query_rows), as_tensor(kv_slots),
                   as_tensor(query_key_pos))


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [slots, H, D] at slots [B, K] -> [B, H, K, D] (index_select: several times faster than indexing)."""
    b, k = slots.shape
    return cache.index_select(0, slots.reshape(-1)).view(b, k, *cache.shape[1:]).permute(0, 2, 1, 3)


def paged_attention_torch(module, query, key, value, meta: PagedAttentionMetadata, scale: float | None):
    """query [1, Hq, N, D]; key/value [1, Hkv, N, D] of the new tokens -> [1, N, Hq, D]."""
    layer = module.layer_idx
    meta.pool.write(layer, meta.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    keys = _gather(meta.pool.k[layer], meta.kv_slots)  # [B, Hkv, K, D]
    values = _gather(meta.pool.v[layer], meta.kv_slots)
    hq, d = query.shape[1], query.shape[3]
    rows = meta.query_rows.clamp(min=0)
    q = query[0].transpose(0, 1)[rows].permute(0, 2, 1, 3)  # [B, Hq, Q, D]
    key_index = torch.arange(keys.shape[2], device=query.device)
    visible = key_index[None, None, :] <= meta.query_key_pos.clamp(min=0)[:, :, None]  # [B, Q, K]
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None],
                                         scale=scale, enable_gqa=hq != keys.shape[1])  # [B, Hq, Q, D]
    out = out.permute(0, 2, 1, 3)  # [B, Q, Hq, D]
    valid = meta.query_rows >= 0
    packed = query.new_empty((query.shape[2], hq, d))
    packed[meta.query_rows[valid]] = out[valid]
    return packed[None]


_PAGED_BACKENDS = {"torch": paged_attention_torch}


def register_paged_backend(name: str, fn) -> None:
    """Add a decode/prefill backend over the KV pool (e.g. a Triton paged kernel), selected by ``backend``."""
    _PAGED_BACKENDS[name] = fn


def get_paged_backend(name: str):
    try:
        return _PAGED_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown paged attention backend {name!r}; available: {sorted(_PAGED_BACKENDS)}") from None
