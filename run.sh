#!/usr/bin/env bash
# One entry point for a fresh machine with only Python and gcc:
#   bash run.sh train [flags...]   set up .venv if needed, then python -m treerpo.train
#   bash run.sh test  [args...]    set up .venv if needed, then the test suite
#   bash run.sh eval  [flags...]   set up .venv if needed, then python -m treerpo.evaluate
#   bash run.sh bench [flags...]   set up .venv if needed, then python benchmarks/e2e.py
#   bash run.sh setup              set up (or refresh) .venv only
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TREERPO_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.treerpo-setup"
want=$(cat setup.py constraints.txt pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -c1-16)

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: an unpinned torch pulled in by another package brings gigabytes of CUDA
    "$VENV/bin/python" -m pip install -q -c constraints.txt torch
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; exec "$VENV/bin/python" -m treerpo.train "$@" ;;
  eval) setup; exec "$VENV/bin/python" -m treerpo.evaluate "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  bench) setup; exec "$VENV/bin/python" benchmarks/e2e.py "$@" ;;
  *) echo "usage: bash run.sh {train|test|eval|bench|setup} [args...]" >&2; exit 2 ;;
esac
