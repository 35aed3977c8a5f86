"""Per-request KV state: the request's rows, its resolved KV method, and one layer's attention step.

``SequenceKV.attend_layer`` is where the five axes meet for one sequence and
one layer: positions decide what is stored and how logits are formed, the rows
store and gather, the reference attention computes the output (and the key
mass accumulation policies asked for), and, when a row is over its budget,
the retain policy scores and the rows compact in place, returning blocks to
the pool at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longctx.attention.reference import attend, attention_probs, causal_mask
from longctx.attention.sdpa import reference_forced, sdpa_attend
from longctx.device import tensor_on
from longctx.kv.eviction import select_keep, select_keep_padded
from longctx.kv.pool import BlockPool
from longctx.kv.positions.base import PositionPolicy
from longctx.kv.registry import lookup
from longctx.kv.retain.base import KVView
from longctx.kv.rows import RowSet, RowView, table_width
from longctx.kv.spec import KVSpec, Method
from longctx.model.config import ModelConfig
from longctx.model.rope import Rotary, rotate


def build(axis: str, method: Method) -> object:
    cls = lookup(axis, method.name)
    assert cls is not None, f"{axis}={method.name} passed parsing but is not registered"
    return cls(**dict(method.params))


@dataclass
class KVStats:
    """Measured KV accounting of one request (bytes are whole blocks held in the pool)."""

    budget_tokens: list[int] | None = None  # per layer, as requested
    prefill_bytes_per_row: list[list[int]] = field(default_factory=list)  # [layer][kv_head]
    final_bytes_per_row: list[list[int]] = field(default_factory=list)
    prefill_tokens_per_row: list[list[int]] = field(default_factory=list)
    final_tokens_per_row: list[list[int]] = field(default_factory=list)
    peak_bytes: int = 0
    num_evictions: int = 0
    prefill_quant_bytes: int = 0  # of prefill_bytes: bytes in quantized blocks (codes + scales + zeros)
    final_quant_bytes: int = 0
    prefill_quant_tokens: int = 0  # tokens stored quantized (all rows)
    final_quant_tokens: int = 0
    decode_steps: int = 0  # decode steps whose reads were counted (select methods other than ``all``)
    read_bytes: int = 0  # K/V bytes those steps read, plus what the method read to choose (summaries, codes)

    @property
    def read_bytes_per_step(self) -> float | None:
        """Mean bytes one decode step read (measured from the selections), None when nothing narrowed reads."""
        return self.read_bytes / self.decode_steps if self.decode_steps else None

    @property
    def prefill_bytes(self) -> int:
        return sum(map(sum, self.prefill_bytes_per_row))

    @property
    def final_bytes(self) -> int:
        return sum(map(sum, self.final_bytes_per_row))


class SequenceKV:
    """The KV cache of one request under one :class:`KVSpec`."""

    def __init__(self, pool: BlockPool, cfg: ModelConfig, spec: KVSpec, prompt_len: int) -> None:
        self.cfg = cfg
        self.spec = spec
        self.spec_text = str(spec)  # formatted once: outputs of streamed requests need it every step
        self.quant = build("quant", spec.quant)
        self.rows = RowSet(pool, cfg.num_layers, cfg.num_kv_heads,
                           quant=None if spec.quant.name == "none" else self.quant)  # type: ignore[arg-type]
        self.retain = build("retain", spec.retain)
        self.budget = build("budget", spec.budget)
        self.positions = build("positions", spec.positions)
        self.select = build("select", spec.select)
        if self.select.needs_block_summaries:  # each block's key min / max: held for this sequence too
            self.rows.extra_bytes_per_block += 2 * cfg.head_dim * pool.k.element_size()
        if bits := self.retain.stored_bits_per_token:  # e.g. an LSH signature per token
            self.rows.extra_bytes_per_block += -(-bits * pool.block_size // 8)
        self.select_state: dict = {}  # the select method's per-sequence state (kv.select.base)
        self._select_reindexed = -1
        self._select_step: dict = {}  # the per-sequence path's state shared by the layers of one step
        self._select_per_seq: dict = self.select_state
        self.select_steps = 0  # decode steps taken (the select method's clock)
        self.read_acc: Tensor | None = None  # device int64: bytes read by counted decode steps
        self.chunk_size: int | None = build("prefill", spec.prefill).chunk_size()  # type: ignore[attr-defined]
        self.layer_budgets: list[int] | None = None
        if not getattr(self.budget, "unlimited", False) and (self.retain.evicts or self.budget.cuts_rows):
            base = self.budget.base(prompt_len)
            self.layer_budgets = self.budget.layer_budgets(base, cfg.num_layers)
        self.head_budgets = [[b] * cfg.num_kv_heads for b in self.layer_budgets] if self.layer_budgets else None
        if self.head_budgets is not None and self.budget.needs_head_scores:  # a fixed (layer, kv-head) table
            self.head_budgets = [list(row) for row in self.budget.head_table(base, cfg)]
            self.layer_budgets = [max(row) for row in self.head_budgets]
        self.budget_state: dict[str, object] = {}  # per-request state of budgets that cut rows (razor)
        self.query_window = self.retain.window_size()
        self._qwin: list[tuple[Tensor, Tensor] | None] = [None] * cfg.num_layers
        # after decode steps: every layer's window in one tensor [L, H, G, W, D] and their shared positions
        # [W] (authoritative while set; _qwin is then stale): folding a decode step is a few ops, not per layer
        self._qstack: tuple[Tensor, Tensor] | None = None
        # decode queries of all layers not yet folded into _qwin: [num_layers, num_heads, D] per step
        self._pending_q: list[Tensor] = []
        self._pending_pos: list[Tensor] = []
        self._merge_state: list[Tensor | None] = [None] * cfg.num_layers  # per layer: a merging policy's state
        self._rotary: dict[int, Rotary] = {}
        self.stats = KVStats(budget_tokens=self.layer_budgets)
        self.device_tables: object | None = None  # device copy of the block tables, owned by engine.fast_decode
        self.defer_eviction = False  # True while prefilling a shared prefix that several requests fork
        # the smallest head budget per layer and overall, kept with head_budgets (see _set_head_budgets)
        self._min_budgets = [min(b) for b in self.head_budgets] if self.head_budgets else []
        self._min_budget_all = min(self._min_budgets) if self._min_budgets else 0
        self._windowed_layers = [layer for layer in range(cfg.num_layers) if cfg.window_of(layer) is not None]
        self.reconstructed = 0  # tokens a reconstruction pass has scored (retain policies with needs_reconstruction)

    @property
    def can_fork(self) -> bool:
        """Whether a prefix prefilled once can be copied into this request (dense prefill, no quantization)."""
        return self.chunk_size is None and self.rows.quant is None

    def fork_from(self, base: SequenceKV) -> None:
        """Continue from ``base``'s state (a prefix prefilled once with eviction deferred): copy its rows
        and remembered queries. The result equals prefilling the prefix within this request's prompt."""
        self.rows.copy_from(base.rows)
        base._fold_pending_queries()
        self._qwin, self._qstack = list(base._qwin), base._qstack
        self.stats.peak_bytes = max(self.stats.peak_bytes, base.stats.peak_bytes)
        if base.reconstructed:  # a reconstruction policy compressed the prefix once (others never evict it)
            self.reconstructed = base.reconstructed
            self.stats.num_evictions += base.stats.num_evictions
            for layer, budgets in enumerate(base.head_budgets or []):
                self._set_head_budgets(layer, list(budgets))

    # ---- positions ----------------------------------------------------------------------------
    def _rotary_for(self, rotary: Rotary) -> Rotary:
        override = self.positions.rope_override(rotary.rope, rotary.max_position_embeddings)
        if override is None:
            return rotary
        key = id(rotary)
        if key not in self._rotary:
            self._rotary[key] = Rotary(override, rotary.head_dim, rotary.max_position_embeddings)
        return self._rotary[key]

    # ---- one layer ----------------------------------------------------------------------------
    def attend_layer(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, rotary: Rotary,
                     is_prefill: bool, max_pos: int | None = None, deferred: list | None = None) -> Tensor:
        """q [T, num_heads, D], k/v [T, num_kv_heads, D] raw; pos [T] original positions -> out [T, num_heads, D].

        ``max_pos`` is ``pos.max()`` if the caller knows it on the host (saves a device synchronisation).
        ``deferred``: a caller attending several sequences in this layer collects the evictions that can be
        done as one stack of rows (:meth:`can_defer_eviction`) there, as ``(self, [layer], max_pos)``, and runs
        them together after the last sequence (:func:`longctx.kv.decode_eviction.evict_due`)."""
        newest, rotate_at = self.append_chunk(layer, k, v, pos, rotary, max_pos)
        return self.attend_appended(layer, q, pos, rotate_at, newest, is_prefill, deferred)

    def append_chunk(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rotary: Rotary,
                     max_pos: int | None = None):  # noqa: ANN201
        """First half of :meth:`attend_layer`: the new tokens' K/V into every row of ``layer``; returns (newest
        position, the rotate function of this step)."""
        newest = int(pos.max()) if max_pos is None else max_pos
        rotate_at = self._rotate_fn(rotary, newest + 1)
        self.rows.append(layer, self.positions.keys_to_store(k, pos, rotate_at), v, pos)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.rows.bytes_held())
        return newest, rotate_at

    def paged_prefill_ready(self, layer: int, is_prefill: bool) -> bool:
        """After :meth:`append_chunk`: whether this layer step needs nothing but the attention output, so the
        varlen paged prefill kernel can attend over the rows in place (no gathered copy): a prompt chunk, plain
        logits over rotated keys (:meth:`_can_use_sdpa`), fp rows, no sliding window to trim, no eviction due."""
        return (is_prefill and self._can_use_sdpa() and self.rows.quant is None and self.cfg.window_of(layer) is None
                and not self._may_evict(layer, is_prefill))

    def paged_prefill_queries(self, layer: int, q: Tensor, pos: Tensor, rotate_at) -> Tensor:  # noqa: ANN001
        """The rest of a :meth:`paged_prefill_ready` layer step but the attention: remember the window queries,
        settle; returns the rotated queries [T, num_heads, D] for the kernel."""
        qh = self._grouped(q)
        if self.query_window:
            self._remember_queries(layer, qh, pos)
        self.rows.settle(layer)
        return self._packed(rotate_at(qh, pos))

    def _grouped(self, q: Tensor) -> Tensor:
        """q [T, num_heads, D] -> [num_kv_heads, G, T, D] (the query heads of each kv head together)."""
        cfg = self.cfg
        return q.view(q.shape[0], cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)

    def _packed(self, out: Tensor) -> Tensor:
        """[num_kv_heads, G, T, D] -> [T, num_heads, D]: :meth:`_grouped` undone."""
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], self.cfg.num_heads, self.cfg.head_dim)

    def attend_appended(self, layer: int, q: Tensor, pos: Tensor, rotate_at, newest: int,  # noqa: ANN001
                        is_prefill: bool, deferred: list | None = None) -> Tensor:
        """Second half of :meth:`attend_layer`: attention over the gathered rows, statistics, eviction."""
        cfg = self.cfg
        num_tokens = q.shape[0]
        view = self.rows.gather(layer)
        qh = self._grouped(q)  # [H, G, T, D]
        window = cfg.window_of(layer)
        logits_fn, mask_fn = self._logits_and_mask(qh, pos, view, window, rotate_at)
        weights = None
        decay = self.retain.key_mass_decay
        if self.retain.needs_key_mass and decay != 1.0:
            weights = decay ** torch.arange(num_tokens - 1, -1, -1, dtype=torch.float32)
        if self._can_use_sdpa():
            lengths = self.rows.lengths[layer]
            uniform = min(lengths) == max(lengths)
            # Sliding layers always mask: a kept token may sit farther back than the window.
            plain = uniform and window is None
            out = sdpa_attend(rotate_at(qh, pos), view.k, view.v, lambda: mask_fn(0, num_tokens), cfg.scale,
                              need_mask=not plain)
            mass = None
        else:
            out, mass = attend(num_tokens, logits_fn, mask_fn, view.v, cfg.scale, cfg.attn_logit_softcapping,
                               want_key_mass=self.retain.needs_key_mass, query_weights=weights)
        if num_tokens == 1 and not is_prefill and not self.select.reads_all:
            selected = self._attend_selected(layer, rotate_at(qh, pos), view)
            out = out if selected is None else selected
        if mass is not None:
            view.score = view.score * decay**num_tokens + mass
            self.rows.write_scores(view, view.score)
        if self.query_window:
            self._remember_queries(layer, qh, pos)
        if window is not None:
            view = self._trim_window(layer, view, window, exact=self._may_evict(layer, is_prefill))
        if self._may_evict(layer, is_prefill):
            if deferred is not None and self.can_defer_eviction(layer, is_prefill):
                deferred.append((self, [layer], newest))
            else:
                self._evict(layer, view, is_prefill, rotate_at, window)
        self.rows.settle(layer)  # quant: this step attended in full precision; now quantize beyond the residual
        return self._packed(out)

    def can_defer_eviction(self, layer: int, is_prefill: bool) -> bool:
        """Whether this layer's eviction may run later in the same layer step, stacked with other sequences'
        (:func:`~longctx.kv.decode_eviction.evict_due`): fp rows scored row by row, no sliding window, no
        budget that re-splits itself from this chunk's scores, no cutting or merging budget."""
        return not (is_prefill and self.budget.uses_scores) and self._stackable(layer)

    def _stackable(self, layer: int) -> bool:
        """Rows of ``layer`` can be scored and compacted in a stack with other rows (see :meth:`_evict`)."""
        return (self.retain.scores_rows_independently() and self.rows.quant is None and not self.budget.cuts_rows
                and not self.retain.merges_evicted and self.cfg.window_of(layer) is None)

    def select_state_now(self) -> dict:
        """The select method's per-sequence state, emptied if the rows were re-indexed since it was written."""
        if self.rows.reindexed != self._select_reindexed:
            self.select_state.clear()
            self._select_reindexed = self.rows.reindexed
        return self.select_state

    def count_reads(self, nbytes: Tensor) -> None:
        """Add one decode step's bytes read (a device scalar; no synchronisation)."""
        if self.read_acc is None:
            self.read_acc = torch.zeros((), dtype=torch.int64, device=nbytes.device)
        self.read_acc += nbytes
        self.stats.decode_steps += 1

    def _attend_selected(self, layer: int, q_rot: Tensor, view: RowView) -> Tensor | None:
        """The per-sequence path's decode step under a select method: the gathered rows as a one-sequence pool,
        selected with the same code as the batched step. q_rot [H, G, 1, D] -> out [H, G, 1, D]; None for a
        sliding-window layer, which reads its (trimmed) rows whole."""
        from longctx.engine.fast_decode import paged_decode_torch  # noqa: PLC0415
        from longctx.kv.select.attend import attend_selection, dense_as_paged  # noqa: PLC0415
        from longctx.kv.select.base import SelectState, bytes_read  # noqa: PLC0415

        cfg, policy = self.cfg, self.select
        h, g = q_rot.shape[:2]
        if layer == 0:  # the state is taken once per step, as the batched step does (an eviction inside this
            # step's layers re-indexes only rows already attended; the state is dropped at the next step)
            self._select_step = {}
            self._select_per_seq = self.select_state_now()
        bs = self.rows.pool.block_size
        width = table_width(-(-view.k.shape[1] // bs))
        rows = dense_as_paged(view.k, view.v, view.pos, view.lengths, bs, policy.needs_block_summaries, width)
        state = SelectState([self._select_per_seq], self._select_step, [self.select_steps], cfg.num_layers,
                            cfg.scale, cfg.attn_logit_softcapping)
        q = q_rot.reshape(1, h * g, cfg.head_dim)
        sliding = cfg.window_of(layer) is not None
        sel = None if sliding else policy.select(layer, q, rows, state)
        out = None if sliding else attend_selection(q, rows, sel, cfg.scale, cfg.attn_logit_softcapping,
                                                    paged_decode_torch)
        if sliding:  # read whole (as the batched step counts it): no selection, nothing of the method's own
            nbytes = rows.lengths.long().sum(-1) * (2 * cfg.head_dim * self.rows.pool.k.element_size())
        else:
            nbytes = bytes_read(policy, layer, rows, sel, state, self.rows.pool.k.element_size(), cfg.head_dim)
        self._layer_reads = nbytes if layer == 0 else self._layer_reads + nbytes
        if layer == cfg.num_layers - 1:
            self.count_reads(self._layer_reads.sum())
            self.select_steps += 1
        return None if out is None else out.view(h, g, 1, cfg.head_dim)

    def _rotate_fn(self, rotary: Rotary, seq_len: int):  # noqa: ANN202
        """rotate(x [..., n, D], positions [..., n]) with this request's RoPE for ``rotary``'s layer type."""
        rot = self._rotary_for(rotary)

        def rotate_at(x: Tensor, p: Tensor) -> Tensor:
            cos, sin = rot.tables(p, x.dtype, seq_len)
            return rotate(x, cos, sin)

        return rotate_at

    def evict_after_decode(self, rotaries: list[Rotary], newest: int | None = None) -> None:
        """Run the retain policy on every layer whose rows are over budget (+ slack) after a batched
        decode step (``engine.fast_decode``); same effect as evicting inside each layer's step.
        ``newest`` is the step's position when the caller knows it on the host (no device sync).
        The batched step evicts all its sequences together (:mod:`longctx.kv.decode_eviction`)."""
        layers = self.decode_eviction_layers(rotaries, newest)
        if not layers:
            return
        if newest is not None and self._can_evict_stacked(layers, rotaries):
            self._evict_stacked(layers, rotaries[layers[0]], newest)
        else:
            self.evict_layers(layers, rotaries, newest)

    def decode_eviction_layers(self, rotaries: list[Rotary], newest: int | None) -> list[int]:
        """After a decode step: trim (and evict) the sliding-window layers, then return the other layers whose
        rows are over budget (+ slack), for the caller to evict."""
        bs = self.rows.pool.block_size
        windowed = self._windowed_layers
        if not windowed and (self.head_budgets is None or self.defer_eviction or self.rows.max_length_overall()
                             <= self._min_budget_all + self.budget.slack):
            return []  # the common step: no row anywhere is over its budget (constant host work)
        for layer in windowed:  # sliding layers: trim to the window, then evict, as attend_layer does
            window = self.cfg.window_of(layer)
            assert window is not None
            evict = self._may_evict(layer, is_prefill=False)
            if not evict and self.rows.max_length(layer) <= window + bs:
                continue
            view = self._trim_window(layer, self.rows.gather(layer), window, exact=evict)
            if self._may_evict(layer, is_prefill=False):  # the trim may have brought it within budget
                pos = newest if newest is not None else int(view.pos[view.valid].max())
                self._evict(layer, view, False, self._rotate_fn(rotaries[layer], pos + 1), window)
        return [layer for layer in range(self.cfg.num_layers)
                if self.cfg.window_of(layer) is None and self._may_evict(layer, is_prefill=False)]

    def evict_layers(self, layers: list[int], rotaries: list[Rotary], newest: int | None) -> None:
        """Evict ``layers`` one at a time (the general decode-time path)."""
        for layer in layers:
            view = self.rows.gather(layer)
            if newest is None:
                newest = int(view.pos[view.valid].max())
            self._evict(layer, view, False, self._rotate_fn(rotaries[layer], newest + 1), self.cfg.window_of(layer))

    def _can_evict_stacked(self, layers: list[int], rotaries: list[Rotary]) -> bool:
        """Whether the layers due for eviction can be scored and compacted as one stack of rows: fp rows, no
        sliding windows, one RoPE for all of them, a policy whose row scores depend on the row alone."""
        if len(layers) < 2 or not all(self._stackable(layer) for layer in layers):
            return False  # (merging carries per-layer state: one layer at a time)
        return len({rotaries[layer].rope for layer in layers}) == 1

    def _evict_stacked(self, layers: list[int], rotary: Rotary, newest: int) -> None:
        """Decode-time eviction of several layers in one pass (the engine's batched decode step): their rows
        are gathered, scored, selected and compacted together, so the work is a fixed number of tensor
        operations whatever the number of layers; results equal evicting each layer on its own."""
        from longctx.kv.decode_eviction import evict_stacked

        evict_stacked([(self, layers, newest)], rotary)

    def stacked_queries(self, layers: list[int]) -> tuple[Tensor, Tensor]:
        """The remembered window queries of ``layers`` stacked layer-major ([len(layers) * H, G, W, D]) and
        their positions [W] (every layer remembers the same positions)."""
        self._fold_pending_queries()
        if self._qstack is not None:
            qs, ps = self._qstack
            first, last = layers[0], layers[-1]
            if layers == list(range(first, last + 1)):  # the usual case (every due layer): a view, no upload
                return qs[first : last + 1].flatten(0, 1), ps
            return qs[tensor_on(layers, torch.int64, qs.device)].flatten(0, 1), ps
        stored = [self._qwin[layer] for layer in layers]
        assert all(w is not None for w in stored), "window_attention needs a retain policy with query_window"
        return torch.cat([w[0] for w in stored]), stored[0][1]  # type: ignore[index]

    def stacked_window_fns(self, layers: list[int], view: RowView, rotary: Rotary,
                           newest: int) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
        """``KVView.window_attention`` and ``window_queries`` over the stacked rows of ``layers`` (``view``)."""
        rotate_at = self._rotate_fn(rotary, newest + 1)

        def window_attention() -> Tensor:
            qs, ps = self.stacked_queries(layers)
            logits_fn, mask_fn = self._logits_and_mask(qs, ps, view, None, rotate_at)
            n = qs.shape[2]
            return attention_probs(logits_fn(0, n), mask_fn(0, n), self.cfg.scale, self.cfg.attn_logit_softcapping)

        return window_attention, lambda: self._in_key_frame(*self.stacked_queries(layers), rotate_at)

    def _can_use_sdpa(self) -> bool:
        """Plain q·k logits over rotated keys, no soft-cap, no key mass: the fused kernel computes the same."""
        plain_logits = type(self.positions).logits is PositionPolicy.logits
        return (plain_logits and self.positions.stores_rotated_keys and not self.retain.needs_key_mass
                and not self.cfg.attn_logit_softcapping and not reference_forced())

    def _logits_and_mask(self, qh: Tensor, pos: Tensor, view: RowView, window: int | None, rotate_at):  # noqa: ANN001, ANN202
        positions = self.positions

        def logits_fn(s: int, e: int) -> Tensor:
            return positions.logits(qh[:, :, s:e], pos[s:e], view.k, view.pos, view.lengths, rotate_at)

        def mask_fn(s: int, e: int) -> Tensor:
            m = causal_mask(pos[s:e], view.pos, view.valid, window)
            extra = positions.extra_mask(pos[s:e], view.pos)
            return m if extra is None else m & extra

        return logits_fn, mask_fn

    def _window(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """``layer``'s remembered window (raw queries [H, G, w, D], positions [w]), None before any."""
        if self._qstack is not None:
            return self._qstack[0][layer], self._qstack[1]
        return self._qwin[layer]

    def _remember_queries(self, layer: int, qh: Tensor, pos: Tensor) -> None:
        w = self.query_window
        if self._qstack is not None:  # a prompt chunk after decode steps: back to one window per layer
            self._qwin = [self._window(lay) for lay in range(self.cfg.num_layers)]
            self._qstack = None
        # copies: a view would keep the whole prompt's q (or fused qkv) projection of every layer alive
        self._qwin[layer] = _last_window(self._qwin[layer], qh[:, :, -w:].clone(), pos[-w:].clone(), w)

    def remember_decode_queries(self, q: Tensor, pos: Tensor) -> None:
        """Remember one decode step's raw queries of every layer, q [num_layers, num_heads, D] at position
        pos [1], for query-window policies. Kept as one tensor per step and folded into the per-layer windows
        only when a window is read or a whole window has accumulated (no per-layer work per step)."""
        self._pending_q.append(q)
        self._pending_pos.append(pos)
        if len(self._pending_q) >= self.query_window:
            self._fold_pending_queries()

    def _fold_pending_queries(self) -> None:
        if not self._pending_q:
            return
        cfg = self.cfg
        q = torch.stack(self._pending_q, dim=2)  # [L, Hq, P, D]
        pos = torch.cat(self._pending_pos)  # [P]
        self._pending_q, self._pending_pos = [], []
        group = cfg.num_heads // cfg.num_kv_heads
        q = q.view(cfg.num_layers, cfg.num_kv_heads, group, q.shape[2], cfg.head_dim)
        prev = self._qstack
        if prev is None:
            windows = self._qwin
            if any(x is None for x in windows) or len({x[0].shape for x in windows}) > 1:  # type: ignore[union-attr]
                for layer in range(cfg.num_layers):  # layers whose windows differ (none remembered yet): one by one
                    self._remember_queries(layer, q[layer], pos)
                return
            # every layer remembered the same prompt positions (one chunk fed all layers): stack them once
            prev = (torch.stack([x[0] for x in windows]), windows[0][1])  # type: ignore[index]
        self._qstack = _last_window(prev, q, pos, self.query_window)

    def window_attention(self, layer: int, view: RowView, window: int | None, rotate_at) -> Tensor:  # noqa: ANN001
        """Attention probabilities [H, G, W, L] of the remembered last W queries over ``view``."""
        self._fold_pending_queries()
        stored = self._window(layer)
        assert stored is not None, "window_attention needs a retain policy with query_window > 0"
        qs, ps = stored
        logits_fn, mask_fn = self._logits_and_mask(qs, ps, view, window, rotate_at)
        n = qs.shape[2]
        return attention_probs(logits_fn(0, n), mask_fn(0, n), self.cfg.scale, self.cfg.attn_logit_softcapping)

    def window_queries(self, layer: int, rotate_at) -> Tensor:  # noqa: ANN001
        """The remembered last W queries [H, G, W, D] of ``layer``, in the frame of the stored keys."""
        self._fold_pending_queries()
        stored = self._window(layer)
        assert stored is not None, "window_queries needs a retain policy with query_window > 0"
        return self._in_key_frame(*stored, rotate_at)

    def _in_key_frame(self, qs: Tensor, ps: Tensor, rotate_at) -> Tensor:  # noqa: ANN001
        """Raw queries [..., W, D] at positions [W] as the rows store keys: rotated, or raw when keys are raw."""
        return rotate_at(qs, ps) if self.positions.stores_rotated_keys else qs

    def _may_evict(self, layer: int, is_prefill: bool, reconstructed: bool = False) -> bool:
        """Whether this layer step must run the retain policy: a row is over its budget (plus, while
        decoding, the budget's slack), or a score-driven allocator re-splits budgets after a prompt chunk.
        A policy that needs a reconstruction pass evicts only after it (``reconstructed``), never in a layer step."""
        if self.head_budgets is None or self.defer_eviction or (self.retain.needs_reconstruction and not reconstructed):
            return False
        if is_prefill and self.budget.uses_scores:
            return True
        slack = 0 if is_prefill else self.budget.slack
        if self.rows.max_length(layer) <= self._min_budgets[layer] + slack:
            return False  # the common decode step: no row is over (constant host work)
        return any(n > b + slack for n, b in zip(self.rows.lengths[layer], self.head_budgets[layer], strict=True))

    def _set_head_budgets(self, layer: int, budgets: list[int]) -> None:
        """A score-driven allocator re-split ``layer``'s budget across its heads."""
        assert self.head_budgets is not None
        self.head_budgets[layer] = budgets
        self._min_budgets[layer] = min(budgets)
        self._min_budget_all = min(self._min_budgets)

    def _trim_window(self, layer: int, view: RowView, window: int, exact: bool) -> RowView:
        """Sliding-window layers drop tokens no future query can see.

        Normally a spare block of slack avoids compacting every step; before a retain policy evicts
        (``exact``) the row is cut to exactly the window, so what the policy chooses from does not
        depend on when earlier trims happened (e.g. on whether a prefix was prefilled separately).
        """
        if not exact and max(self.rows.lengths[layer]) <= window + self.rows.pool.block_size:
            return view
        newest = view.pos.masked_fill(~view.valid, -1).amax()  # stays on the device
        inside = view.valid & (view.pos > newest - window)
        counts = inside.sum(dim=1).tolist()  # the one host read: how many tokens each row keeps
        if counts == list(self.rows.lengths[layer]):
            return view
        if view.qslots is None:  # all rows at once: the kept tokens first, in row order (a stable sort)
            order = torch.sort((~inside).to(torch.int8), dim=1, stable=True).indices
            self.rows.compact_padded(layer, view, order[:, : max(max(counts), 1)], counts)
        else:
            self.rows.compact(layer, view, [torch.nonzero(inside[h]).flatten() for h in range(view.k.shape[0])])
        return self.rows.gather(layer)

    def _evict(self, layer: int, view: RowView, is_prefill: bool, rotate_at, window: int | None) -> None:  # noqa: ANN001
        assert self.head_budgets is not None and self.layer_budgets is not None
        if self.budget.cuts_rows:  # duo / razor: the budget chooses what its rows keep
            self.budget.cut_rows(self, layer, view, window)
            return
        lengths = self.rows.lengths[layer]
        scores_needed = is_prefill and self.budget.uses_scores
        kv_view = KVView(
            keys=view.k, values=view.v, positions=view.pos, valid=view.valid, key_mass=view.score,
            window_attention=lambda: self.window_attention(layer, view, window, rotate_at),
            layer=layer, num_layers=self.cfg.num_layers,
            window_queries=lambda: self.window_queries(layer, rotate_at),
        )
        scores = self.retain.score(kv_view).masked_fill(~view.valid, float("-inf"))
        if scores_needed:
            self._set_head_budgets(layer, self.budget.head_budgets(self.layer_budgets[layer], scores, view.valid))
        budgets = self.head_budgets[layer]
        if all(n <= b for n, b in zip(lengths, budgets, strict=True)):
            return
        recent = [self.retain.recent_tokens(b) for b in budgets]
        if view.qslots is None:  # batched over the rows, no host synchronisation
            keep, counts = select_keep_padded(scores, lengths, budgets, self.retain.sinks, recent)
            if self.retain.merges_evicted:  # dropped tokens folded into kept ones, then written by the compaction
                view.k, view.v, self._merge_state[layer] = self.retain.merge(kv_view, keep, counts,
                                                                             self._merge_state[layer])
            self.rows.compact_padded(layer, view, keep, counts)
        else:
            assert not self.retain.merges_evicted, "merging policies need fp rows (their specs refuse quant)"
            self.rows.compact(layer, view, select_keep(scores, lengths, budgets, self.retain.sinks, recent))
        self.stats.num_evictions += 1

    # ---- accounting ---------------------------------------------------------------------------
    def snapshot(self, final: bool) -> None:
        per_row = self.rows.bytes_held_per_row()
        tokens = [list(x) for x in self.rows.lengths]
        qbytes, qtokens = self.rows.quant_bytes_held(), self.rows.num_quant_tokens()
        if final:
            if self.read_acc is not None and not self.select.reads_all:
                self.stats.read_bytes = int(self.read_acc)
            self.stats.final_bytes_per_row, self.stats.final_tokens_per_row = per_row, tokens
            self.stats.final_quant_bytes, self.stats.final_quant_tokens = qbytes, qtokens
        else:
            self.stats.prefill_bytes_per_row, self.stats.prefill_tokens_per_row = per_row, tokens
            self.stats.prefill_quant_bytes, self.stats.prefill_quant_tokens = qbytes, qtokens

    def release(self) -> None:
        self.rows.release()


def _last_window(prev: tuple[Tensor, Tensor] | None, q: Tensor, pos: Tensor, w: int) -> tuple[Tensor, Tensor]:
    """The last ``w`` of the remembered queries ``prev`` (queries [..., n, D], positions [n]) followed by ``q`` /
    ``pos``: a chunk of at least ``w`` queries replaces the window outright."""
    if prev is not None and q.shape[-2] < w:
        return torch.cat([prev[0], q], dim=-2)[..., -w:, :], torch.cat([prev[1], pos])[-w:]
    return q[..., -w:, :], pos[-w:]


def kv_bytes_for_tokens(cfg: ModelConfig, num_tokens: int, element_size: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * num_tokens * element_size
