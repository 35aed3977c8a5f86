#!/usr/bin/env bash
# The issue-4 quality sweep on the GPU machine (SmolLM2-135M-Instruct, bf16): needle 1K-8K x 10 depths and the
# RULER-style tasks at 4K and 8K for every method at budgets 128/256/512/1024, plus 16K self_extend vs plain RoPE.
#   scripts/gpu_sweep.sh MODEL.gguf OUT_DIR [part]    part: needle | ruler | extend | all (default all)
# Decoding uses slack=32 (rows may grow 32 tokens past the budget while answering; prefill eviction is exact).
set -euo pipefail
model=$1; out=$2; part=${3:-all}
specs="full; int8; int4"
for b in 128 256 512 1024; do
  s="uniform(tokens=$b,slack=32)"
  specs+="; retain=streamingllm budget=$s; retain=h2o budget=$s; retain=tova budget=$s; retain=snapkv budget=$s"
  specs+="; retain=snapkv budget=pyramid(tokens=$b,slack=32); retain=snapkv budget=adaptive(tokens=$b,slack=32)"
done
common=(--model "$model" --device cuda --dtype bf16 --samples 1 --out "$out" --haystack "${HAYSTACK:-../shared/data/corpora}")
[ -d "${HAYSTACK:-../shared/data/corpora}" ] || common=(--model "$model" --device cuda --dtype bf16 --samples 1 --out "$out")
if [ "$part" = needle ] || [ "$part" = all ]; then
  ${LONGCTX:-python3 -m longctx.cli} eval run "${common[@]}" --tasks needle --kv "$specs" --lengths 1024,2048,4096,8000
fi
if [ "$part" = ruler ] || [ "$part" = all ]; then
  ${LONGCTX:-python3 -m longctx.cli} eval run "${common[@]}" --tasks ruler --kv "$specs" --lengths 4096,8000
fi
if [ "$part" = extend ] || [ "$part" = all ]; then
  LONGCTX_ALLOW_BEYOND_CONTEXT=1 ${LONGCTX:-python3 -m longctx.cli} eval run "${common[@]}" --tasks needle \
    --kv "full; positions=self_extend(group=4,window=1024)" --lengths 16000
fi
