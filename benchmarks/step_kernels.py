"""Kernels and device syncs of the engine's prefill, fork and decode steps, with the CUDA code path emulated.

    python benchmarks/step_kernels.py --json step_kernels.json

A GPU step's cost at small batches is its launches and its syncs, which this CPU can count. Every ATen operation
the step dispatches is recorded (``torch.utils._python_dispatch.TorchDispatchMode``) and sorted into:
  kernel   an operation that launches device work (views, shape queries and allocations do not)
  sync     one that makes the host wait for the device: reading a value (``.item()``, ``bool()``), ``nonzero``,
           boolean-mask indexing, and the step's copy of its tokens to the host
and attributed to the decoder layers (mean a layer) or to the rest of the step. What the engine does differently
on CUDA is emulated: the Triton paged and cascade kernels run their host code with each launch counted as one
kernel (the outputs then come from the PyTorch backend, uncounted, so the rollout stays a real one), and so do the
fused RMSNorm and rotary kernels (``engine/fused_layers.py``, on by default on CUDA) and the fused draw
(``kernels/draw.py``); host arrays
reach the device in one pinned copy a step (``HostStaging``) or a call (``step_draw``); ``.cpu()`` is a copy and a
sync. The model is Qwen2.5-1.5B-shaped (28 layers, 12/2 attention heads, vocabulary 151,936) with its hidden size
reduced to run here: kernel counts do not depend on sizes. Steps are split into prefill, fork (a decode step in
which some branch forks) and decode (plain); the floors of the issue this answers are 25 kernels a layer, 40
outside the layers and 1 sync a decode step, and no sync inside the layers in prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json

aten = torch.ops.aten
NO_KERNEL = {
    aten.view, aten._unsafe_view, aten.as_strided, aten.t, aten.transpose, aten.permute, aten.expand, aten.slice,
    aten.select, aten.unsqueeze, aten.squeeze, aten.alias, aten.detach, aten.empty, aten.empty_strided,
    aten.new_empty, aten.new_empty_strided, aten.split, aten.split_with_sizes, aten.unbind, aten.lift_fresh,
    aten._reshape_alias, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.is_nonzero,
    aten.unfold, aten.view_as_real, aten.view_as_complex, aten.chunk, aten.narrow, aten.diagonal, aten.movedim,
    aten.resize_, aten.set_, aten.dim, aten.is_same_size,
}  # fmt: skip
SYNC = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.unique_dim,
    aten._unique2,
    aten.unique_consecutive,
}
SCOPES = ("layer", "model", "inputs", "head_and_draw")
QWEN25_1_5B = dict(
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096
)


def bool_index(func, args) -> bool:
    """Indexing with a boolean mask: the result's size is read on the host (a sync)."""
    if func.overloadpacket not in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class StepCounter(TorchDispatchMode):
    """Kernels and syncs per (step, scope). Only the step's device work is counted: operations inside a region (the
    model's forward, the step's inputs, the head and draw), the scope being "layer" inside a decoder layer and the
    region's name elsewhere. Tensors the step copied to the host (``.cpu()``) and what is computed from them alone
    are host work, not counted."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict] = []
        self.regions: list[str] = []
        self.in_layer = False
        self.paused = 0
        self.host_storages: set[int] = set()

    def begin(self, kind: str) -> None:
        self.steps.append({"kind": kind, "kernels": Counter(), "syncs": Counter(), "ops": Counter()})
        self.host_storages.clear()

    @property
    def scope(self) -> str:
        return "layer" if self.in_layer else self.regions[-1]

    def add(self, what: str, n: int = 1, name: str = "") -> None:
        if self.steps and self.regions and not self.paused:
            self.steps[-1][what][self.scope] += n
            if what == "kernels":
                self.steps[-1]["ops"][(self.scope, name)] += n

    def mark_host(self, tensor: torch.Tensor) -> None:
        self.host_storages.add(tensor.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and all(t.untyped_storage().data_ptr() in self.host_storages for t in tensors):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark_host(t)
            return out
        packet = func.overloadpacket
        if packet not in NO_KERNEL and not (packet == aten._to_copy and _same_device_and_dtype(args, kwargs)):
            self.add("kernels", name=packet.__name__)
        if packet in SYNC or bool_index(func, args):
            self.add("syncs", name=packet.__name__)
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def region(self, name: str, fn):
        """``fn`` with its operations counted under ``name``."""

        def counted(*args, **kwargs):
            self.regions.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.regions.pop()

        return counted


def _same_device_and_dtype(args, kwargs) -> bool:
    """``.to()`` to what the tensor already is returns it: no copy."""
    tensor = args[0]
    return kwargs.get("dtype", tensor.dtype) == tensor.dtype and kwargs.get("device", tensor.device) == tensor.device


class LaunchMarker:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts one launch and runs nothing."""

    def __init__(self, counter: StepCounter, name: str):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.counter.add("kernels", name=self.name)


@contextlib.contextmanager
def cuda_path_emulated(counter: StepCounter, sampler):
    """The engine's CUDA code path, as far as launches and syncs go (see the module docstring)."""
    from treerpo.attention.paged import paged_attention_torch
    from treerpo.attention.triton_backends import paged_decode_backend
    from treerpo.engine import step_builder, step_draw, tree_sampler
    from treerpo.engine.fused_layers import _llama_apply_rotary_pos_emb, _LlamaRMSNorm, enable_fused_layers
    from treerpo.engine.sampling import SamplingParams, draw
    from treerpo.kernels import draw as fused_draw_module
    from treerpo.kernels import paged_decode, rms_norm, rope

    def reference_draw(logits, u, temperature, entropy, out):
        """What the fused draw writes, from PyTorch's draw."""
        tokens, logprobs, bad, entropies = draw(logits, SamplingParams(temperature=temperature), u, entropy)
        k = u.shape[1]
        out[:, :k], out[:, k : 2 * k], out[:, 2 * k] = tokens, logprobs, float(bad)
        if entropy:
            out[:, 2 * k + 1] = entropies

    def triton_paged(module, query, key, value, meta, scale):
        paged_decode_backend(module, query, key, value, meta, scale)  # counted; its launches are markers
        with counter.pause():
            return paged_attention_torch(module, query, key, value, meta, scale)

    def staged(self, arrays):
        counter.add("kernels", name="host_to_device_copy")  # one pinned buffer, one copy
        return original_staging(self, arrays)

    def to_device(array, device):
        counter.add("kernels", name="host_to_device_copy")
        return original_to_device(array, device)

    def fused(name, kernel):
        def launch(*args, **kwargs):
            counter.add("kernels", name=name)
            with counter.pause():
                return kernel(*args, **kwargs)

        return launch

    def to_host(tensor, *args, **kwargs):
        counter.add("kernels", name="device_to_host_copy")
        counter.add("syncs", name="device_to_host_copy")
        with counter.pause():
            host = original_cpu(tensor, *args, **kwargs).clone()
        counter.mark_host(host)
        return host

    original_staging, original_to_device, original_cpu = (
        step_builder.HostStaging.__call__,
        step_draw._to_device,
        torch.Tensor.cpu,
    )
    original_backend = sampler.runner.paged_backend
    runner = sampler.runner
    patches = [
        (runner, "run", counter.region("model", runner.run)),
        (tree_sampler, "draw_step", counter.region("head_and_draw", tree_sampler.draw_step)),
        (tree_sampler, "decode_inputs", counter.region("inputs", tree_sampler.decode_inputs)),
        (tree_sampler, "sequence_inputs", counter.region("inputs", tree_sampler.sequence_inputs)),
        (step_builder.HostStaging, "__call__", staged),
        (step_draw, "_to_device", to_device),
        (torch.Tensor, "cpu", to_host),
        (paged_decode, "_paged_attn_fwd", LaunchMarker(counter, "triton_paged_attention")),
        (paged_decode, "_merge_states", LaunchMarker(counter, "triton_merge_states")),
        (rms_norm, "rms_norm", fused("triton_rms_norm", lambda x, w, eps: _reference_norm(x, w, eps))),
        (rope, "apply_rope", fused("triton_rope", _llama_apply_rotary_pos_emb)),
        (fused_draw_module, "fused_draw", fused("triton_draw", reference_draw)),
        (step_draw, "use_fused_draw", lambda device, params, width: not step_draw.truncated(params)),
    ]
    enable_fused_layers(sampler.model)
    original_fused, sampler.runner.fused_layers = sampler.runner.fused_layers, True

    def _reference_norm(x, weight, eps):
        return _LlamaRMSNorm.forward(types.SimpleNamespace(weight=weight, variance_epsilon=eps), x)

    from treerpo.attention import registry

    registry.register_paged_backend("emulated_triton", triton_paged)
    sampler.runner.paged_backend = "emulated_triton"
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            if owner is runner:
                delattr(runner, name)  # the instance attribute goes, the method shows again
            else:
                setattr(owner, name, value)
        sampler.runner.paged_backend = original_backend
        sampler.runner.fused_layers = original_fused


def scoped_layers(model, counter: StepCounter):
    """Hooks putting the counter in the "layer" scope while a decoder layer runs."""
    from treerpo.policy.logprobs import decoder_of

    def enter(*_):
        counter.in_layer = True

    def leave(*_):
        counter.in_layer = False

    handles = []
    for layer in decoder_of(model).layers:
        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    return handles


def build_model(hidden: int, intermediate: int, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from treerpo.attention import enable_tree_attention

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_1_5B, hidden_size=hidden, intermediate_size=intermediate, tie_word_embeddings=True)
    return enable_tree_attention(Qwen2ForCausalLM(config).to(dtype).eval())


def count_rollout(model, prompts: int, branching, segment_tokens: int, prompt_tokens: int) -> StepCounter:
    from treerpo.engine.tree_sampler import TreeSampler
    from treerpo.tree import TreeSpec

    sampler = TreeSampler(model, None, pool_tokens=1 << 14, ignore_eos=True)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, model.config.vocab_size, prompt_tokens).tolist() for _ in range(prompts)]
    sampler.sample(ids[:1], TreeSpec((2,), 2), seeds=[0])  # first-use work (kernel checks, caches) not counted
    counter = StepCounter()
    original_timed = sampler._timed

    def timed(kind, batch, step):
        counter.begin(kind)
        original_timed(kind, batch, step)
        if kind == "decode" and batch.forked:
            counter.steps[-1]["kind"] = "fork"

    sampler._timed = timed
    spec = TreeSpec(tuple(branching), segment_tokens, temperature=1.0)
    handles = scoped_layers(model, counter)
    try:
        with cuda_path_emulated(counter, sampler), counter:
            sampler.sample(ids, spec, seeds=range(prompts))
    finally:
        for h in handles:
            h.remove()
    return counter


def summarise(counter: StepCounter, layers: int) -> dict:
    by_kind = defaultdict(list)
    for step in counter.steps:
        by_kind[step["kind"]].append(step)
    out = {}
    for kind, steps in by_kind.items():
        ops = Counter()
        for s in steps:
            ops.update(s["ops"])

        def mean(what, scopes=SCOPES):
            return float(np.mean([sum(s[what][sc] for sc in scopes) for s in steps]))

        outside = [sc for sc in SCOPES if sc != "layer"]
        out[kind] = {
            "steps": len(steps),
            "kernels_per_layer": mean("kernels", ["layer"]) / layers,
            "kernels_outside_layers": mean("kernels", outside),
            **{f"kernels_{sc}": mean("kernels", [sc]) for sc in outside},
            "kernels_per_step": mean("kernels"),
            "syncs_per_step": mean("syncs"),
            "syncs_in_layers_per_step": mean("syncs", ["layer"]),
            "ops": {
                scope: {
                    name: n / len(steps) / (layers if scope == "layer" else 1)
                    for (sc, name), n in ops.items()
                    if sc == scope
                }
                for scope in SCOPES
            },  # fmt: skip
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=192, help="hidden size (12 heads of hidden / 12)")
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--branching", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--segment-tokens", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--show-ops", action="store_true", help="print each kind's operations a layer and outside")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.hidden, args.intermediate, dtype)
    layers = model.config.num_hidden_layers
    counter = count_rollout(model, args.prompts, args.branching, args.segment_tokens, args.prompt_tokens)
    summary = summarise(counter, layers)
    print(
        f"step kernels on {machine()}: Qwen2.5-1.5B-shaped model ({layers} layers, 12/2 heads, vocabulary "
        f"{model.config.vocab_size}, hidden {args.hidden}, {args.dtype}); {args.prompts} prompts of "
        f"{args.prompt_tokens} tokens, trees {args.branching} x {args.segment_tokens} tokens; CUDA path emulated"
    )
    rows = [{"step": kind, **{k: v for k, v in s.items() if k != "ops"}} for kind, s in summary.items()]
    print_table(
        rows,
        ["step", "steps", "kernels_per_layer", "kernels_outside_layers", "kernels_model", "kernels_inputs",
         "kernels_head_and_draw", "kernels_per_step", "syncs_per_step", "syncs_in_layers_per_step"],
    )  # fmt: skip
    if args.show_ops:
        for kind, s in summary.items():
            for scope, ops in s["ops"].items():
                listed = ", ".join(f"{name} {n:.3g}" for name, n in sorted(ops.items(), key=lambda kv: -kv[1]))
                print(f"{kind} {scope}: {listed}")
    decode = summary.get("decode", {})
    ratios = {
        "decode_kernels_per_layer": decode.get("kernels_per_layer"),
        "decode_kernels_outside_layers": decode.get("kernels_outside_layers"),
        "decode_syncs_per_step": decode.get("syncs_per_step"),
        "fork_kernels_per_step": summary.get("fork", {}).get("kernels_per_step"),
        "prefill_syncs_in_layers_per_step": summary.get("prefill", {}).get("syncs_in_layers_per_step"),
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.4g}" if v is not None else f"{k}: none")
    write_json(args.json, {"machine": machine(), "model": QWEN25_1_5B | {"hidden_size": args.hidden},
                           "dtype": args.dtype, "steps": summary, "ratios": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
