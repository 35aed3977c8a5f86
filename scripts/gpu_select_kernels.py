"""Per-layer cost of Quest's kernels on the GPU at the 8B shape's row layout (8 kv-heads, 4 query heads each,
head dim 128, block size 16) for a given context and batch.

    python scripts/gpu_select_kernels.py [--contexts 32k,128k] [--batch 1] [--tokens 4096] [--sweep]

Prints microseconds per launch (each captured alone in a CUDA graph: GPU time, no launch overhead) of: the
summary write, the page bound, the page choice (top_pages), the selected-blocks decode attention, the full-row
decode attention (for comparison), and the per-layer sequence in one graph; plus the bytes each reads and the
implied bandwidth. Attribution, not a benchmark of the step. ``--sweep`` also times the bound kernel's launch
shapes (blocks per program x warps), the page choice with each chunk split, and the whole-row summary refresh
after a prefill (every layer of a 32-layer model).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from longctx.attention.triton.paged_decode import paged_decode_attention
from longctx.attention.triton.quest_bound import quest_bound, update_block_summaries
from longctx.attention.triton.top_pages import MAX_BLOCKS, split_count, top_pages
from longctx.kv.select.summaries import refresh_rows


def _time(fn, reps: int = 50) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def _graph_time(fn, reps: int = 50) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return _time(g.replay, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32k,128k")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="also time launch shapes and the whole-row refresh")
    args = ap.parse_args()
    for text in args.contexts.split(","):
        ctx = int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)
        probe(ctx, args.batch, args.tokens, args.sweep)


def probe(ctx: int, b: int, tokens: int, sweep: bool = False) -> None:
    h, g, d, bs = 8, 4, 128, 16
    dev, dt = "cuda", torch.bfloat16
    cap = ctx // bs + 1
    nblocks = b * h * cap + 1
    k = torch.randn(nblocks, bs, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    summary = torch.randn(nblocks, 2, d, device=dev, dtype=dt)
    tables = (torch.randperm(nblocks - 1, device=dev)[: b * h * cap] + 1).view(b, h, cap).to(torch.int32)
    lengths = torch.full((b, h), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, h * g, d, device=dev, dtype=dt)
    slots = (tables[:, :, -1].reshape(-1).long() * bs)
    acc = torch.zeros(b, h, dtype=torch.int64, device=dev)
    k_sel = tokens // bs
    bound = quest_bound(q, summary, tables, lengths, bs, force_ends=True)
    blocks, num = top_pages(bound, lengths, k_sel, bs, acc, 512, 512)
    scale = d**-0.5

    def write() -> None:
        update_block_summaries(k, summary, slots)

    def bound_fn() -> None:
        quest_bound(q, summary, tables, lengths, bs, force_ends=True)

    def choose() -> None:
        top_pages(bound, lengths, k_sel, bs, acc, 512, 512)

    def attend_sel() -> None:
        paged_decode_attention(q, k, v, tables, lengths, scale, selected_blocks=blocks, num_selected=num)

    def attend_full() -> None:
        paged_decode_attention(q, k, v, tables, lengths, scale)

    def layer() -> None:
        write()
        bd = quest_bound(q, summary, tables, lengths, bs, force_ends=True)
        bl, nm = top_pages(bd, lengths, k_sel, bs, acc, 512, 512)
        paged_decode_attention(q, k, v, tables, lengths, scale, selected_blocks=bl, num_selected=nm)

    el = k.element_size()
    reads = {"summary write": b * h * bs * d * el, "page bound": b * h * cap * 2 * d * el,
             "page choice": b * h * cap * 4, "attend selected": b * h * tokens * 2 * d * el,
             "attend full row": b * h * ctx * 2 * d * el, "layer (graph)": None}
    print(f"ctx {ctx} batch {b} tokens {tokens} ({cap} blocks per row)")
    for name, fn in (("summary write", write), ("page bound", bound_fn), ("page choice", choose),
                     ("attend selected", attend_sel), ("attend full row", attend_full), ("layer (graph)", layer)):
        us = _graph_time(fn)  # one launch captured: GPU time without the host's launch overhead
        nbytes = reads[name]
        bw = f"  {nbytes / us / 1e6:7.2f} TB/s over {nbytes / 2**20:8.2f} MiB" if nbytes else ""
        print(f"  {name:<18} {us:9.1f} us{bw}", flush=True)
    if not sweep:
        return
    nbytes = reads["page bound"]
    for bj in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            us = _graph_time(lambda bj=bj, w=warps: quest_bound(q, summary, tables, lengths, bs, True, bj, w))
            print(f"  bound block_j={bj:<4} warps={warps}  {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)
    auto = split_count(b * h, cap, k_sel)
    for chunks in sorted({1, 2, 4, 8, 16, 32, auto}):
        if max(chunks * k_sel, -(-cap // chunks)) > MAX_BLOCKS or chunks * 4 * k_sel > 4 * cap:
            continue
        us = _graph_time(lambda c=chunks: top_pages(bound, lengths, k_sel, bs, acc, 512, 512, chunks=c))
        print(f"  page choice chunks={chunks:<3}{' (auto)' if chunks == auto else '       '} {us:8.1f} us", flush=True)
    layers = 32
    big_tables = torch.cat([tables] * layers)  # [32 * b, H, cap]: every layer's rows
    lens = torch.cat([lengths] * layers)
    pool = SimpleNamespace(k=k, block_size=bs, summary=summary)
    us = _graph_time(lambda: refresh_rows(pool, big_tables, lens), reps=5)
    nbytes = layers * b * h * ctx * d * el
    print(f"  refresh rows, {layers} layers  {us / 1e3:8.2f} ms  {nbytes / us / 1e6:5.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
