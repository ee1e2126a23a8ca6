#!/usr/bin/env bash
# One-command GPU check of treerpo, from the repository root of a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh
#
# Uses only what the machine's Python already has (torch, triton, transformers, pytest; nothing is downloaded).
# Parts, in this order: correctness at production shapes first, then the kernels' own tests, then benchmarks.
#   install        the project without downloads: already importable from this checkout, else
#                  `pip install --no-deps --no-build-isolation --no-index -e .` (builds treerpo._C when pybind11
#                  and a C++ compiler are there, its sources compiled in parallel), else no install at all:
#                  PYTHONPATH=<repo> (treerpo._C then falls back to Python)
#   correctness    tests/test_triton_production_shapes.py: bf16/fp16 tree attention with gradients and paged/cascade
#                  decode at Qwen2.5-1.5B/7B and Llama-3.2-1B attention shapes against fp32 (errors -> correctness.json)
#   triton_kernels tests/test_triton_tree_attention.py, test_triton_paged_decode.py, test_tile_configs.py, compiled,
#                  test_fused_layers.py (RMSNorm and rotary kernels), test_fused_draw.py (the fused draw)
#   paged_cascade  tests/test_paged_cascade.py
#   arch_bf16      tests/test_architecture_matrix_bf16.py: every exact family in bf16 on CUDA (Triton tree backend,
#                  the engine's Triton paged decode) against fp32, within bf16's own error
#   random_model   (on the CPU, beside the GPU tests) the Qwen2-1.5B-shaped random model of
#                  benchmarks/e2e_random_model.py, made once (~3 GB, under $TREERPO_CACHE or ~/.cache/treerpo)
#   attention      benchmarks/attention.py at Qwen2.5-1.5B's attention shape (12 query / 2 KV heads, dim 128), bf16;
#                  skipped when correctness or triton_kernels failed
#   rollout        benchmarks/rollout.py on the random 1.5B model, bf16, with the compiled decoder layers (CUDA graphs)
#                  against eager and generate (--compile)
#   draw           benchmarks/draw.py: a decode step's LM head + draw at 4,096 and 32,768 rows x Qwen's 151,936 tokens
# and, only when named in GPU_CHECK_PARTS: e2e (benchmarks/e2e.py --preset qwen1.5b, one step), kernel_check and
# arch_matrix (CPU tests that CI already runs).
# A test file or script whose imports are missing is skipped with a line saying which. Every part has its own
# budget (BUDGETS below); the planned parts' budgets must add up to at most 80% of GPU_CHECK_BUDGET_S (default
# 540 s, inside the device tool's 600 s a call), or the script refuses to start. A part that would start past the
# budget is skipped; a failing part is reported and the next one runs. It prints a summary table (part / status /
# seconds) and exits 1 if any part failed or timed out.
#
# Writes into $OUT when set (else benchmarks/results/gpu_check/), all files directly in it, each as its part ends
# (summary.json after every part; attention.json after every system): gpu_check.log (this output),
# environment.json, summary.json, correctness.json, attention.json, rollout.json, draw.json (e2e.json if asked):
# at most 8 files.
#
# Without CUDA it prints one line saying it needs a CUDA GPU and exits 2, unless GPU_CHECK_DRY_RUN=1: then every
# part runs on the CPU at the smallest sizes (Triton tests under TRITON_INTERPRET=1, subsets picked with -k; the
# tiny embedded model instead of the 1.5B one), to test this script's plumbing (tests/test_benchmarks.py).
#
# Environment: PYTHON (default python3), OUT, GPU_CHECK_DRY_RUN, GPU_CHECK_BUDGET_S (default 540; dry run 1080,
# its budgets doubled), GPU_CHECK_INSTALL (auto: nothing if this checkout already imports, else pip, else
# PYTHONPATH; pip: pip even if it imports, else PYTHONPATH; path: PYTHONPATH, no pip), GPU_CHECK_PARTS (e.g.
# "rollout e2e": only those parts; install always runs), TREERPO_CACHE.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
[[ "$DRY" == 1 ]] || DRY=0

# ---- refuse a machine without CUDA before writing anything ----------------------------------------------------------
if [[ $DRY == 0 ]]; then
    cuda_line=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no torch.cuda device (torch " + torch.__version__ + ")")' 2>&1 | tail -1)
    if [[ "$cuda_line" != yes ]]; then
        echo "gpu_check.sh needs a CUDA GPU: $cuda_line; nothing was run (GPU_CHECK_DRY_RUN=1 runs its parts on the CPU at toy sizes)"
        exit 2
    fi
    if [[ -n "${TRITON_INTERPRET:-}" ]]; then
        echo "note: TRITON_INTERPRET=$TRITON_INTERPRET was set; unset for this check (the kernels run compiled)"
    fi
    unset TRITON_INTERPRET
else
    export CUDA_VISIBLE_DEVICES=""  # the dry run is CPU only, even on a machine with a GPU
fi

OUTDIR=${OUT:-$REPO/benchmarks/results/gpu_check}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ $DRY == 1 ]] && echo 1080 || echo 540)}
SLOW=$([[ $DRY == 1 ]] && echo 2 || echo 1)  # the dry run's budgets are doubled (a small CPU, the interpreter)
# seconds each part may take (times SLOW); random_model runs on the CPU beside the GPU parts and is not summed
declare -A BUDGETS=([correctness]=60 [triton_kernels]=60 [paged_cascade]=30 [arch_bf16]=50 [attention]=70
    [rollout]=75 [draw]=25 [e2e]=120 [kernel_check]=60 [arch_matrix]=120 [random_model]=150)
DEFAULT_PARTS="correctness triton_kernels paged_cascade arch_bf16 random_model attention rollout draw"
INSTALL_BUDGET=60
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

PARTS=()
declare -A STATUS SECS NOTE
record() {  # name status seconds [note]
    PARTS+=("$1"); STATUS[$1]=$2; SECS[$1]=$3; NOTE[$1]=${4:-}
    echo "=== [$1] $2 in $3 s${4:+ ($4)}"
    write_summary
}
write_summary() {  # summary.json rewritten after every part, so a check cut short keeps what it measured
    [[ -n "${IN_BACKGROUND:-}" ]] && return  # a background part's subshell: the main shell writes it when collected
    local name
    for name in "${PARTS[@]}"; do printf '%s\t%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" "${NOTE[$name]}"; done |
        "$PY" -c 'import json, sys
rows = [dict(zip(("part", "status", "seconds", "note"), l.rstrip("\n").split("\t"))) for l in sys.stdin if l.strip()]
for r in rows: r["seconds"] = float(r["seconds"])
json.dump({"dry_run": sys.argv[2] == "1", "install": sys.argv[3], "native": sys.argv[4], "budget_s": float(sys.argv[5]), "planned_s": float(sys.argv[6]), "failed": any(r["status"] in ("FAIL", "TIMEOUT") for r in rows), "parts": rows}, open(sys.argv[1], "w"), indent=1)' \
        "$OUTDIR/summary.json" "$DRY" "${INSTALL_MODE:-}" "${NATIVE:-}" "$BUDGET" "${PLANNED:-0}"
}

# which of the given Python files (tests or scripts) have all their imports: prints the runnable ones, and a
# "skip FILE: needs ..." line (to stderr) for each of the others
have_imports() {
    "$PY" - "$@" <<'PYEOF'
import ast, importlib.util, sys
from pathlib import Path

def missing(path, seen):
    if path in seen:
        return set()
    seen.add(path)
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            local = path.parent / f"{top}.py"
            if top in ("treerpo", "__future__"):
                continue
            if local.exists():
                out |= missing(local, seen)
            elif importlib.util.find_spec(top) is None:
                out.add(top)
    return out

for arg in sys.argv[1:]:
    gone = sorted(missing(Path(arg), set()) | ({"pytest"} if Path(arg).name.startswith("test_") and importlib.util.find_spec("pytest") is None else set()))
    if gone:
        print(f"skip {arg}: needs {', '.join(gone)} (not installed here)", file=sys.stderr)
    else:
        print(arg)
PYEOF
}

# run one part: name, timeout in seconds, then the command (run with `timeout`; env settings via `env`)
wanted() {  # GPU_CHECK_PARTS="install rollout ...": only these parts (install always runs); else DEFAULT_PARTS
    [[ " ${GPU_CHECK_PARTS:-$DEFAULT_PARTS} " == *" $1 "* ]]
}

plan() {  # the wanted parts' budgets (the background random_model aside): refuse a plan over 80% of the budget
    local part sum=$INSTALL_BUDGET
    for part in "${!BUDGETS[@]}"; do
        [[ $part == random_model ]] && continue
        wanted "$part" && sum=$(( sum + BUDGETS[$part] ))
    done
    PLANNED=$(( sum * SLOW ))
    echo "plan: parts budgeted ${PLANNED} s of ${BUDGET} s ($(( 100 * PLANNED / BUDGET ))%; at most 80%)"
    if (( PLANNED * 5 > BUDGET * 4 )); then
        echo "gpu_check.sh: the planned parts need ${PLANNED} s, more than 80% of GPU_CHECK_BUDGET_S=${BUDGET}; raise it or name fewer parts in GPU_CHECK_PARTS"
        return 1
    fi
}

run_part() {  # name command...: run with `timeout` at the part's budget (env settings via `env`)
    local name=$1 limit=$(( ${BUDGETS[$1]} * SLOW ))
    shift
    wanted "$name" || { record "$name" SKIP 0 "not planned (name it in GPU_CHECK_PARTS)"; return; }
    local left
    left=$(awk -v d="$DEADLINE" -v n="$(now)" 'BEGIN { printf "%d", d - n }')
    if (( left < 20 )); then
        record "$name" SKIP 0 "the ${BUDGET} s budget is spent"
        return
    fi
    (( limit > left )) && limit=$left
    echo
    echo "=== [$name] timeout ${limit} s: $(printf '%q ' "$@")"
    local t0 rc
    t0=$(now)
    timeout -k 10 "$limit" "$@" < /dev/null
    rc=$?
    case $rc in
        0) record "$name" PASS "$(since "$t0")" ;;
        124|137) record "$name" TIMEOUT "$(since "$t0")" "past ${limit} s" ;;
        *) record "$name" FAIL "$(since "$t0")" "exit $rc" ;;
    esac
}

# run the pytest part `name` over the test files whose imports are present (others skipped with a line)
pytest_part() {  # name "env settings" files... [-- pytest args]
    local name=$1 envs=$2
    shift 2
    local files=() extra=()
    while (( $# )); do
        if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
        files+=("$1"); shift
    done
    local ok
    ok=$(have_imports "${files[@]}")
    if [[ -z "$ok" ]]; then
        record "$name" SKIP 0 "missing imports (see the skip lines)"
        return
    fi
    # shellcheck disable=SC2086
    run_part "$name" env $envs "$PY" -m pytest -q -p no:cacheprovider $ok "${extra[@]}"
}

script_part() {  # name script args...
    local name=$1 script=$2
    shift 2
    if [[ -z "$(have_imports "$script")" ]]; then
        record "$name" SKIP 0 "missing imports of $script"
        return
    fi
    run_part "$name" "$PY" "$script" "$@"
}

# run a part in the background: its output goes to $WORK/NAME.out and is shown when it is collected
BG=()
bg_part() {  # fn name args...
    local fn=$1 name=$2
    wanted "$name" || { record "$name" SKIP 0 "not planned (name it in GPU_CHECK_PARTS)"; return; }
    ( IN_BACKGROUND=1; "$fn" "$name" "${@:3}" > "$WORK/$name.out" 2>&1
      echo "${STATUS[$name]:-FAIL} ${SECS[$name]:-0} ${NOTE[$name]:-}" > "$WORK/$name.status" ) &
    BG+=("$name")
    echo "=== [$name] started beside the GPU tests (its output follows when it ends)"
}
collect_bg() {
    wait
    local name st sec note
    for name in "${BG[@]}"; do
        echo
        echo "----- output of [$name] -----"
        cat "$WORK/$name.out"
        if [[ -f "$WORK/$name.status" ]]; then
            read -r st sec note < "$WORK/$name.status"
        else
            st=FAIL; sec=0; note="no status"
        fi
        PARTS+=("$name"); STATUS[$name]=$st; SECS[$name]=$sec; NOTE[$name]=$note
    done
    BG=()
    write_summary
}

kernels_ok() {  # the benchmarks time the Triton kernels only once they are proven right here
    local part
    for part in correctness triton_kernels; do
        if [[ ${STATUS[$part]:-} == FAIL || ${STATUS[$part]:-} == TIMEOUT ]]; then
            record attention SKIP 0 "$part ${STATUS[$part]}: the kernels are not timed"
            return 1
        fi
    done
}

# ---- install -------------------------------------------------------------------------------------------------------
importable() {  # treerpo and treerpo.kernels import, from this checkout
    (cd / && "$PY" -c 'import os, sys, treerpo, treerpo.kernels
sys.exit(0 if os.path.realpath(treerpo.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)' "$REPO") 2>/dev/null
}
install_project() {
    local t0 mode=""
    t0=$(now)
    echo
    echo "=== [install] without downloads (GPU_CHECK_INSTALL=${GPU_CHECK_INSTALL:-auto})"
    if [[ ${GPU_CHECK_INSTALL:-auto} == path ]]; then
        echo "GPU_CHECK_INSTALL=path: no pip"
    elif [[ ${GPU_CHECK_INSTALL:-auto} == auto ]] && importable; then
        mode="already installed from this checkout"
    else
        # the C++ sources of treerpo._C compiled side by side: pybind11's ParallelCompile, switched on for the
        # pip call alone by a sitecustomize (setup.py does not call it)
        mkdir -p "$WORK/parallel"
        printf '%s\n' 'try:' '    from pybind11.setup_helpers import ParallelCompile' \
            '    ParallelCompile("NPY_NUM_BUILD_JOBS", default=0).install()' 'except Exception:' '    pass' \
            > "$WORK/parallel/sitecustomize.py"
        echo "pip install --no-deps --no-build-isolation --no-index -e . (C++ sources compiled in parallel)"
        if PYTHONPATH="$WORK/parallel${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 $(( INSTALL_BUDGET * SLOW )) "$PY" -m pip install -q \
                --no-deps --no-build-isolation --no-index -e . > "$WORK/pip.out" 2>&1 && importable; then
            mode="pip install --no-deps --no-build-isolation --no-index -e ."
        else
            echo "pip install failed or timed out; its last lines:"
            tail -5 "$WORK/pip.out"
        fi
    fi
    if [[ -z "$mode" ]]; then  # no install: the checkout on PYTHONPATH (treerpo/kernels links to kernels/)
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        if importable; then
            mode="no install: PYTHONPATH=<repo>"
        else
            record install FAIL "$(since "$t0")" "treerpo does not import even from PYTHONPATH"
            return
        fi
    fi
    NATIVE=$("$PY" -c 'import treerpo.trees.native as n; print("built" if n.HAVE_NATIVE else "not built: Python fallback")' 2>/dev/null || echo unknown)
    INSTALL_MODE=$mode
    record install PASS "$(since "$t0")" "$mode; treerpo._C $NATIVE"
}

main() {
    local t_start
    plan || return 2
    t_start=$(now)
    DEADLINE=$(awk -v t="$t_start" -v b="$BUDGET" 'BEGIN { printf "%.0f", t + b }')
    INSTALL_MODE="(not installed)"; NATIVE=unknown
    echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO; results in $OUTDIR; budget ${BUDGET} s$([[ $DRY == 1 ]] && echo '; DRY RUN on the CPU at toy sizes')"
    "$PY" - "$OUTDIR/environment.json" "$DRY" <<'PYEOF'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)" if sys.argv[2] == "1" else "none"}
for name in ("triton", "transformers", "numpy", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # missing, or broken
        info[name] = f"missing ({type(exc).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(capability=f"{p.major}.{p.minor}", memory_GiB=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
print(f"device: {info['device']}" + (f" (compute capability {info['capability']}, {info['memory_GiB']} GiB)" if "capability" in info else ""))
print("torch {torch} (CUDA {cuda}), triton {triton}, transformers {transformers}, numpy {numpy}, pytest {pytest}, python {python}".format(**info))
json.dump(info, open(sys.argv[1], "w"), indent=1)
PYEOF
    [[ $? == 0 ]] || record environment FAIL 0 "torch does not import"

    install_project

    local T=tests
    local K=$T/test_triton_tree_attention.py P=$T/test_triton_paged_decode.py C=$T/test_tile_configs.py
    local F="$T/test_fused_layers.py $T/test_fused_draw.py"
    local errors="GPU_CHECK_ERRORS_JSON=$OUTDIR/correctness.json"
    if [[ $DRY == 1 ]]; then  # toy sizes on the CPU
        local k_triton="test_matches_sdpa_gqa and fan-torch.float32 or test_plain_kernel_matches_reference and 1-2-2-16-1-torch.float32 or test_bad_shapes_refused or test_parse_tiles or test_fused_draw_is_the_fp64_inverse_cdf and 1.0 or test_rope_is_the_llama_function and float32-1"
        bg_part run_part random_model "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from e2e_random_model import _tokenizer; t = _tokenizer(); print('dry run: the 1.5B random model is not made; its tokenizer has', len(t), 'tokens')"
        pytest_part correctness "TREERPO_PRODUCTION_SHAPES=toy $errors" $T/test_triton_production_shapes.py -- -k "qwen or gqa6"
        pytest_part triton_kernels "TRITON_INTERPRET=1" $K $P $C $F -- -k "$k_triton"
        pytest_part paged_cascade "" $T/test_paged_cascade.py -- -k "not smollm2"
        pytest_part arch_bf16 "" $T/test_architecture_matrix_bf16.py -- -k "qwen2 and not window"
        pytest_part kernel_check "" $T/test_kernel_check.py
        pytest_part arch_matrix "" $T/test_architecture_matrix.py -- -k "qwen2 and not window"
        kernels_ok && script_part attention benchmarks/attention.py --quick --json "$OUTDIR/attention.json"
        collect_bg
        script_part rollout benchmarks/rollout.py --model tiny --prompts 2 --segment-tokens 4 --repeats 1 --matmul-repeats 2 --compile --json "$OUTDIR/rollout.json"
        script_part draw benchmarks/draw.py --rows 64 --vocab 1000 --repeats 1 --json "$OUTDIR/draw.json"
        script_part e2e benchmarks/e2e.py --preset tiny --systems treerpo --seeds 0 --steps 1 --timeout 150 --out "$WORK/e2e" --json "$OUTDIR/e2e.json"
    else
        bg_part run_part random_model "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from e2e_random_model import random_qwen2_dir; print('random 1.5B model:', random_qwen2_dir())"
        pytest_part correctness "$errors" $T/test_triton_production_shapes.py
        pytest_part triton_kernels "" $K $P $C $F
        pytest_part paged_cascade "" $T/test_paged_cascade.py
        pytest_part arch_bf16 "" $T/test_architecture_matrix_bf16.py
        pytest_part kernel_check "" $T/test_kernel_check.py
        pytest_part arch_matrix "" $T/test_architecture_matrix.py
        kernels_ok && script_part attention benchmarks/attention.py --heads 12 --kv-heads 2 --head-dim 128 --sizes 2048 8192 32768 --repeats 3 --json "$OUTDIR/attention.json"
        collect_bg
        if [[ ${STATUS[random_model]:-SKIP} != FAIL && ${STATUS[random_model]:-SKIP} != TIMEOUT ]]; then  # SKIP: made on first use
            script_part rollout benchmarks/rollout.py --model random-qwen2-1.5b --prompts 8 --branching 4 2 2 --segment-tokens 32 --repeats 1 --compile --json "$OUTDIR/rollout.json"
            script_part e2e benchmarks/e2e.py --preset qwen1.5b --systems treerpo grpo --seeds 0 --steps 1 --timeout 110 --out "$WORK/e2e" --json "$OUTDIR/e2e.json"
        else
            record rollout SKIP 0 "the random 1.5B model could not be made"
            wanted e2e && record e2e SKIP 0 "the random 1.5B model could not be made"
        fi
        script_part draw benchmarks/draw.py --rows 4096 32768 --vocab 151936 --hidden 1536 --max-memory-gib 40 --repeats 2 --json "$OUTDIR/draw.json"
    fi

    # ---- summary ---------------------------------------------------------------------------------------------------
    local failed=0 name
    echo
    echo "=== summary ($(since "$t_start") s in all; install: $INSTALL_MODE; treerpo._C $NATIVE)"
    printf '%-15s %-8s %8s  %s\n' part status seconds note
    for name in "${PARTS[@]}"; do
        printf '%-15s %-8s %8s  %s\n' "$name" "${STATUS[$name]}" "${SECS[$name]}" "${NOTE[$name]}"
        [[ ${STATUS[$name]} == FAIL || ${STATUS[$name]} == TIMEOUT ]] && failed=1
    done
    write_summary
    echo "results: $(cd "$OUTDIR" && ls | tr '\n' ' ')in $OUTDIR"
    rm -rf "$WORK"
    return $failed
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
