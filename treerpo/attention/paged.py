"""Attention of a forward that reads and writes the engine's paged KV pool (PyTorch reference backend).

The model sees the new tokens of many sequences packed in one row, without padding. Each
layer writes the new tokens' K/V into their pool slots, then every sequence attends to its
own slots (its cached ancestors' and its new tokens') with a causal rule inside the new
part. Sequences are gathered into a padded batch only inside the attention.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    def build(cls, pool, sequences: list[tuple[torch.Tensor, torch.Tensor]], device) -> "PagedAttentionMetadata":
        """``sequences``: per sequence (slots of its cached path, slots of its new tokens), in packed order."""
        lengths = [len(new) for _, new in sequences]
        totals = [len(old) + len(new) for old, new in sequences]
        b, q, k = len(sequences), max(lengths), max(totals)
        query_rows = torch.full((b, q), -1, dtype=torch.long)
        query_key_pos = torch.full((b, q), -1, dtype=torch.long)
        kv_slots = torch.zeros((b, k), dtype=torch.long)
        row = 0
        for i, (old, new) in enumerate(sequences):
            n = len(new)
            query_rows[i, :n] = torch.arange(row, row + n)
            query_key_pos[i, :n] = torch.arange(len(old), len(old) + n)
            kv_slots[i, :totals[i]] = torch.cat([old, new])
            row += n
        write = torch.cat([new for _, new in sequences]) if sequences else torch.zeros(0, dtype=torch.long)
        return cls(pool, write.to(device), query_rows.to(device), kv_slots.to(device), query_key_pos.to(device))


def paged_attention_torch(module, query, key, value, meta: PagedAttentionMetadata, scale: float | None):
    """query [1, Hq, N, D]; key/value [1, Hkv, N, D] of the new tokens -> [1, N, Hq, D]."""
    layer = module.layer_idx
    meta.pool.write(layer, meta.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    keys = meta.pool.k[layer][meta.kv_slots].permute(0, 2, 1, 3)  # [B, Hkv, K, D]
    values = meta.pool.v[layer][meta.kv_slots].permute(0, 2, 1, 3)
    hq, d = query.shape[1], query.shape[3]
    rows = meta.query_rows.clamp(min=0)
    q = query[0].transpose(0, 1)[rows].permute(0, 2, 1, 3)  # [B, Hq, Q, D]
    key_index = torch.arange(keys.shape[2], device=query.device)
    visible = key_index[None, None, :] <= meta.query_key_pos.clamp(min=0)[:, :, None]  # [B, Q, K]
    groups = hq // keys.shape[1]
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None],
                                         scale=scale)  # [B, Hq, Q, D]
    out = out.permute(0, 2, 1, 3)  # [B, Q, Hq, D]
    valid = meta.query_rows >= 0
    packed = query.new_empty((query.shape[2], hq, d))
    packed[meta.query_rows[valid]] = out[valid]
    return packed[None]
