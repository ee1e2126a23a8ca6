"""Every exact decoder family in bf16, on CUDA when there is one (the Triton tree backend, the engine's paged
Triton decode) and on the CPU otherwise (the paths backend, the PyTorch paged attention).

bf16 is not bit-exact against anything, so the reference is the same weights in fp32 through a plain per-path
forward, and the bound is bf16's: a packed log-prob may differ from it by what bf16 rounding of the weights and
activations gives a plain bf16 forward of the same path (measured here per family), times a small margin. The
engine's sampled-token log-probs are checked the same way against a plain bf16 forward of the sampled path.
"""

import numpy as np
import pytest
import torch
from test_architecture_matrix import FAMILIES, IdTokenizer, trees_for, twins

from treerpo.attention import enable_tree_attention
from treerpo.engine import TreeSampler
from treerpo.policy.logprobs import packed_logprobs
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "sdpa"] if DEVICE == "cuda" else ["paths", "sdpa"]
EXACT = sorted(FAMILIES)
MARGIN = 4.0  # x the plain bf16 forward's own error against fp32 (about 1.5e-3 here), plus an absolute floor
FLOOR = 4e-3  # well under what a wrong context changes (0.1 to 0.3 here)


def path_logprobs(model, ids) -> torch.Tensor:
    """fp32 log-probs of tokens 1.. of the path ``ids`` under a plain forward of ``model`` (on its device)."""
    ids = torch.as_tensor(np.asarray(ids), device=next(model.parameters()).device)
    logits = model(input_ids=ids[None]).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1).cpu()


def per_path(model, trees, batch, rows) -> torch.Tensor:
    out = []
    for r in rows.tolist():
        ids = trees[int(batch.tree_index[r])].path_token_ids(int(batch.node_index[r]))
        out.append(path_logprobs(model, ids)[int(batch.position_ids[r]) - 1])
    return torch.stack(out)


@pytest.mark.parametrize("family", EXACT)
def test_packed_logprobs_in_bf16(family):
    plain, tree_model = twins(family)
    plain_bf16 = twins(family)[0].to(DEVICE, torch.bfloat16)
    tree_model = enable_tree_attention(tree_model.to(DEVICE, torch.bfloat16))
    trees = trees_for(np.random.default_rng(0))
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.loss_mask).squeeze(1)
    with torch.no_grad():
        ref = per_path(plain, trees, batch, rows)
        own_error = (per_path(plain_bf16, trees, batch, rows) - ref).abs().max()
        for backend in BACKENDS:
            got = packed_logprobs(tree_model, batch, rows.to(DEVICE), backend=backend).float().cpu()
            err = (got - ref).abs().max()
            assert err <= MARGIN * own_error + FLOOR, f"{family} {backend}: {err:.3g} vs bf16's own {own_error:.3g}"


@pytest.mark.parametrize("family", EXACT)
def test_engine_sampled_logprobs_in_bf16(family):
    plain, tree_model = twins(family)
    plain = plain.to(DEVICE, torch.bfloat16)
    tree_model = enable_tree_attention(tree_model.to(DEVICE, torch.bfloat16))
    sampler = TreeSampler(tree_model, IdTokenizer(), pool_tokens=1024, ignore_eos=True)
    assert sampler.pool.dtype == torch.bfloat16
    trees = sampler.sample(
        [[5, 9, 14, 3], [7, 7, 20]], TreeSpec((2, 2), segment_tokens=4, temperature=1.0), seeds=[0, 1]
    )
    with torch.no_grad():
        for tree in trees:
            for leaf in tree.leaves():
                ids = tree.path_token_ids(int(leaf))
                expected = path_logprobs(plain, ids)
                nodes = tree.path(int(leaf))[1:]
                got = np.concatenate([tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]] for n in nodes])
                err = (torch.as_tensor(got, dtype=torch.float32) - expected[len(tree.prompt_ids) - 1 :]).abs().max()
                assert err <= 2e-2, f"{family}: sampled log-prob off by {err:.3g} from a plain bf16 forward"
