"""Ahead-of-time compilation of the kernels for a GPU target, on any machine (no GPU needed).

``compile_launch`` compiles one kernel with the argument types, constants and launch options production
uses (``triton.compile`` of the kernel's AST for ``GPUTarget("cuda", arch, 32)``: Triton IR, PTX, then
``ptxas``) and reads what the hardware would get: registers and stack (spills) a thread from the
``cuobjdump`` Triton ships, shared memory a program, and whether the dots took Hopper's ``warp_group_dot``
(wgmma) path. ``production_launches`` lists the launches the host code makes at the shapes of the
families we train (head dims, dtypes, grouped-query ratios), with the configurations of ``tile_configs``
and ``paged_decode``. ``tests/test_kernel_compile.py`` asserts them in CI; ``python -m treerpo.kernels.aot``
prints the table.

Run it in a process without ``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton

from . import draw, paged_decode, rms_norm, rope, tree_attention
from .tile_configs import TileConfig, default_tiles

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes a program may use (sm_90 H100, sm_80 A100)
_POINTER_TYPES = {
    "LSE": "*fp32",
    "DELTA": "*fp32",
    "TIN": "*i32",
    "TOUT": "*i32",
    "KEY_TILES": "*i32",
    "Q_TILES": "*i32",
    "OFFSETS": "*i64",
    "Q_OFFSETS": "*i64",
    "SLOTS": "*i64",
    "KSTART": "*i64",
    "KEND": "*i64",
    "QSTART": "*i64",
    "QIDX": "*i64",
    "OUTS": "*fp32",
    "LSES": "*fp32",
    "LSE_OUT": "*fp32",
}
_DATA = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "OUT", "X", "W", "COS", "SIN", "KOUT"}
_KERNEL_POINTERS = {
    "_paged_attn_fwd": {"O": "*fp32"},  # partial outputs kept in fp32 for the merge
    "_draw_fwd": {"LOGITS": "*fp32", "U": "*fp64", "OUT": "*fp64", "TEMPERATURE": "*fp64"},
}
_FLOATS = {"qk_scale", "sm_scale", "eps"}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as production makes it."""

    kernel: str  # attribute name in tree_attention / paged_decode
    dtype: str  # "bf16", "fp16", "fp32"
    head_dim: int
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    arch: int
    wgmma_expected: bool
    dot_rows: int = 0  # rows (M) of the kernel's dots; 0: no dots
    groups: tuple[int, ...] = field(default=(), compare=False)  # the GQA ratios that launch it

    def describe(self) -> str:
        c = dict(self.constexprs)
        tile = f"{c.get('BLOCK_M', c.get('BLOCK', '-'))}x{c.get('BLOCK_N', '-')}"
        config = f"tile {tile} w{self.num_warps}s{self.num_stages}"
        return f"sm_{self.arch} {self.kernel} {self.dtype} d={self.head_dim} {config}"


@dataclass(frozen=True)
class CompileReport:
    launch: Launch
    registers: int
    stack: int  # bytes a thread spilled to local memory (0: no spill)
    local: int
    shared: int  # bytes of shared memory a program
    wgmma: bool

    def problems(self) -> list[str]:
        out = []
        if self.stack or self.local:
            out.append(f"spills ({self.stack} B stack, {self.local} B local a thread)")
        limit = SHARED_LIMIT.get(self.launch.arch)
        if limit and self.shared > limit:
            out.append(f"{self.shared} B shared memory > {limit} B")
        if self.launch.wgmma_expected and not self.wgmma:
            out.append("no warp_group_dot (wgmma) where Hopper should use it")
        rows, warps = self.launch.dot_rows, self.launch.num_warps
        if self.wgmma and rows and warps > 4 * max(1, rows // 64):
            out.append(f"{warps} warps on {rows}-row dots: warp groups would repeat the same product")
        return out


def _kernel(name: str):
    return getattr(next(m for m in (tree_attention, paged_decode, rms_norm, rope, draw) if hasattr(m, name)), name)


def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _KERNEL_POINTERS.get(fn.__name__, {}):
            sig[name] = _KERNEL_POINTERS[fn.__name__][name]
        elif name in _DATA:
            sig[name] = "*" + dtype
        elif name in _POINTER_TYPES:
            sig[name] = _POINTER_TYPES[name]
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name[0].isupper() and name not in ("N", "HQ", "HKV", "GROUP", "ROWS", "S", "RH"):
            raise KeyError(f"aot: no pointer type for argument {name} of {fn.__name__}")
        else:
            sig[name] = "i32"
    return sig


def _is_stride(name: str) -> bool:
    return name.startswith("stride_") or re.fullmatch(r"s(q|k|v|o|d|do)_[bhn]", name) is not None


def compile_launch(launch: Launch) -> CompileReport:
    """Compile ``launch`` for its target and read its resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(launch.kernel)
    consts = dict(launch.constexprs)
    sig = _signature(fn, launch.dtype, consts)
    # what Triton's launcher specialises at production shapes: pointers 16-byte aligned (torch's allocations)
    # and strides multiples of 16 (head dims 64/80/96/128 and their multiples)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name].startswith("*") or _is_stride(name)
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", launch.arch, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    usage = _resource_usage(compiled.asm["cubin"])
    return CompileReport(
        launch,
        usage.get("REG", 0),
        usage.get("STACK", 0),
        usage.get("LOCAL", 0),
        int(compiled.metadata.shared),
        "warp_group_dot" in compiled.asm["ttgir"],
    )


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


# ------------------------------------------------------------------------------------- production launches
HEAD_DIMS = (64, 96, 128)  # Llama-3.2-1B/Qwen2.5-0.5B 64, a non-power of two, Qwen2.5/Llama 128
HIDDEN_SIZES = (576, 1536, 3584, 4096, 8192)  # SmolLM2-135M, Qwen2.5-1.5B, Qwen2.5-7B, Llama-3 8B, Llama-3 70B
GROUPS = (1, 4, 6, 7)  # MHA; Llama-3 8B (32/8); Qwen2.5-1.5B (12/2); Qwen2.5-7B (28/4)
DTYPES = ("bf16", "fp16")


def _tree_launches(dtype: str, d: int, arch: int, group: int) -> list[Launch]:
    tiles = default_tiles(d, hopper=arch >= 90).for_group(group)
    block_d = max(16, triton.next_power_of_2(d))
    base = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_FP32=False, PRECISION=None)
    hopper = arch >= 90

    def tile(kernel: str, cfg: TileConfig, rows_of_dots: int) -> Launch:
        consts = dict(base, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        return Launch(
            kernel, dtype, d, tuple(sorted(consts.items())), cfg.num_warps, cfg.num_stages, arch,
            hopper and rows_of_dots >= 64, rows_of_dots,
        )  # fmt: skip

    delta = Launch(
        "_tree_attn_bwd_delta", dtype, d, (("BLOCK", 64), ("BLOCK_D", block_d), ("HEAD_DIM", d)), 4, 1, arch, False
    )
    return [
        tile("_tree_attn_fwd", tiles.fwd, tiles.fwd.block_m),
        tile("_tree_attn_bwd_dkdv", tiles.dkdv, tiles.dkdv.block_n),
        tile("_tree_attn_bwd_dq", tiles.dq, tiles.dq.block_m),
        delta,
    ]


def _paged_launches(dtype: str, d: int, arch: int, group: int) -> list[Launch]:
    out = []
    for rows in (1, 8):  # a decode row alone, and a cascade prefix shared by 8 siblings
        cfg = paged_decode.launch_config(d, rows, group, interpreted=False)
        consts = dict(HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_FP32=False)
        consts["PRECISION"] = None
        out.append(
            Launch(
                "_paged_attn_fwd", dtype, d, tuple(sorted(consts.items())), cfg.num_warps, cfg.num_stages, arch,
                arch >= 90 and cfg.block_m >= 64, cfg.block_m,
            )
        )  # fmt: skip
    merge = paged_decode.merge_config(d)
    consts = dict(HEAD_DIM=d, BLOCK_D=merge.block_d, BLOCK=merge.block)
    out.append(Launch("_merge_states", dtype, d, tuple(sorted(consts.items())), merge.num_warps, 1, arch, False))
    return out


def _layer_launches(dtype: str, arch: int) -> list[Launch]:
    """The fused RMSNorm at ``HIDDEN_SIZES`` and rotary embedding at ``HEAD_DIMS``, as their host code launches them."""
    out = []
    for hidden in HIDDEN_SIZES:
        block, warps = rms_norm.launch_config(hidden)
        out.append(Launch("_rms_norm_fwd", dtype, hidden, (("BLOCK", block),), warps, 1, arch, False))
    for d in HEAD_DIMS:
        consts = (("BLOCK", rope.launch_block(d)), ("HALF", d // 2))
        out.append(Launch("_rope_fwd", dtype, d, consts, rope.NUM_WARPS, 1, arch, False))
    return out


def _draw_launches(arch: int) -> list[Launch]:
    """The fused draw: greedy and sampled, with and without the entropy, one draw a row and a fork's nine."""
    out = []
    for greedy in (False, True):
        for entropy in (False, True):
            for kb in (1, 2, 4, 8, draw.MAX_DRAWS):  # a draw a row, forks of 1, 3, 7 and up to 15 children
                consts = (("BLOCK", draw.BLOCK), ("ENTROPY", entropy), ("GREEDY", greedy), ("KB", kb))
                out.append(Launch("_draw_fwd", "fp32", 0, consts, draw.NUM_WARPS, 1, arch, False))
    return out


def production_launches(archs=(90, 80)) -> list[Launch]:
    """Every distinct launch at ``HEAD_DIMS`` x ``DTYPES`` x ``GROUPS`` (sm_80: bf16 only), with the GQA ratios
    that make it."""
    seen: dict[Launch, list[int]] = {}
    for arch in archs:
        for dtype in DTYPES if arch >= 90 else ("bf16",):
            for d in HEAD_DIMS:
                for group in GROUPS:
                    for launch in _tree_launches(dtype, d, arch, group) + _paged_launches(dtype, d, arch, group):
                        seen.setdefault(launch, []).append(group)
            for launch in _layer_launches(dtype, arch):
                seen.setdefault(launch, [])
        for launch in _draw_launches(arch):
            seen.setdefault(launch, [])
    return [Launch(**{**launch.__dict__, "groups": tuple(sorted(set(groups)))}) for launch, groups in seen.items()]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="Compile every production launch of the Triton kernels for sm_90/sm_80."
    )
    parser.add_argument("--json", help="write the reports here")
    args = parser.parse_args(argv)
    reports = []
    print(f"{'launch':<66} {'regs':>5} {'stack':>5} {'shared':>7} wgmma  groups")
    for launch in production_launches():
        r = compile_launch(launch)
        reports.append(r)
        print(
            f"{launch.describe():<66} {r.registers:>5} {r.stack:>5} {r.shared:>7} {str(r.wgmma):<6} "
            f"{launch.groups} {'; '.join(r.problems())}"
        )
    bad = [r for r in reports if r.problems()]
    print(f"{len(reports)} launches compiled, {len(bad)} with problems")
    if args.json:
        rows = [
            dict(
                kernel=r.launch.kernel, arch=r.launch.arch, dtype=r.launch.dtype, head_dim=r.launch.head_dim,
                config=r.launch.describe(), groups=list(r.launch.groups), registers=r.registers, stack=r.stack,
                shared=r.shared, wgmma=r.wgmma, wgmma_expected=r.launch.wgmma_expected, problems=r.problems(),
            )
            for r in reports
        ]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"launches": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
