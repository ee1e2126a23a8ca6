"""Per-token log-probs of a packed tree batch: one tree-masked forward, rows gathered by ``prev_index``.

The LM head (``lm_head.LMHead``) and log-softmax run in fp32 over chunks of rows, recomputed in the backward,
so the [tokens, vocab] logits never exist for the whole batch at once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from treerpo.attention import default_tree_backend, tree_attention
from treerpo.attention.context import metadata_kwargs, prepared_mask
from treerpo.policy.lm_head import LMHead
from treerpo.trees.packing import PackedBatch


def decoder_of(model):
    """The transformer body (without the LM head) of a Hugging Face causal LM."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return body if body is not None else model.get_decoder()


def packed_logprobs(
    model,
    batch: PackedBatch,
    rows: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    backend: str | None = None,
) -> torch.Tensor:
    """Log-prob of each token in ``rows`` (default: the loss tokens) under ``model``; shape [len(rows)].

    The model must use the ``tree`` attention (``enable_tree_attention``).
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    if rows is None:
        rows = torch.nonzero(batch.loss_mask).squeeze(1)
    if (batch.prev_index[rows] < 0).any():
        raise ValueError("a requested row has no predecessor (the first prompt token of a tree has no log-prob)")
    body = decoder_of(model)
    longest = int(batch.position_ids.max()) + 1 if len(batch.position_ids) else 0
    with tree_attention(batch.tin, batch.tout, backend or default_tree_backend(device), longest):
        hidden = body(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            attention_mask=prepared_mask(device),
            use_cache=False,
            **metadata_kwargs(body),
        ).last_hidden_state[0]
    head = LMHead(model)
    states = hidden[batch.prev_index[rows]]
    targets = batch.input_ids[rows]
    out = []
    for start in range(0, len(rows), chunk_size):
        args = (states[start : start + chunk_size], targets[start : start + chunk_size], temperature)
        if torch.is_grad_enabled():  # the chunk's logits are recomputed in the backward, never all kept
            out.append(checkpoint(head.token_logprobs, *args, use_reentrant=False))
        else:
            out.append(head.token_logprobs(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
