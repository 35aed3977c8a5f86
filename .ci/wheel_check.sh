#!/usr/bin/env bash
# CI: build the wheel, install it (not editable, no extras) into a clean venv and run what a new user
# runs first: `longctx demo`, a short `eval run` and `eval report`, from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$WORK/venv/bin/python" -m pip install -q "torch==2.13.0" 2>/dev/null \
  || "$WORK/venv/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
"$WORK/venv/bin/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
"$WORK/venv/bin/python" -m pip install -q "$WORK"/dist/longctx-*.whl
cd "$WORK"  # no source tree on the path: the installed wheel must carry everything
"$WORK/venv/bin/python" -c "import longctx; from longctx import LLM, SamplingParams; print('import ok', longctx.__version__)"
"$WORK/venv/bin/longctx" demo
"$WORK/venv/bin/longctx" eval run --tasks needle --kv "full; snapkv:256" --lengths 1k --samples 1 --out "$WORK/eval" --quiet
"$WORK/venv/bin/longctx" eval report "$WORK/eval"
test -s "$WORK/eval/report/index.html"
echo "wheel check passed"
