"""The twin of Quest's page-choice kernel (``attention.triton.top_pages``) against a direct computation."""

from __future__ import annotations

import pytest
import torch

from longctx.attention.triton.top_pages import top_pages, top_pages_ref
from longctx.kv.select.check import check_top_pages


def _direct(bound: torch.Tensor, k: int) -> list[list[list[int]]]:
    """Per row: the k blocks with the largest bound, ties to the lower index, in index order."""
    out = []
    for b in range(bound.shape[0]):
        rows = []
        for h in range(bound.shape[1]):
            vals = bound[b, h].tolist()
            order = sorted(range(len(vals)), key=lambda j: (-vals[j], j))
            rows.append(sorted(order[:k]))
        out.append(rows)
    return out


@pytest.mark.parametrize("n,k", [(8, 2), (37, 5), (200, 64), (64, 63)])
def test_twin_takes_the_top_blocks_in_index_order_with_ties_to_the_earlier(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 31 + k)
    bound = (torch.randint(-3, 4, (2, 3, n), generator=g).float() / 4)
    bound[0, 0, n // 2 :] = float("-inf")
    bound[1, 2, 0] = float("inf")
    bound[1, 1] = -0.0
    lengths = torch.full((2, 3), n * 16)
    blocks, num = top_pages_ref(bound, lengths, k, 16)
    assert blocks.dtype == torch.int32 and num.dtype == torch.int32
    assert blocks.tolist() == _direct(bound, k)
    assert num.tolist() == [[k] * 3] * 2


def test_counts_and_bytes_follow_the_row_lengths() -> None:
    bs, k = 16, 4
    lengths = torch.tensor([[1, 16, 17, 200]])  # 1, 1, 2 and 13 blocks
    nblk = (lengths + bs - 1) // bs
    bound = torch.zeros(1, 4, 13)
    j = torch.arange(13)
    bound = bound.masked_fill(j >= nblk[..., None], float("-inf"))
    acc = torch.full((1, 4), 5, dtype=torch.int64)
    blocks, num = top_pages_ref(bound, lengths, k, bs, acc, token_bytes=10, block_bytes=3)
    assert num.tolist() == [[1, 1, 2, 4]]
    # tokens read: the selected blocks, the newest one partly full (200 = 12 * 16 + 8: 3 full + 8)
    tokens = [1, 16, 17, 3 * 16 + 8]
    assert acc.tolist() == [[5 + t * 10 + b * 3 for t, b in zip(tokens, nblk[0].tolist(), strict=True)]]
    assert blocks[0, 3].tolist() == [0, 1, 2, 3]


def test_bad_k_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        top_pages(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.long), 5, 16)


def test_gpu_check_of_the_kernel_runs_on_cpu_against_itself() -> None:
    name, ok, detail = check_top_pages(100, 7, "cpu")
    assert ok, detail


def test_rows_are_split_only_when_long_and_few() -> None:
    from longctx.attention.triton.top_pages import MAX_BLOCKS, split_count  # noqa: PLC0415

    assert split_count(8, 100, 7) == 1  # short rows: one program per row
    assert split_count(8, 8192, 256) == 8  # batch 1 at 128K: 64 programs, each chunk >= 4k blocks
    assert split_count(128, 2048, 256) == 2  # many rows already keep the GPU busy: 256 programs
    assert split_count(512, 8192, 256) == 1
    for rows, n, k in ((1, 40000, 300), (8, 300000, 64), (64, 20000, 2000)):
        p = split_count(rows, n, k)
        assert p & (p - 1) == 0 and -(-n // p) <= MAX_BLOCKS
