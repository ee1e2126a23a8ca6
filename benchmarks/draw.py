"""A decode step's LM head and draw at paper-scale branch counts: time and peak memory.

    python benchmarks/draw.py --rows 512 4096 32768 --vocab 49152 --baseline /tmp/before --json draw.json

Compared, on the same random hidden states, LM head and uniforms (temperature 1, one draw a row):
  chunked   the engine's ``step_draw.draw_step``: head and draw on chunks of rows within ``--memory-bytes``
  one_shot  the same code with an unbounded budget: every row's logits at once
  fused     the CUDA default: the head's logits in chunks, each drawn by the fused Triton kernel (``kernels/draw.py``);
            without a GPU it is emulated (the kernel's results from PyTorch's draw, uncounted): its traffic is
            reported, not its time
  before    (with ``--baseline DIR``, a checkout of the code before the chunked draw) that checkout's draw:
            the logits of every row, then its batched draw
Each system runs in a fresh process, so that its peak memory is its own; ``peak_extra_MiB`` is that peak minus
the memory before the first draw (the head and hidden states already made): resident memory on the CPU, torch's
allocated memory on CUDA (the default device when there is one). A system
whose estimated peak exceeds ``--max-memory-gib`` is left out and reported as such.

``bytes_per_logit``: the memory traffic of a step's head and draw per logit, counted on one draw of up to 256
rows: every operation's tensors read and written (views, which move nothing, aside; the head's weight, read once
whatever the rows, aside), and for the fused kernel the three reads of its fp32 logits it makes
(``kernels/draw.TRAFFIC_BYTES_PER_LOGIT``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, timed, write_json
from step_kernels import NO_KERNEL
from torch.utils._python_dispatch import TorchDispatchMode

# bytes a logit of each system holds at its peak, for the estimate that leaves a system out (not a measurement)
ESTIMATED_BYTES_PER_LOGIT = {"one_shot": 4 + 8, "before": 4 + 4 + 8 + 8 + 8}
SYSTEMS = ("chunked", "one_shot", "fused", "before")


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak since the last ``reset_resident_peak`` (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_resident_peak() -> None:
    """Set the peak (VmHWM) to the current resident memory (Linux >= 4.0), so setup is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(system: str, rows: int, vocab: int, hidden_size: int, memory_bytes: int, repeats: int) -> dict:
    """Times ``system`` in this process (``treerpo`` is whatever PYTHONPATH gives) and measures its peak."""
    from treerpo.engine.sampling import SamplingParams
    from treerpo.policy.lm_head import LMHead

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    layer.weight.copy_(torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5)
    layer = layer.to(device)
    head = LMHead(SimpleNamespace(get_output_embeddings=lambda: layer, config=SimpleNamespace()))
    hidden = (torch.randn(rows, hidden_size, generator=gen) * 3).to(device)
    index = np.arange(rows)
    u = np.random.default_rng(0).random((rows, 1))
    params = SamplingParams(temperature=1.0)
    if system == "before":
        from treerpo.engine.tree_sampler import TreeSampler

        def run(n=rows):
            return TreeSampler._draw(head.logits(hidden[:n]), index[:n], u[:n], 1, params, False)
    else:
        from treerpo.engine import step_draw

        budget = 1 << 62 if system == "one_shot" else memory_bytes
        emulated = system == "fused" and device.type != "cuda"
        step_draw.use_fused_draw = lambda device, params, width: system == "fused"
        if emulated:
            emulate_fused_draw()

        def run(n=rows):
            return step_draw.draw_step(head, hidden[:n], None, u[:n], 1, params, False, budget)  # rows in order

    traffic = bytes_per_logit(lambda: run(min(rows, 256)), min(rows, 256), vocab, layer.weight)
    if system == "fused" and device.type != "cuda":
        return {"emulated": True, "bytes_per_logit": traffic, "tokens_sha1": tokens_digest(run()[0])}
    run(min(rows, 4))  # code paths and workspaces loaded on first use are not the draw's memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_resident_peak()
        before = resident_bytes()
    seconds = []
    for _ in range(repeats):
        tokens, s = timed(run)
        seconds.append(s)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident_bytes("VmHWM")
    return {
        "seconds": min(seconds),
        "all_seconds": seconds,
        "peak_extra_MiB": (peak - before) / 2**20,
        "bytes_per_logit": traffic,
        "tokens_sha1": tokens_digest(tokens[0]),
    }


def tokens_digest(tokens) -> str:
    return hashlib.sha1(np.ascontiguousarray(tokens).tobytes()).hexdigest()


class TrafficCounter(TorchDispatchMode):
    """Bytes every operation reads and writes (its tensor arguments and results), views aside."""

    def __init__(self, skip: torch.Tensor):
        super().__init__()
        self.bytes = 0
        self.skip = skip.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in NO_KERNEL:
            for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.skip:
                    self.bytes += t.numel() * t.element_size()
        return out


def bytes_per_logit(run, rows: int, vocab: int, weight: torch.Tensor) -> float:
    """Traffic of ``run`` (a step's head and draw over ``rows`` rows) per logit, the head's weight aside."""
    with TrafficCounter(weight) as counter:
        run()
    return (counter.bytes + KERNEL_BYTES[0]) / (rows * vocab)


KERNEL_BYTES = [0]  # what emulated kernels read, which no PyTorch operation shows


def emulate_fused_draw() -> None:
    """The fused draw without a GPU: its results from PyTorch's draw (not counted), its reads added."""
    from treerpo.engine.sampling import SamplingParams, draw
    from treerpo.kernels import draw as kernel

    def fused_draw(logits, u, temperature, entropy, out):
        with torch.utils._python_dispatch._disable_current_modes():
            tokens, logprobs, bad, _ = draw(logits, SamplingParams(temperature=temperature), u, entropy)
            out[:, 0], out[:, 1], out[:, 2] = tokens[:, 0], logprobs[:, 0], float(bad)
        KERNEL_BYTES[0] += logits.numel() * kernel.TRAFFIC_BYTES_PER_LOGIT

    kernel.fused_draw = fused_draw


def run_worker(system: str, src: Path, args, rows: int, vocab: int) -> dict:
    # glibc: every block of 64 KiB or more mapped on its own and unmapped when freed (no dynamic threshold that
    # would keep freed chunks resident), so that resident memory follows what the draw holds
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--rows",
        str(rows),
        "--vocab",
        str(vocab),
        "--hidden",
        str(args.hidden),
        "--memory-bytes",
        str(args.memory_bytes),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system} at {rows} x {vocab} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 4096, 32768], help="live branches of a step")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152], help="49152: SmolLM2; 151936: Qwen2.5")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--memory-bytes", type=int, default=1 << 30, help="the chunked draw's budget")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code before the change")
    parser.add_argument(
        "--max-memory-gib", type=float, default=12.0, help="leave out a system whose estimated peak is larger"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=SYSTEMS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        print(
            json.dumps(worker(args.worker, args.rows[0], args.vocab[0], args.hidden, args.memory_bytes, args.repeats))
        )
        return
    here = Path(__file__).resolve().parent.parent
    systems = {"chunked": here, "one_shot": here, "fused": here}
    if args.baseline is not None:
        systems["before"] = args.baseline.resolve()
    print(
        f"decode-step LM head + draw (temperature 1, one draw a row, hidden {args.hidden}, chunked budget "
        f"{args.memory_bytes / 2**20:.0f} MiB); {machine()}, {args.threads} threads; best of {args.repeats}"
    )
    print(f"compared: {', '.join(systems)}")
    results, table, ratios = [], [], {}
    for vocab in args.vocab:
        for rows in args.rows:
            row = {"rows": rows, "vocab": vocab}
            for system, src in systems.items():
                estimate = rows * vocab * ESTIMATED_BYTES_PER_LOGIT.get(system, 0) / 2**30
                if estimate > args.max_memory_gib:
                    row[system] = {"left_out": f"estimated peak {estimate:.0f} GiB > --max-memory-gib"}
                    continue
                row[system] = run_worker(system, src, args, rows, vocab)
            ran = [row[s]["tokens_sha1"] for s in systems if "tokens_sha1" in row[s]]
            row["same_tokens"] = len(set(ran)) == 1 if len(ran) > 1 else None  # None: nothing to compare
            results.append(row)
            for system in systems:
                r = row[system]
                table.append(
                    {
                        "rows": rows,
                        "vocab": vocab,
                        "system": system,
                        "seconds": r.get("seconds", "-"),
                        "peak_extra_MiB": r.get("peak_extra_MiB", "-"),
                        "bytes_per_logit": r.get("bytes_per_logit", "-"),
                        "note": r.get("left_out")
                        or ("TOKENS DIFFER" if row["same_tokens"] is False else "")
                        or ("emulated: traffic only" if r.get("emulated") else ""),
                    }
                )
            key = f"{rows}x{vocab}"
            for system in systems:
                if "bytes_per_logit" in row[system]:
                    ratios[f"{system}_bytes_per_logit_{key}"] = row[system]["bytes_per_logit"]
            for other in ("one_shot", "before"):
                if "seconds" in row.get(other, {}):
                    ratios[f"{other}_over_chunked_seconds_{key}"] = row[other]["seconds"] / row["chunked"]["seconds"]
                    chunked_peak = max(row["chunked"]["peak_extra_MiB"], 1 / 1024)  # at least a KiB: never 0
                    ratios[f"{other}_over_chunked_peak_{key}"] = row[other]["peak_extra_MiB"] / chunked_peak
    print_table(table, ["rows", "vocab", "system", "seconds", "peak_extra_MiB", "bytes_per_logit", "note"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "threads": args.threads,
            "hidden": args.hidden,
            "memory_bytes": args.memory_bytes,
            "baseline": str(args.baseline),
            "results": results,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
