#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch on machines without a GPU) and runs a job.
#   ./run.sh demo        set up, then run the main job (`longctx demo`) on the built-in default model
#   ./run.sh test        set up, then run the whole CPU test suite
#   ./run.sh setup       only set up
#   ./run.sh longctx ... set up, then run any longctx command
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LONGCTX_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.longctx-setup"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      # The CPU build; a plain `pip install torch` would pull a multi-GB CUDA build.
      "$VENV/bin/python" -m pip install -q "torch==2.13.0" 2>/dev/null \
        || "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/longctx" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  longctx) setup; exec "$VENV/bin/longctx" "$@" ;;
  *) echo "usage: ./run.sh [demo|test|setup|longctx ARGS...]" >&2; exit 2 ;;
esac
