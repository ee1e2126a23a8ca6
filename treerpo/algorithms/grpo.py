"""GRPO as a depth-1 tree: G whole answers per prompt form one sibling group.

It runs through exactly the same sampler, advantage and loss code as TreeRPO; only the
tree shape differs, which is what makes the comparison between the two fair.
"""

from __future__ import annotations

from treerpo.tree import TreeSpec


def grpo_spec(
    group_size: int, max_new_tokens: int, max_prompt_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0
) -> TreeSpec:
    return TreeSpec(
        branching=(group_size,),
        segment_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        top_p=top_p,
    )
