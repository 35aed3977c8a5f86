"""``longctx demo``: the main job on the built-in default model.

Hides a code word in a few thousand tokens of Jane Austen, asks SmolLM2-135M-
Instruct for it with the full KV cache and with two compressed caches, and
prints a side-by-side table: answer, right or wrong, KV bytes actually held,
and time.
"""

from __future__ import annotations

import time

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.eval.needle import build_needle_prompt, is_correct

DEMO_SPECS = ("full", "snapkv:512", "streamingllm:512")
NEEDLE = "The secret code word is 'saffron'."
QUESTION = "What is the secret code word mentioned in the text above? Answer with one word."
ANSWER = "saffron"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run_demo(model: str | None = None, device: str = "cpu", dtype: str = "fp32", tokens: int = 2000,
             depth: float = 0.5, specs: tuple[str, ...] = DEMO_SPECS, max_kv_bytes: int = 8 << 30) -> int:
    from longctx.model.default_model import default_model_path  # noqa: PLC0415

    path = model or str(default_model_path())
    print(f"loading {path} ({device}, {dtype}) ...", flush=True)
    llm = LLM(path, device=device, dtype=dtype, max_kv_bytes=max_kv_bytes)
    prompt = build_needle_prompt(llm.tokenizer, tokens, depth, needle=NEEDLE, question=QUESTION, answer=ANSWER)
    print(f"haystack: {prompt.haystack_tokens} tokens of Jane Austen's Persuasion; "
          f"code word hidden at {depth:.0%} depth (token {prompt.needle_token_offset})")
    print(f"question: {QUESTION!r} (expected {ANSWER})\n", flush=True)
    rows = []
    for spec in specs:
        start = time.perf_counter()
        out = llm.generate([prompt.text], SamplingParams(max_tokens=20), kv=spec, chat=True)[0]
        elapsed = time.perf_counter() - start
        ok = is_correct(out.text, ANSWER)
        rows.append((spec, out.text.strip().replace("\n", " ")[-40:], ok, out.stats, elapsed))
        print(f"  {spec:<20} -> {out.text.strip()[-60:]!r} ({'right' if ok else 'wrong'}, {elapsed:.1f} s)", flush=True)
    full_bytes = next((s.kv_bytes_held for spec, _, _, s, _ in rows if spec == "full"), None)
    print()
    header = f"{'method':<20} {'answer':<40} {'right':<6} {'KV held':>10} {'vs full':>8} {'prompt':>7} {'time':>7}"
    print(header)
    print("-" * len(header))
    for spec, text, ok, stats, elapsed in rows:
        ratio = f"{stats.kv_bytes_held / full_bytes:.0%}" if full_bytes else "-"
        print(f"{spec:<20} {text:<40} {'yes' if ok else 'no':<6} {_mib(stats.kv_bytes_held):>10} {ratio:>8} "
              f"{stats.prompt_tokens:>7} {elapsed:>6.1f}s")
    print("\nKV held = bytes of K/V blocks the request's rows really hold in the pool at the end of generation.")
    print("Try your own: longctx generate --model PATH --prompt-file FILE --chat --kv 'snapkv:512' --stats")
    return 0 if rows and rows[0][2] else 1
