"""Attention of a forward that reads and writes the engine's paged KV pool (PyTorch reference backend).

The model sees the new tokens of many sequences packed in one row, without padding. Each
layer writes the new tokens' K/V into their pool slots, then every sequence attends to its
own slots (its cached ancestors' and its new tokens') with a causal rule inside the new
part. Sequences are gathered into a padded batch only inside the attention.

Cascade decode: when the sequences of a decode step (one new token each) come in groups
sharing a cached prefix (siblings of a tree), the metadata carries the groups
(``CascadeGroups``) and each sequence's ``kv_slots`` hold only what follows its group's
prefix. The prefix K/V is then gathered once per group and attended by all the group's
queries in one batched matmul; each sequence attends to its own suffix; the two partial
results are merged exactly by their log-sum-exps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from treerpo.attention.features import NONE, AttentionFeatures, attend


@dataclass
class CascadeGroups:
    """Decode sequences grouped by a shared cached prefix; sequence b is packed row b (one new token each).
    Sequence b attends to ``prefix_slots[g, :prefix_len[g]]`` (g = ``group_of_seq[b]``), then to its kv_slots."""

    prefix_slots: torch.Tensor  # long [G, P]: each group's prefix slots (padding: any slot)
    prefix_len: torch.Tensor  # long [G], >= 1
    group_of_seq: torch.Tensor  # long [B]
    member_rows: torch.Tensor  # long [G, M]: the sequences of each group, padded with sequence 0
    rank_in_group: torch.Tensor  # long [B]: sequence b is member_rows[group_of_seq[b], rank_in_group[b]]
    members: torch.Tensor  # long [B]: the sequences sorted by group (member_rows without its padding)
    member_start: torch.Tensor  # long [G + 1]: group g's sequences are members[member_start[g]:member_start[g + 1]]
    # for the PyTorch path: rows of a pool cache viewed as [slots * Hkv, D] in [G or B, Hkv, keys] order (a
    # gather lands in the layout of the matmuls, no copy per layer), and the padding keys to leave out
    prefix_rows: torch.Tensor  # long [G * Hkv * P]
    prefix_padding: torch.Tensor  # bool [G, 1, 1, P]
    suffix_rows: torch.Tensor  # long [B * Hkv * K]
    suffix_padding: torch.Tensor  # bool [B, 1, 1, K]: past sequence b's new token

    @classmethod
    def build(
        cls, prefixes: list, group_of_seq, kv_slots: np.ndarray, suffix_len: np.ndarray, kv_heads: int, device
    ) -> "CascadeGroups":
        """``kv_slots`` [B, K]: each sequence's slots after its group's prefix, ``suffix_len[b]`` of them."""
        arrays = cascade_host_arrays(prefixes, group_of_seq, kv_slots, suffix_len, kv_heads)
        return cls.from_staged({k: torch.from_numpy(np.ascontiguousarray(a)).to(device) for k, a in arrays.items()})

    @classmethod
    def from_staged(cls, t: dict) -> "CascadeGroups":
        """From ``cascade_arrays``' fields on the device (the paddings staged as integers, as ``HostStaging`` does)."""
        fields = {k: t[k] for k in cls.__dataclass_fields__}
        fields["prefix_padding"], fields["suffix_padding"] = t["prefix_padding"].bool(), t["suffix_padding"].bool()
        return cls(**fields)


def cascade_host_arrays(prefixes: list, group_of_seq, kv_slots, suffix_len, kv_heads: int) -> dict:
    """``cascade_arrays`` for prefixes given as slot lists, checked: every prefix non-empty, every group in range."""
    prefix_len = np.fromiter(map(len, prefixes), dtype=np.int64, count=len(prefixes))
    if not prefix_len.all():
        raise ValueError("every shared prefix needs at least one slot")
    group_of_seq = np.asarray(group_of_seq, dtype=np.int64)
    if len(np.bincount(group_of_seq, minlength=len(prefixes))) != len(prefixes) or (group_of_seq < 0).any():
        raise ValueError(f"group_of_seq must lie in [0, {len(prefixes)})")
    return cascade_arrays(padded_rows(prefixes, prefix_len), prefix_len, group_of_seq, kv_slots, suffix_len, kv_heads)


def cascade_arrays(prefix_slots, prefix_len, group_of_seq, suffix_slots, suffix_len, kv_heads) -> dict:
    """The fields of ``CascadeGroups`` as host arrays, for sequences grouped by a shared prefix (``prefix_slots``
    [G, >= max prefix_len], padding any slot) each followed by its own ``suffix_slots`` [B, K]."""
    width = int(prefix_len.max())
    prefix_slots = np.where(np.arange(width)[None, :] < prefix_len[:, None], prefix_slots[:, :width], 0)
    counts = np.bincount(group_of_seq, minlength=len(prefix_len))
    members = np.argsort(group_of_seq, kind="stable")
    rank = np.empty_like(members)
    rank[members] = np.arange(len(members)) - np.repeat(np.cumsum(counts) - counts, counts)
    member_rows = np.zeros((len(prefix_len), int(counts.max(initial=1))), dtype=np.int64)
    member_rows[group_of_seq, rank] = np.arange(len(members))
    return dict(
        prefix_slots=prefix_slots,
        prefix_len=prefix_len,
        group_of_seq=group_of_seq,
        member_rows=member_rows,
        rank_in_group=rank,
        members=members,
        member_start=np.concatenate(([0], np.cumsum(counts))),
        prefix_rows=_head_rows(prefix_slots, kv_heads),
        prefix_padding=_padding(prefix_len, width),
        suffix_rows=_head_rows(suffix_slots, kv_heads),
        suffix_padding=_padding(suffix_len, suffix_slots.shape[1]),
    )


def _head_rows(slots: np.ndarray, kv_heads: int) -> np.ndarray:
    """Slots [X, K] -> rows [X * Hkv * K] of a cache viewed as [slots * Hkv, D], in [X, Hkv, K] order."""
    return (slots[:, None, :] * kv_heads + np.arange(kv_heads)[None, :, None]).reshape(-1)


def _padding(lengths: np.ndarray, width: int) -> np.ndarray:
    """bool [X, 1, 1, width]: key j of row x is past ``lengths[x]``."""
    return (np.arange(width) >= lengths[:, None])[:, None, None]


@dataclass
class PagedAttentionMetadata:
    pool: "KVPool"  # noqa: F821  (treerpo.engine.kv_pool)
    write_slots: torch.Tensor  # long [N]: pool slot of each new token
    query_rows: torch.Tensor  # long [B, Q]: packed row of each sequence's i-th new token, -1 = padding
    kv_slots: torch.Tensor  # long [B, K]: slots each sequence attends to, in path order (padding: any slot)
    #   (with groups: the slots after the group's prefix)
    query_key_pos: torch.Tensor  # long [B, Q]: index in kv_slots of each new token (key j visible iff j <= it)
    backend: str = "torch"
    groups: CascadeGroups | None = None  # decode only: shared prefixes read once per group
    max_positions: int | None = None  # the longest path in the forward, for the sliding-window check
    # long [N]: the flat index into [B, Q] of packed row 0, 1, ... (where query_rows says each row is), so that a
    # prefill scatters its [B, Q] results back to the packed rows with no boolean mask (a host sync every layer)
    packed_order: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)  # tensors derived once per forward and used by every layer

    def per_forward(self, key, make):
        """``make()``, computed at the first layer that asks and kept for the rest of the forward."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @classmethod
    def build(
        cls, pool, sequences: list[tuple], device, prefixes: list | None = None, group_of_seq=None
    ) -> "PagedAttentionMetadata":
        """``sequences``: per sequence (slots of its cached path, slots of its new tokens), in packed order. With
        ``prefixes`` (decode only), sequence b's cached path is ``prefixes[group_of_seq[b]]`` followed by its own
        cached slots."""
        arrays = cls.host_arrays(sequences, pool.num_kv_heads, prefixes, group_of_seq)
        t = {k: torch.from_numpy(np.ascontiguousarray(a)).to(device) for k, a in arrays.items()}
        return cls.from_staged(pool, t, prefixes is not None)

    @staticmethod
    def host_arrays(sequences: list[tuple], kv_heads: int, prefixes: list | None = None, group_of_seq=None) -> dict:
        """``build``'s fields as host arrays (the cascade's too, with ``prefixes``), to reach the device in one copy."""
        olds = [np.asarray(old, dtype=np.int64) for old, _ in sequences]
        news = [np.asarray(new, dtype=np.int64) for _, new in sequences]
        old_len = np.fromiter(map(len, olds), dtype=np.int64, count=len(olds))
        new_len = np.fromiter(map(len, news), dtype=np.int64, count=len(news))
        kv_slots = padded_rows([a for pair in zip(olds, news, strict=True) for a in pair], old_len + new_len, pieces=2)
        q = np.arange(int(new_len.max()))[None, :]
        pad = q >= new_len[:, None]
        query_rows = np.where(pad, -1, (np.cumsum(new_len) - new_len)[:, None] + q)
        arrays = {
            "write_slots": np.concatenate(news),
            "query_rows": query_rows,
            "kv_slots": kv_slots,
            "query_key_pos": np.where(pad, -1, old_len[:, None] + q),
            "packed_order": packed_order(query_rows),
        }
        if prefixes is not None:
            if (new_len != 1).any() or len(group_of_seq) != len(sequences):
                raise ValueError("shared-prefix groups are for decode steps: one new token and one group per sequence")
            arrays.update(cascade_host_arrays(prefixes, group_of_seq, kv_slots, old_len + 1, kv_heads))
        return arrays

    @classmethod
    def from_staged(cls, pool, t: dict, cascade: bool) -> "PagedAttentionMetadata":
        """From ``host_arrays``' fields on the device."""
        return cls(
            pool,
            t["write_slots"],
            t["query_rows"],
            t["kv_slots"],
            t["query_key_pos"],
            groups=CascadeGroups.from_staged(t) if cascade else None,
            packed_order=t["packed_order"],
        )


def packed_order(query_rows: np.ndarray) -> np.ndarray:
    """The flat index into ``query_rows`` [B, Q] of packed row 0, 1, ... (entries at -1 are padding)."""
    flat = query_rows.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    return valid[np.argsort(flat[valid], kind="stable")]


def padded_rows(arrays: list, lengths: np.ndarray, pieces: int = 1) -> np.ndarray:
    """int64 [R, max(lengths)] table whose row r is the concatenation of ``arrays[r * pieces:(r + 1) * pieces]``
    (``lengths[r]`` slots), padded with slot 0."""
    table = np.zeros((len(lengths), int(lengths.max(initial=0))), dtype=np.int64)
    total = int(lengths.sum())
    if total:
        rows = np.repeat(np.arange(len(lengths)), lengths)
        cols = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        table[rows, cols] = np.concatenate(arrays)
    return table


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [slots, H, D] at slots [B, K] -> [B, H, K, D] (index_select: several times faster than indexing)."""
    b, k = slots.shape
    return cache.index_select(0, slots.reshape(-1)).view(b, k, *cache.shape[1:]).permute(0, 2, 1, 3)


def paged_attention_torch(
    module, query, key, value, meta: PagedAttentionMetadata, scale: float | None, features: AttentionFeatures = NONE
):
    """query [1, Hq, N, D]; key/value [1, Hkv, N, D] of the new tokens -> [1, N, Hq, D]. ``features``: a window
    (key j of a sequence's path is at position j), soft-capping and sinks (``features.attend``); the engine does not
    group sequences (the cascade) for a model that has them."""
    layer = module.layer_idx
    meta.pool.write(layer, meta.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    if meta.groups is not None:
        if features is not NONE:
            raise ValueError("the cascade decode does not implement windows, soft-capping or sinks")
        return _cascade_decode_torch(query, meta, layer, scale)
    keys = _gather(meta.pool.k[layer], meta.kv_slots)  # [B, Hkv, K, D]
    values = _gather(meta.pool.v[layer], meta.kv_slots)
    hq, d = query.shape[1], query.shape[3]
    one_token_each = meta.query_rows.shape[1] == 1  # decode: sequence b is packed row b, nothing to gather
    if one_token_each:
        q = query[0].transpose(0, 1)[:, :, None]
    else:
        rows = meta.per_forward("query_rows_clamped", lambda: meta.query_rows.clamp(min=0))
        q = query[0].transpose(0, 1)[rows].permute(0, 2, 1, 3)
    visible = meta.per_forward(("visible", features.window), lambda: _visible(meta, keys.shape[2], features.window))
    if features.changes_scores:
        out = attend(q, keys, values, visible, scale, features)
    else:
        gqa = hq != keys.shape[1]
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible, scale=scale, enable_gqa=gqa
        )  # [B, Hq, Q, D]
    if one_token_each:
        return out[:, :, 0][None]
    out = out.transpose(1, 2).reshape(-1, hq, d)  # [B * Q, Hq, D]
    order = meta.packed_order if meta.packed_order is not None else _packed_order_on_device(meta.query_rows)
    return out.index_select(0, order)[None]


def _visible(meta: PagedAttentionMetadata, keys: int, window: int | None) -> torch.Tensor:
    """bool [B, 1, Q, K]: key j is visible to a sequence's i-th new token iff j <= its position (and within the
    window)."""
    key_index = torch.arange(keys, device=meta.query_key_pos.device)
    query_pos = meta.query_key_pos.clamp(min=0)[:, :, None]
    visible = key_index[None, None, :] <= query_pos  # [B, Q, K]
    if window:
        visible &= key_index[None, None, :] > query_pos - window
    return visible[:, None]


def _packed_order_on_device(query_rows: torch.Tensor) -> torch.Tensor:
    """``packed_order`` for metadata built without it (a host sync)."""
    return torch.from_numpy(packed_order(query_rows.cpu().numpy())).to(query_rows.device)


def _gather_rows(pool, layer: int, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``layer`` at ``_head_rows`` rows -> two contiguous [n, Hkv, K, D]."""
    shape = (n, pool.num_kv_heads, -1, pool.head_dim)
    return tuple(cache[layer].view(-1, pool.head_dim).index_select(0, rows).view(shape) for cache in (pool.k, pool.v))


def _attend(q, keys, values, padding, scale: float):
    """Softmax attention with its log-sum-exp, in fp32: q [X, H, R, D], keys/values [X, H, K, D], padding bool
    [X, 1, 1, K] (keys left out) -> (out [X, H, R, D], natural LSE [X, H, R]). Every row needs a key."""
    scores = torch.matmul(q.float() * scale, keys.float().transpose(-1, -2))
    scores = scores.masked_fill_(padding, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = scores.sub_(top).exp_()  # one exponential pass serves the softmax and the log-sum-exp
    total = weights.sum(-1, keepdim=True)
    out = torch.matmul(weights, values.float()).div_(total)
    return out, (top + total.log()).squeeze(-1)


def _cascade_decode_torch(query, meta: PagedAttentionMetadata, layer: int, scale: float | None):
    """Decode with shared prefixes: query [1, Hq, B, D] (sequence b at row b) -> [1, B, Hq, D]."""
    groups, pool = meta.groups, meta.pool
    _, hq, b, d = query.shape
    hkv = pool.num_kv_heads
    rep = hq // hkv  # query heads per KV head (query head h reads KV head h // rep)
    scale = d**-0.5 if scale is None else scale
    q = query[0].transpose(0, 1).reshape(b, hkv, rep, d)
    n_groups, width = groups.member_rows.shape
    # prefix: K/V gathered once per group; the group's (member, query head) pairs of a KV head are the rows
    group_q = q[groups.member_rows].transpose(1, 2).reshape(n_groups, hkv, width * rep, d)
    out, lse = _attend(group_q, *_gather_rows(pool, layer, groups.prefix_rows, n_groups), groups.prefix_padding, scale)
    prefix_out = out.view(n_groups, hkv, width, rep, d)[groups.group_of_seq, :, groups.rank_in_group]
    prefix_lse = lse.view(n_groups, hkv, width, rep)[groups.group_of_seq, :, groups.rank_in_group]
    # suffix: each sequence's own slots after the prefix (its new token included)
    out, lse = _attend(q, *_gather_rows(pool, layer, groups.suffix_rows, b), groups.suffix_padding, scale)
    # exact merge: the prefix partial's share of the total softmax mass is sigmoid(lse_prefix - lse_suffix)
    weight = torch.sigmoid(prefix_lse - lse).unsqueeze(-1)
    return torch.lerp(out, prefix_out, weight).reshape(b, hq, d).to(query.dtype)[None]
