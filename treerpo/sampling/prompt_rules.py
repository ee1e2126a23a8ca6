"""The prompt rules, checked before any work by every sampler and job: each prompt representable by the tokenizer
and fitting the model's context beside the tree's longest completion."""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Sequence

from treerpo.tree import TreeSpec


class UnrepresentablePromptError(ValueError):
    pass


class PromptTooLongError(ValueError):
    pass


def check_prompt_lengths(
    prompts: Sequence[Sequence[int]], spec: TreeSpec, max_positions: int | None, truncate: bool = False
) -> list[list[int]]:
    """Refuse (or, with ``truncate``, keep the last ``max_prompt_tokens`` of) prompts that do not fit.

    A prompt fits when it has at most ``spec.max_prompt_tokens`` tokens and prompt plus the
    longest completion stays within the model's ``max_positions``.
    """
    limit = spec.max_prompt_tokens
    if max_positions is not None:
        limit = min(limit, max_positions - spec.max_new_tokens)
        if limit < 1:
            raise PromptTooLongError(
                f"the tree's longest completion ({spec.depth} x {spec.segment_tokens} tokens) leaves no room for a "
                f"prompt in the model's context of {max_positions} positions; lower depth or segment_tokens"
            )
    out = []
    for i, ids in enumerate(prompts):
        if len(ids) > limit:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens but at most {limit} fit (max_prompt_tokens="
                    f"{spec.max_prompt_tokens}, context {max_positions}, completion up to {spec.max_new_tokens}); "
                    "shorten it, raise max_prompt_tokens, or set truncate_prompts to keep its last tokens"
                )
            ids = ids[-limit:]
        out.append(list(ids))
    return out


def infos_for(prompts: Sequence, infos: Sequence[dict] | None) -> list[dict]:
    """One info dict per prompt (empty ones when none are given); refused before any sampling when the counts differ."""
    if infos is None:
        return [{} for _ in prompts]
    infos = list(infos)
    if len(infos) != len(prompts):
        raise ValueError(f"{len(infos)} infos for {len(prompts)} prompts; give one dict per prompt, or none")
    return infos


def lost_characters(tokenizer, text: str, ids: Sequence[int]) -> list[str]:
    """Characters of ``text`` that its tokens do not give back: mapped to the unknown token, or dropped."""
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    wanted = Counter(unicodedata.normalize("NFKC", text).replace(" ", "").replace("\n", ""))
    lost = wanted - Counter(unicodedata.normalize("NFKC", decoded))
    return sorted(lost)


def check_representable(tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]], where: str) -> None:
    """Refuse a prompt whose tokens lose some of its characters (the model would answer a different question)."""
    for i, (text, row) in enumerate(zip(texts, ids, strict=True)):
        lost = lost_characters(tokenizer, text, row)
        if lost or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in row):
            raise UnrepresentablePromptError(
                f"{where}: prompt {i} ({text[:60]!r}) has characters the model's tokenizer cannot represent "
                f"(dropped or unknown: {''.join(lost[:20]) or tokenizer.unk_token!r}); use a model whose tokenizer "
                "covers this data, or data in the model's alphabet"
            )


def max_positions_of(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_prompts(
    model, tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]], spec: TreeSpec, truncate: bool, where: str
) -> int:
    """Refuse what cannot be answered as asked; returns the longest prompt's token count after truncation."""
    check_representable(tokenizer, texts, ids, where)
    try:
        fitted = check_prompt_lengths(ids, spec, max_positions_of(model), truncate)
    except PromptTooLongError as err:
        raise PromptTooLongError(f"{where}: {err}") from None
    return max((len(p) for p in fitted), default=0)
