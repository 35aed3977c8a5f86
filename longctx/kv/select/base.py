"""Base of select methods: what one decode step reads of the rows a sequence keeps (nothing is deleted).

A select method is a frozen dataclass (its parameters are the fields) that implements
:meth:`SelectPolicy.select`: given the step's rotated queries of B sequences for one layer and their rows *as
they lie in the block pool* (:class:`PagedRows`: pool tensors, block tables, lengths), it returns a
:class:`Selection` — blocks of each row, or tokens of each row (optionally with importance log-weights added
to the logits) — and :func:`longctx.kv.select.attend.attend_selection` attends to just that. The same code
runs in the batched decode step (the pool itself) and on the per-sequence path (one sequence's gathered rows
wrapped as a small pool, :func:`longctx.kv.select.attend.dense_as_paged`), so both paths choose the same
tokens. Everything is tensor work on the rows' device: no host synchronisation inside a step.

What a method needs from the engine is declared as class attributes:

- ``reads_all``: the method never narrows what a step reads (``all``); the engine skips selection.
- ``needs_block_summaries``: the pool keeps per-block elementwise key min / max (``pool.summary``), written
  by the decode step's KV write and refreshed from the rows after any other change (Quest).
- ``stateful``: the method keeps per-sequence, per-layer tensors between steps in ``state.per_seq`` (a dict
  per sequence; the engine drops a sequence's state whenever its rows are compacted, since row indices then
  change); stateless methods are captured in CUDA graphs.
- ``cross_layer``: a layer's selection depends on what an earlier layer of the same step chose
  (``state.step``, a dict shared by the layers of one step and one group of sequences).

A selection never needs to cover every token: the attention softmax runs over what is selected. A budget
that covers a whole row must select every token of it, so the output equals ``select=all`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class PagedRows:
    """One layer's rows of B sequences in the block pool.

    k, v: [num_blocks, block_size, D] pool tensors (keys rotated at their positions); pos: [num_blocks,
    block_size] original positions; block_tables: [B, H, cap] int block ids (token i of row (b, h) is at
    ``k[block_tables[b, h, i // block_size], i % block_size]``); lengths: [B, H] int tokens of each row the
    step attends to (the new token included); summaries: [num_blocks, 2, D] per-block key min (index 0) and
    max (index 1) over the block's valid tokens, when a method asked for them.
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    block_tables: Tensor
    lengths: Tensor
    summaries: Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's key and value in one row (what attending to it reads)."""
        return 2 * self.k.shape[-1] * self.k.element_size()

    @property
    def summary_bytes_per_block(self) -> int:
        """Bytes of one block's summary (key min and max), read by a method that ranks blocks by it."""
        assert self.summaries is not None
        return 2 * self.summaries.shape[-1] * self.summaries.element_size()

    @property
    def num_row_blocks(self) -> Tensor:
        """[B, H] blocks that hold each row's tokens."""
        return (self.lengths + self.block_size - 1) // self.block_size


@dataclass
class Selection:
    """What each row of one layer reads in one step: either blocks or tokens (not both).

    blocks [B, H, S] int indices into each row's block table with num_blocks [B, H] (entries past
    ``num_blocks`` are ignored; indices are distinct); or tokens [B, H, K] int64 indices into each row (-1 =
    no token; indices are distinct) with optional log_weights [B, H, G, K] fp32 added to the scaled (and
    soft-capped) logits of query head g of the group (importance weights of a sampled estimate).

    Optional compensation for what was not read: with residual_weight [B, H, G] (fp32 in [0, 1]) and
    residual_value [B, H, D], the output of query head g becomes ``(1 - w) * attention + w * value`` (SparQ's
    mean-value mix).

    ``counted``: the method's own kernel already added what each row reads in this layer to the state's
    ``read_acc`` (so the step adds nothing for it).
    """

    blocks: Tensor | None = None
    num_blocks: Tensor | None = None
    tokens: Tensor | None = None
    log_weights: Tensor | None = None
    residual_weight: Tensor | None = None
    residual_value: Tensor | None = None
    counted: bool = False  # the method already added this layer's bytes read to ``state.read_acc``


@dataclass
class SelectState:
    """State a select method may keep: ``per_seq`` one dict per sequence of the group (persisting across
    steps, stateful methods only); ``step`` one dict shared by all layers of this step (cross-layer methods);
    ``steps`` [B] host ints: decode steps each sequence has taken before this one; ``num_layers``; the model's
    attention ``scale`` and logit ``softcap`` (for methods that score with true attention probabilities);
    ``read_acc``: [B, H] int64 bytes read so far in this step, given by the batched step (None on the
    per-sequence path), which a method may add to inside its own kernels (returning ``counted``)."""

    per_seq: list[dict] = field(default_factory=list)
    step: dict = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    num_layers: int = 0
    scale: float | None = None
    softcap: float | None = None
    read_acc: Tensor | None = None


class SelectPolicy:
    """Base of every select method (see module docstring)."""

    reads_all: ClassVar[bool] = False
    needs_block_summaries: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    cross_layer: ClassVar[bool] = False

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        """The selection of one layer for the step's rotated queries q [B, Hq, D] (Hq = H * G); None reads
        every token of every row in this layer (e.g. a full step)."""
        raise NotImplementedError

    def tokens_read(self, rows: PagedRows, selection: Selection | None) -> Tensor:
        """[B, H] tokens each row reads under ``selection`` (a method may count faster from its invariants)."""
        return row_token_count(rows, selection)

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """[B, H] bytes each row read in ``layer`` this step *besides* the selected tokens' K and V (block
        summaries, hash codes, the key components of approximate scores, whole rows scored to choose), or
        None for none. Called right after :meth:`select` for the same layer."""
        return None


def row_token_count(rows: PagedRows, selection: Selection | None) -> Tensor:
    """[B, H] tokens each row reads under ``selection`` (measured from the selection itself)."""
    if selection is None:
        return rows.lengths.long()
    if selection.tokens is not None:
        return (selection.tokens >= 0).sum(-1)
    assert selection.blocks is not None and selection.num_blocks is not None
    bs = rows.block_size
    j = torch.arange(selection.blocks.shape[-1], device=selection.blocks.device)
    taken = j[None, None, :] < selection.num_blocks[:, :, None]
    tokens = (rows.lengths[:, :, None].long() - selection.blocks * bs).clamp(0, bs)
    return (tokens * taken).sum(-1)


def row_bytes_read(policy: SelectPolicy, layer: int, rows: PagedRows, selection: Selection | None,
                   state: SelectState, element_size: int, head_dim: int) -> Tensor:
    """[B, H] bytes each row read in ``layer``: the selected tokens' K and V plus the method's extra reads."""
    nbytes = policy.tokens_read(rows, selection) * (2 * head_dim * element_size)
    extra = policy.extra_bytes_read(layer, rows, state)
    return nbytes if extra is None else nbytes + extra


def bytes_read(policy: SelectPolicy, layer: int, rows: PagedRows, selection: Selection | None, state: SelectState,
               element_size: int, head_dim: int) -> Tensor:
    """[B] bytes each sequence read in ``layer`` (:func:`row_bytes_read` over its rows)."""
    return row_bytes_read(policy, layer, rows, selection, state, element_size, head_dim).sum(-1)
