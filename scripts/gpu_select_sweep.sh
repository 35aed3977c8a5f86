#!/usr/bin/env bash
# The select-axis quality sweep (issue 12) on the GPU machine (SmolLM2-135M-Instruct, bf16): needle 1K-8K x 10
# depths and the RULER-style tasks at 4K and 8K; every select method at 256 / 512 / 1024 tokens *read* per step,
# next to snapkv at the same number of tokens *held* (exact eviction, slack 0) and the full cache.
#   scripts/gpu_select_sweep.sh MODEL.gguf OUT_DIR [part]    part: needle | ruler | all (default all)
set -euo pipefail
model=$1; out=$2; part=${3:-all}
specs="full; select=lsh_sampling"
for t in 256 512 1024; do
  specs+="; snapkv:$t"
  for m in quest sparq tokenselect tidaldecode recycled; do specs+="; select=${m}(tokens=$t)"; done
done
hay=${HAYSTACK:-../shared/data/corpora}
common=(--model "$model" --device cuda --dtype bf16 --samples 1 --out "$out")
[ -d "$hay" ] && common+=(--haystack "$hay")
if [ "$part" = needle ] || [ "$part" = all ]; then
  ${LONGCTX:-python3 -m longctx.cli} eval run "${common[@]}" --tasks needle --kv "$specs" --lengths 1024,2048,4096,8000 --quiet
fi
if [ "$part" = ruler ] || [ "$part" = all ]; then
  ${LONGCTX:-python3 -m longctx.cli} eval run "${common[@]}" --tasks ruler --kv "$specs" --lengths 4096,8000 --quiet
fi
