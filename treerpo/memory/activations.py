"""Bytes the packed training forward keeps for its backward, and the backward's working set, for a Llama/Qwen-style
decoder (RMSNorm, rotary attention, gated MLP) as Hugging Face's modules save them.

Per decoder layer and token (``b`` the compute dtype's bytes, ``h`` hidden, ``i`` intermediate, ``q``/``k`` the
query and key widths heads x head_dim):
- each RMSNorm keeps its fp32 input, the normalised input and its output: ``4h + 2bh``;
- attention keeps what its backend saves (below) and the o_proj input, ``bq``;
- the gated MLP keeps gate, up, activation and product: ``4bi``.
Backends: ``triton`` (flash style) keeps q, k, v, its output and the log-sum-exp; ``paths`` keeps each chunk's
gathered queries and ancestor keys/values, its mask, output and log-sum-exp; ``sdpa`` and ``flex`` keep q, k, v,
the output and, for ``sdpa``, each tree's dense mask in the compute dtype.
Activation checkpointing keeps only each layer's input and recomputes one layer at a time in the backward.
"""

from __future__ import annotations

from treerpo.memory.model_shape import ModelShape
from treerpo.memory.workload import PackedShape

FP32 = 4
HEAD_CHUNK_ROWS = 2048  # policy.logprobs: the LM head runs on chunks of rows, recomputed in the backward


def norm_bytes(shape: ModelShape, b: int) -> int:
    return (4 + 2 * b) * shape.hidden + FP32


def attention_bytes(shape: ModelShape, packed: PackedShape, b: int, backend: str) -> int:
    """What the attention op keeps for one layer of the whole micro-batch (its inputs included)."""
    n, q, k = packed.tokens, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if backend == "paths":
        rows = packed.path_chunks * packed.chunk
        keys = packed.path_chunks * packed.longest_path
        mask = rows * packed.longest_path
        return b * (2 * rows * q + 2 * keys * k) + FP32 * rows * shape.heads + mask
    qkv_out = n * (b * (2 * q + 2 * k) + FP32 * shape.heads)
    if backend == "sdpa":  # each tree's dense mask, kept by every layer in the compute dtype
        return qkv_out + b * sum(t * t for t in packed.tree_tokens)
    return qkv_out


def layer_bytes(shape: ModelShape, packed: PackedShape, b: int, backend: str) -> int:
    per_token = 2 * norm_bytes(shape, b) + b * shape.heads * shape.head_dim + 4 * b * shape.intermediate
    return packed.tokens * per_token + attention_bytes(shape, packed, b, backend)


def head_bytes(shape: ModelShape, packed: PackedShape, b: int) -> tuple[int, int]:
    """(kept: the final norm and the gathered rows; working set: four [rows, vocab] fp32 arrays of one chunk (logits,
    log-sum-exp's shifted copy and exponentials, the logits' gradient), recomputed in the backward, and for a
    half-precision head its weight's fp32 copy)."""
    kept = packed.tokens * norm_bytes(shape, b) + packed.loss_rows * b * shape.hidden
    rows = min(HEAD_CHUNK_ROWS, packed.loss_rows)
    upcast = 0 if b == FP32 else FP32 * shape.vocab * shape.hidden
    return kept, 4 * rows * shape.vocab * FP32 + upcast


def forward_backward_peak(
    shape: ModelShape,
    packed: PackedShape,
    b: int,
    backend: str,
    checkpointing: bool,
    root_grad_bytes: int,
    layer_grad_bytes: int,
) -> int:
    """Activation and gradient bytes at the backward's peak. The backward frees a layer's activations as it makes
    the layer's gradients (``layer_grad_bytes``: what each layer leaves behind; the root's, the LM head and
    embeddings, come first, once the LM head's chunk is freed), so the peak is at one end: at its start (everything
    kept, the LM head's chunk) or at
    its end (every gradient; tied embeddings then add their second gradient and its sum with the first). Either end
    adds the working set of one layer (its input gradients, and under checkpointing its recomputed activations)."""
    layer = layer_bytes(shape, packed, b, backend)
    kept_head, head_work = head_bytes(shape, packed, b)
    kept_layer = packed.tokens * b * shape.hidden if checkpointing else layer
    work = (layer if checkpointing else 0) + packed.tokens * b * (shape.hidden + shape.intermediate)
    embedding_grad = b * shape.vocab * shape.hidden
    start = shape.layers * kept_layer + kept_head + max(head_work, work + root_grad_bytes)
    end = kept_layer + kept_head + work + root_grad_bytes + shape.layers * layer_grad_bytes
    if shape.tied_embeddings:
        end += 2 * embedding_grad
    else:
        start -= embedding_grad  # the input embedding's gradient comes last
    return max(start, end)
