"""The Triton kernels at the shapes production launches, against an fp32 reference, on a GPU.

The first part of ``benchmarks/gpu_check.sh``: tree attention forward and backward in bf16 and fp16 at the
attention shapes of Qwen2.5-1.5B (12 query / 2 KV heads, dim 128), Qwen2.5-7B (28/4, 128) and Llama-3.2-1B
(32/8, 64) on a 4,096-token batch of trees (the production tile configurations, so Hopper's wgmma path and
the grouped-query packing run), then paged and cascade decode at 64 branches of up to 2,048 keys. Each
output and gradient is judged by its norm-relative error against the same inputs in fp32 (bf16 2e-2, fp16
5e-3: a few roundings of the operands and of P, never a wrong tile, which gives errors of order 1).

Without CUDA it is skipped, unless ``TREERPO_PRODUCTION_SHAPES=toy`` (the dry run of gpu_check.sh): then the
same checks run under the Triton interpreter at toy sizes. ``GPU_CHECK_ERRORS_JSON=PATH`` writes the errors
measured.
"""

import json
import os

import torch

TOY = os.environ.get("TREERPO_PRODUCTION_SHAPES") == "toy"
if not torch.cuda.is_available() and TOY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")
if not torch.cuda.is_available() and not TOY:
    pytest.skip("production shapes need a CUDA GPU (TREERPO_PRODUCTION_SHAPES=toy: toy sizes)", allow_module_level=True)

from test_triton_paged_decode import reference as paged_reference  # noqa: E402

from treerpo.attention.kernel_check import relative_error  # noqa: E402
from treerpo.attention.registry import _register_triton  # noqa: E402
from treerpo.attention.sdpa_backend import sdpa_tree_attention  # noqa: E402
from treerpo.attention.triton_backends import triton_tree_backend  # noqa: E402
from treerpo.kernels.paged_decode import cascade_decode_attention, paged_decode_attention  # noqa: E402
from treerpo.memory.workload import full_tree  # noqa: E402
from treerpo.tree import TreeSpec  # noqa: E402
from treerpo.trees.packing import pack_trees  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
SHAPES = {  # name: (query heads, KV heads, head dim)
    "qwen2.5-1.5b": (12, 2, 128),
    "qwen2.5-7b": (28, 4, 128),
    "llama-3.2-1b": (32, 8, 64),
}
if TOY:
    SHAPES = {"toy-gqa6": (6, 1, 32), "toy-gqa4": (8, 2, 16)}
TREE_TOKENS = 300 if TOY else 4096
BRANCHES, KEYS = (6, 40) if TOY else (64, 2048)
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_errors():
    yield
    path = os.environ.get("GPU_CHECK_ERRORS_JSON")
    if path and ERRORS:
        payload = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (interpreter)"}
        payload.update(toy=TOY, tolerance={str(k): v for k, v in TOLERANCE.items()}, errors=ERRORS)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


def _trees():
    rng = np.random.default_rng(0)
    spec = TreeSpec((4, 2, 2), 8 if TOY else 64)
    prompt = 16 if TOY else 128
    per_tree = prompt + spec.segment_tokens * (4 + 8 + 16)
    return pack_trees([full_tree(spec, prompt, rng, vocab=1000) for _ in range(max(1, TREE_TOKENS // per_tree))])


def _judge(name: str, got: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    err = relative_error(got, ref)
    ERRORS[name] = err
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_tree_attention_forward_and_backward(shape, dtype):
    hq, hkv, d = SHAPES[shape]
    batch = _trees()
    n = batch.num_tokens
    tin, tout = batch.tin.to(DEVICE), batch.tout.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    # the layout a model gives: [B, N, H, D] projections viewed as [B, H, N, D]
    q, k, v = (torch.randn(1, n, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    grad = torch.randn(1, hq, n, d, generator=gen).to(DEVICE, dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = triton_tree_backend(*leaves, tin, tout, cache={})
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = sdpa_tree_attention(*ref_leaves, tin, tout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for part, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        _judge(f"tree {shape} {str(dtype)[6:]} {part}", got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_paged_and_cascade_decode(shape, dtype):
    hq, hkv, d = SHAPES[shape]
    assert _register_triton("paged")
    gen = torch.Generator().manual_seed(2)
    slots = BRANCHES * KEYS // 4 + KEYS
    kc, vc = (torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    q = torch.randn(BRANCHES, hq, d, generator=gen).to(DEVICE, dtype)
    # siblings in groups of 8 sharing a prefix of KEYS // 2 slots, then their own suffixes
    groups = torch.arange(BRANCHES) // 8
    n_groups = int(groups.max()) + 1
    prefix_len = torch.full((n_groups,), KEYS // 2)
    prefix_slots = torch.randperm(slots, generator=gen)[: n_groups * (KEYS // 2)].view(n_groups, KEYS // 2)
    lens = KEYS // 2 + torch.randint(1, KEYS // 2 + 1, (BRANCHES,), generator=gen)
    kv_slots = torch.randint(0, slots, (BRANCHES, KEYS), generator=gen)
    kv_slots[:, : KEYS // 2] = prefix_slots[groups]
    kv_slots, lens = kv_slots.to(DEVICE), lens.to(DEVICE)
    ref, _ = paged_reference(q, kc, vc, kv_slots, lens)
    plain = paged_decode_attention(q, kc, vc, kv_slots, lens)
    cascade = cascade_decode_attention(
        q, kc, vc, kv_slots, lens, prefix_slots.to(DEVICE), prefix_len.to(DEVICE), groups.to(DEVICE)
    )
    assert plain.dtype == cascade.dtype == dtype
    _judge(f"paged {shape} {str(dtype)[6:]}", plain, ref, dtype)
    _judge(f"cascade {shape} {str(dtype)[6:]}", cascade, ref, dtype)
