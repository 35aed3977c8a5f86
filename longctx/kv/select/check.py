"""GPU checks of the select axis (run by ``scripts/gpu_check.py`` on the GPU machine).

For every registered select method on random paged rows (B sequences, GQA, ragged lengths, shuffled pool blocks):
the selection made on CUDA equals the selection made on CPU from the same inputs (integer-valued queries and
keys, so scores are exact in fp32 and ties are real ties), and the attention output on CUDA (the Triton
selected-blocks kernel for block selections) is close to the torch twin on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.engine.fast_decode import paged_decode_torch
from longctx.kv.registry import methods
from longctx.kv.select.attend import attend_selection
from longctx.kv.select.base import PagedRows, SelectState
from longctx.kv.select.summaries import block_summaries_dense

# small budgets so every method really narrows what it reads at these lengths
PARAMS = {"quest": {"tokens": 256, "dense_layers": 0}, "sparq": {"tokens": 256}, "tokenselect": {"tokens": 256},
          "tidaldecode": {"tokens": 256}, "recycled": {"tokens": 256}, "lsh_sampling": {}}


def make_rows(bsz: int, h: int, d: int, bs: int, max_len: int, dtype: torch.dtype, device: str,
              seed: int = 0) -> tuple[Tensor, PagedRows]:
    g = torch.Generator().manual_seed(seed)
    cap = -(-max_len // bs)
    num_blocks = bsz * h * cap + 1
    k = torch.randint(-3, 4, (num_blocks, bs, d), generator=g).to(dtype)
    v = torch.randn(num_blocks, bs, d, generator=g).to(dtype)
    pos = torch.arange(bs).repeat(num_blocks, 1)
    perm = torch.randperm(num_blocks - 1, generator=g)[: bsz * h * cap] + 1  # block 0 is the null block
    tables = perm.view(bsz, h, cap)
    lengths = torch.randint(max_len // 2, max_len + 1, (bsz, h), generator=g)
    for b in range(bsz):
        for hh in range(h):
            pos[tables[b, hh]] = torch.arange(cap * bs).view(cap, bs)
    q = torch.randint(-2, 3, (bsz, h * 4, d), generator=g).to(dtype)
    counts = (lengths[:, :, None] - torch.arange(cap) * bs).clamp(0, bs)
    summ = torch.zeros(num_blocks, 2, d, dtype=dtype)
    summ[tables.reshape(-1)] = block_summaries_dense(k[tables.reshape(-1)], counts.reshape(-1))
    rows = PagedRows(k, v, pos, tables, lengths, summ)
    return q.to(device), _to(rows, device)


def _to(rows: PagedRows, device: str) -> PagedRows:
    return PagedRows(*(t.to(device) for t in (rows.k, rows.v, rows.pos, rows.block_tables, rows.lengths)),
                     rows.summaries.to(device) if rows.summaries is not None else None)


def _same(a, b) -> bool:  # noqa: ANN001
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.cpu(), b.cpu())


def check_method(name: str, dtype: torch.dtype, bsz: int = 4, h: int = 4, d: int = 64, bs: int = 16,
                 max_len: int = 2048, device: str = "cuda") -> tuple[str, bool, str]:
    cls = methods("select")[name]
    policy = cls(**PARAMS.get(name, {}))
    q, rows = make_rows(bsz, h, d, bs, max_len, dtype, "cpu")
    qc, rows_c = q.to(device), _to(rows, device)
    layer = 3
    st_cpu = SelectState([{} for _ in range(bsz)], {}, [0] * bsz, 8)
    st_gpu = SelectState([{} for _ in range(bsz)], {}, [0] * bsz, 8)
    sel_cpu = policy.select(layer, q, rows, st_cpu)
    sel_gpu = policy.select(layer, qc, rows_c, st_gpu)
    if (sel_cpu is None) != (sel_gpu is None):
        return f"select {name} {dtype}", False, "one device selected, the other read everything"
    same = sel_cpu is None or all(_same(getattr(sel_cpu, f), getattr(sel_gpu, f))
                                  for f in ("blocks", "num_blocks", "tokens"))
    scale = d**-0.5
    out_cpu = attend_selection(q.float(), _to(rows, "cpu"), sel_cpu, scale, None, paged_decode_torch)
    out_gpu = attend_selection(qc, rows_c, sel_gpu, scale, None, paged_decode_torch).float().cpu()
    diff = (out_cpu.float() - out_gpu).abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    ok = same and diff < tol
    return f"select {name} {str(dtype).removeprefix('torch.')}", ok, f"selection equal {same}, max out diff {diff:.2e}"


def check_quest_bound(dtype: torch.dtype, device: str = "cuda") -> tuple[str, bool, str]:
    """The page-bound kernel against its torch twin on random (non-integer) rows."""
    from longctx.attention.triton.quest_bound import quest_bound, quest_bound_ref  # noqa: PLC0415

    q, rows = make_rows(3, 8, 128, 16, 4096, dtype, "cpu", seed=4)
    q = q + torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    ref = quest_bound_ref(q.float(), rows.summaries.float(), rows.block_tables, rows.lengths, 16)
    got = quest_bound(q.to(device), rows.summaries.to(device), rows.block_tables.to(device).to(torch.int32),
                      rows.lengths.to(device).to(torch.int32), 16).cpu()
    same_inf = torch.equal(torch.isinf(ref), torch.isinf(got))
    fin = ~torch.isinf(ref)
    diff = (ref[fin] - got[fin]).abs().max().item() / max(ref[fin].abs().max().item(), 1.0)
    ok = same_inf and diff < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    return f"quest bound kernel {str(dtype).removeprefix('torch.')}", ok, f"masks equal {same_inf}, rel diff {diff:.2e}"


def check_top_pages(n: int, k: int, device: str = "cuda") -> tuple[str, bool, str]:
    """The page-choice kernel against its twin on bounds full of ties, with forced (+inf) and absent (-inf)
    blocks: the same blocks in the same order, the same counts, the same bytes added."""
    from longctx.attention.triton.top_pages import split_count, top_pages, top_pages_ref  # noqa: PLC0415

    g = torch.Generator().manual_seed(n + k)
    bsz, h, bs = 2, 4, 16
    lengths = torch.randint(1, n * bs + 1, (bsz, h), generator=g)
    lengths[0, 0] = n * bs  # a full table
    lengths[1, 1] = bs  # one block: fewer than every k checked
    bound = torch.randint(-4, 5, (bsz, h, n), generator=g).float() / 2  # few values: ties everywhere
    bound[0, 1] = -0.0  # every block tied (and -0.0 == 0.0)
    nblk = (lengths + bs - 1) // bs
    j = torch.arange(n)[None, None, :]
    bound = bound.masked_fill(j >= nblk[:, :, None], float("-inf"))
    bound = bound.masked_fill((j == 0) | (j == nblk[:, :, None] - 1), float("inf"))
    acc_ref = torch.full((bsz, h), 7, dtype=torch.int64)
    ref = top_pages_ref(bound, lengths, k, bs, acc_ref, token_bytes=512, block_bytes=256)
    acc = acc_ref.new_full((bsz, h), 7).to(device)
    got = top_pages(bound.to(device), lengths.to(device).to(torch.int32), k, bs, acc, token_bytes=512,
                    block_bytes=256)
    same = [torch.equal(a.cpu(), b.cpu()) for a, b in (*zip(ref, got, strict=True), (acc_ref, acc))]
    chunks = split_count(bsz * h, n, k)
    return f"quest top pages kernel n={n} k={k} chunks={chunks}", all(same), f"blocks / counts / bytes equal {same}"


def check_summary_update(dtype: torch.dtype, device: str = "cuda") -> tuple[str, bool, str]:
    """The decode step's summary write (one kernel on CUDA) against the direct computation: exact."""
    from types import SimpleNamespace  # noqa: PLC0415

    from longctx.kv.select.summaries import update_written  # noqa: PLC0415

    g = torch.Generator().manual_seed(11)
    k = torch.randn(64, 16, 128, generator=g).to(dtype)
    slots = (torch.randperm(63, generator=g)[:20] + 1) * 16 + torch.randint(0, 16, (20,), generator=g)
    pool = SimpleNamespace(k=k.to(device), block_size=16, summary=torch.zeros(64, 2, 128, dtype=dtype, device=device))
    update_written(pool, slots.to(device))
    blocks = slots // 16
    ref = block_summaries_dense(k[blocks], slots % 16 + 1)
    ok = torch.equal(pool.summary.cpu()[blocks], ref)
    return f"block summary update {str(dtype).removeprefix('torch.')}", ok, f"exact {ok}"


def check_refresh_rows(dtype: torch.dtype, device: str = "cuda") -> tuple[str, bool, str]:
    """Refreshing whole rows (one kernel over every layer on CUDA) against the per-layer twin on CPU: exact,
    the null block stays zero, blocks outside the rows keep their summary."""
    from types import SimpleNamespace  # noqa: PLC0415

    from longctx.kv.select.summaries import refresh_rows  # noqa: PLC0415

    g = torch.Generator().manual_seed(12)
    num_layers, h, cap, bs = 3, 4, 40, 16
    k = torch.randn(num_layers * h * cap + 9, bs, 128, generator=g).to(dtype)
    tables = (torch.randperm(k.shape[0] - 1, generator=g)[: num_layers * h * cap] + 1).view(num_layers, h, cap)
    lengths = torch.randint(1, cap * bs + 1, (num_layers, h), generator=g)
    before = torch.randn(k.shape[0], 2, 128, generator=g).to(dtype)
    pools = [SimpleNamespace(k=k.to(dev), block_size=bs, summary=before.clone().to(dev)) for dev in ("cpu", device)]
    for pool in pools:
        refresh_rows(pool, tables.to(pool.k.device), lengths.to(pool.k.device))
    ok = torch.equal(pools[0].summary, pools[1].summary.cpu())
    return f"block summary refresh {str(dtype).removeprefix('torch.')}", ok, f"equal to the CPU twin {ok}"


def run_all(device: str = "cuda") -> list[tuple[str, bool, str]]:
    out = [check(dtype, device) for check in (check_quest_bound, check_summary_update, check_refresh_rows)
           for dtype in (torch.float32, torch.bfloat16)]
    sizes = ((16, 2), (100, 7), (2048, 256), (8192, 256), (12000, 999), (40000, 300))  # the last three split rows
    out += [check_top_pages(n, k, device) for n, k in sizes]
    for name in sorted(methods("select")):
        if name == "all":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            out.append(check_method(name, dtype, device=device))
    return out
