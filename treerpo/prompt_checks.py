"""Prompts checked before any work: each one representable by the tokenizer and fitting the model's context."""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Sequence

from .reference_sampler import PromptTooLongError, check_prompt_lengths
from .tree import TreeSpec


class UnrepresentablePromptError(ValueError):
    pass


def lost_characters(tokenizer, text: str, ids: Sequence[int]) -> list[str]:
    """Characters of ``text`` that its tokens do not give back: mapped to the unknown token, or dropped."""
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    wanted = Counter(unicodedata.normalize("NFKC", text).replace(" ", "").replace("\n", ""))
    lost = wanted - Counter(unicodedata.normalize("NFKC", decoded))
    return sorted(lost)


def check_representable(tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]], where: str) -> None:
    """Refuse a prompt whose tokens lose some of its characters (the model would answer a different question)."""
    for i, (text, row) in enumerate(zip(texts, ids)):
        lost = lost_characters(tokenizer, text, row)
        if lost or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in row):
            raise UnrepresentablePromptError(
                f"{where}: prompt {i} ({text[:60]!r}) has characters the model's tokenizer cannot represent "
                f"(dropped or unknown: {''.join(lost[:20]) or tokenizer.unk_token!r}); use a model whose tokenizer "
                "covers this data, or data in the model's alphabet")


def max_positions_of(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_prompts(model, tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]], spec: TreeSpec,
                  truncate: bool, where: str) -> int:
    """Refuse what cannot be answered as asked; returns the longest prompt's token count after truncation."""
    check_representable(tokenizer, texts, ids, where)
    try:
        fitted = check_prompt_lengths(ids, spec, max_positions_of(model), truncate)
    except PromptTooLongError as err:
        raise PromptTooLongError(f"{where}: {err}") from None
    return max((len(p) for p in fitted), default=0)
