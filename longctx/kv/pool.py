"""The block pool: fixed-size KV blocks shared by every row of every request.

One pool holds keys, values, the original position of every stored token and
one float per token that retain policies may use as a running statistic
(e.g. H2O's accumulated attention). Blocks are the unit of allocation; block 0
is the ``null_block``: never handed out, it pads block tables so a gather over
rows of different lengths reads valid memory.

Memory ownership: the pool owns all KV tensors. Rows (``kv.rows``) own lists
of block ids and lengths; they never allocate tensors. Freed blocks return to
the free list immediately.

Quantized KV (``quant=int8`` / ``int4``) lives in a :class:`QuantBlockPool`:
blocks of codes + scales + zeros whose layout the quant method describes. One
is created per layout on first use (:meth:`BlockPool.quant_pool`) and shared by
every row with that layout, so the savings are real: the fp blocks a row
quantizes go back to the fp pool. The fp pool's cap (``max_blocks`` blocks of
``bytes_per_block``) is one byte budget for all of them: a pool may only grow
into bytes the others have not reserved (pools never shrink, so bytes one has
reserved stay its own).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from longctx.errors import OutOfBlocksError

NULL_BLOCK = 0


class _BlockAllocator(ABC):
    """Block bookkeeping shared by the fp and the quantized pools: ref counts, the free list, the null
    block 0 and growth by doubling up to :meth:`_cap_blocks`. Subclasses own the tensors: they define
    ``num_blocks`` and :meth:`_extend_tensors`."""

    _label = ""  # "quantized " in messages of the quantized pool

    def _init_blocks(self, num_blocks: int) -> None:
        self.ref_cnt = [0] * num_blocks
        self.ref_cnt[NULL_BLOCK] = 1  # the null block is permanently held
        self.free_blocks: list[int] = list(range(num_blocks - 1, 0, -1))
        self.peak_used_blocks = 0

    @property
    @abstractmethod
    def num_blocks(self) -> int:
        """Blocks the pool's tensors hold now (null block included)."""

    @abstractmethod
    def _cap_blocks(self) -> int:
        """The most blocks this pool may grow to."""

    @abstractmethod
    def _extend_tensors(self, extra: int) -> None:
        """Append ``extra`` zeroed blocks to every tensor of the pool."""

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + (self._cap_blocks() - self.num_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free_blocks)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (ref_cnt 1 each). Raises OutOfBlocksError when the pool is full."""
        if n <= 0:
            return []
        if n > len(self.free_blocks):
            self._grow(n - len(self.free_blocks))
        blocks = self.free_blocks[-n:]
        del self.free_blocks[-n:]
        for b in blocks:
            self.ref_cnt[b] = 1
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero go back to the free list (no tensor writes,
        so rows can be released outside inference mode; whoever allocates a block overwrites it)."""
        for b in blocks:
            if b == NULL_BLOCK or self.ref_cnt[b] <= 0:
                raise RuntimeError(f"double free of {self._label}block {b}")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_blocks.append(b)

    def _grow(self, shortfall: int) -> None:
        old = self.num_blocks
        cap = self._cap_blocks()
        new = min(max(2 * old, old + shortfall), cap)
        if new - old < shortfall:
            raise OutOfBlocksError(
                f"{self._label}KV pool exhausted: need {shortfall} more blocks of {self.block_size} tokens, "
                f"pool is capped at {cap} blocks; raise --kv-memory or use a smaller budget"
            )
        self._extend_tensors(new - old)
        self.ref_cnt.extend([0] * (new - old))
        self.free_blocks[:0] = list(range(new - 1, old - 1, -1))

    def check_invariants(self) -> None:
        """free + used + null == total, no negative ref counts, free blocks have ref_cnt 0."""
        assert all(c >= 0 for c in self.ref_cnt), "negative ref_cnt"
        assert len(set(self.free_blocks)) == len(self.free_blocks), "block on the free list twice"
        assert all(self.ref_cnt[b] == 0 for b in self.free_blocks), "free block still referenced"
        used = sum(1 for b, c in enumerate(self.ref_cnt) if c > 0 and b != NULL_BLOCK)
        assert used + len(self.free_blocks) + 1 == self.num_blocks, "leaked blocks"


class BlockPool(_BlockAllocator):
    """Fixed-size blocks of ``block_size`` tokens × ``head_dim`` for K and V.

    The pool starts with ``num_blocks`` blocks and, when ``max_blocks`` is larger,
    doubles on demand up to it (growing reallocates, so callers must not keep views
    across an ``allocate``).
    """

    def __init__(
        self,
        head_dim: int,
        block_size: int = 16,
        num_blocks: int = 256,
        max_blocks: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if block_size <= 0 or num_blocks < 2:
            raise ValueError("block_size must be positive and num_blocks >= 2")
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_blocks = max(max_blocks or num_blocks, num_blocks)
        self.k = torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(num_blocks, block_size, dtype=torch.int64, device=self.device)
        self.score = torch.zeros(num_blocks, block_size, dtype=torch.float32, device=self.device)
        # per block, elementwise key min / max [num_blocks, 2, head_dim]: created by the first select method
        # that ranks blocks (kv.select.summaries); 1 / block_size of K's bytes more
        self.summary: torch.Tensor | None = None
        self._init_blocks(num_blocks)
        self.quant_pools: dict[tuple, QuantBlockPool] = {}

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    def quant_pool(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], block_size: int) -> QuantBlockPool:
        """The shared pool of quantized blocks with this layout (created on first use, on this pool's
        device, growing within this pool's byte budget)."""
        key = (block_size, tuple((name, tuple(shape), dtype) for name, (shape, dtype) in fields.items()))
        if key not in self.quant_pools:
            self.quant_pools[key] = QuantBlockPool(fields, block_size, num_blocks=2, device=self.device, parent=self)
        return self.quant_pools[key]

    def release_idle_quant_pools(self) -> bool:
        """Give the bytes of quantized pools that hold no block back to this pool's budget (their tensors
        shrink to the null block alone). True if any bytes came back."""
        freed = False
        for qp in self.quant_pools.values():
            if qp.num_used_blocks == 0 and qp.num_blocks > 1:
                qp.reset(1)
                freed = True
        return freed

    def _quant_reserved_bytes(self, but: QuantBlockPool | None = None) -> int:
        # a quantized pool's null block is not counted: an idle pool (null block only) reserves nothing
        return sum((qp.num_blocks - 1) * qp.bytes_per_block for qp in self.quant_pools.values() if qp is not but)

    def _cap_blocks(self) -> int:
        """``max_blocks`` less what quantized pools have reserved of the byte budget."""
        if not self.quant_pools:
            return self.max_blocks
        return self.max_blocks - -(-self._quant_reserved_bytes() // self.bytes_per_block)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V in one block (positions/scores are bookkeeping, not counted)."""
        return 2 * self.block_size * self.head_dim * self.k.element_size()

    def _extend_tensors(self, extra: int) -> None:
        self.k = torch.cat([self.k, self.k.new_zeros(extra, *self.k.shape[1:])])
        self.v = torch.cat([self.v, self.v.new_zeros(extra, *self.v.shape[1:])])
        self.pos = torch.cat([self.pos, self.pos.new_zeros(extra, self.block_size)])
        self.score = torch.cat([self.score, self.score.new_zeros(extra, self.block_size)])
        if self.summary is not None:
            self.summary = torch.cat([self.summary, self.summary.new_zeros(extra, *self.summary.shape[1:])])


class QuantBlockPool(_BlockAllocator):
    """Blocks of quantized KV: per block, the tensors ``fields`` names (codes, scales, zeros), plus the
    original position, the policy score and an ``alive`` flag of each of its ``block_size`` tokens.

    ``fields``: name -> (shape of one block's tensor, dtype); ``data[name]`` is [num_blocks, *shape].
    A token of a quantized block that eviction drops is only marked dead (the block's shared key
    scales stay valid for the others); rows repack blocks once a whole block's worth is dead.
    Allocation mirrors :class:`BlockPool` (block 0 is a never-handed-out null block, growth by doubling);
    with a ``parent`` the cap is whatever of the parent's byte budget the other pools have not reserved.
    """

    _label = "quantized "

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], block_size: int,
                 num_blocks: int = 16, max_blocks: int | None = None, device: str | torch.device = "cpu",
                 parent: BlockPool | None = None) -> None:
        if block_size <= 0 or num_blocks < 1:
            raise ValueError("block_size must be positive and num_blocks >= 1")
        self.fields = dict(fields)
        self.block_size = block_size
        self.device = torch.device(device)
        self.parent = parent
        self._max_blocks = max(max_blocks or num_blocks, num_blocks)
        self.data = {name: torch.zeros(num_blocks, *shape, dtype=dtype, device=self.device)
                     for name, (shape, dtype) in self.fields.items()}
        self.pos = torch.zeros(num_blocks, block_size, dtype=torch.int64, device=self.device)
        self.score = torch.zeros(num_blocks, block_size, dtype=torch.float32, device=self.device)
        self.alive = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=self.device)
        self._init_blocks(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pos.shape[0]

    @property
    def max_blocks(self) -> int:
        if self.parent is None:
            return self._max_blocks
        p = self.parent
        budget = (p.max_blocks - p.num_blocks) * p.bytes_per_block - p._quant_reserved_bytes(but=self)
        return max(budget // self.bytes_per_block, self.num_blocks)

    @max_blocks.setter
    def max_blocks(self, value: int) -> None:
        self._max_blocks = value

    def _cap_blocks(self) -> int:
        return self.max_blocks

    @property
    def bytes_per_block(self) -> int:
        """Bytes of codes + scales + zeros in one block (positions/scores/alive flags are bookkeeping)."""
        return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                   for shape, dtype in self.fields.values())

    def reset(self, num_blocks: int) -> None:
        """Drop every tensor and start again with ``num_blocks`` empty blocks (only while no block is held)."""
        assert self.num_used_blocks == 0, "reset of a quantized pool that still holds blocks"
        self.data = {name: torch.zeros(num_blocks, *shape, dtype=dtype, device=self.device)
                     for name, (shape, dtype) in self.fields.items()}
        self.pos = torch.zeros(num_blocks, self.block_size, dtype=torch.int64, device=self.device)
        self.score = torch.zeros(num_blocks, self.block_size, dtype=torch.float32, device=self.device)
        self.alive = torch.zeros(num_blocks, self.block_size, dtype=torch.bool, device=self.device)
        self._init_blocks(num_blocks)

    def _extend_tensors(self, extra: int) -> None:
        self.data = {name: torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) for name, t in self.data.items()}
        self.pos = torch.cat([self.pos, self.pos.new_zeros(extra, self.block_size)])
        self.score = torch.cat([self.score, self.score.new_zeros(extra, self.block_size)])
        self.alive = torch.cat([self.alive, self.alive.new_zeros(extra, self.block_size)])
