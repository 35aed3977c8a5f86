"""``tidaldecode``: position persistent sparse attention (Yang et al., "TidalDecode: Fast and Accurate LLM Decoding
with Position Persistent Sparse Attention", arXiv:2410.05076).

A few *token selection layers* attend to every token and pick the ``tokens`` positions with the highest attention
scores; every other layer reads only the positions the most recent selecting layer before it chose (tokens chosen
by high attention overlap strongly between consecutive layers). Layers before the first selecting layer attend
fully. The default follows the paper and its reference code (``enable_tidal(top_k=256, sparse_layer_start=2,
correction_layer=13)`` for 32-layer Llama-3-8B): full attention in layers 0 and 1, token selection in layer 2 and
token re-selection in layer 13 — scaled to the model's depth (``auto``: layers 2 and round(13 * L / 32)).

The reference code selects per attention head, the newest token always included (top ``tokens - 1`` of the
others, plus the newest). A selection here is per kv-head row, so a row ranks its tokens by the softmax
attention probabilities summed over the query heads of its GQA group (the same as per head when G = 1); ties go
to the earlier token (a stable sort). A selecting layer reads everything (its attention is full) and remembers
the *original positions* it chose (``state.step``); a later layer maps them to its own row by binary search on
the row's sorted positions (rows may keep different tokens per layer after eviction): a position the row does
not keep is not read, and the row's newest token is always read.

Scores are the model's attention probabilities (``state.scale`` and ``state.softcap``, set by the engine on both
paths; ``D ** -0.5`` without soft-cap when a caller leaves them unset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longctx.kv.registry import param, register
from longctx.kv.select.base import PagedRows, Selection, SelectPolicy, SelectState

_KEY = "tidaldecode"  # state.step entry: [B, H, tokens] original positions chosen (-1 = none), or None (read all)


@register("select", "tidaldecode")
@dataclass(frozen=True)
class TidalDecode(SelectPolicy):
    """A few layers attend fully and pick the top tokens; the layers after them read only those positions."""

    select_layers: str = param("auto", "comma-separated ascending layer indices that attend fully and choose the "
                                       "tokens (e.g. '2,13'); 'auto': 2 and round(13 * L / 32) (when later), "
                                       "the paper's layers 2 and 13 of 32")
    tokens: int = param(256, "tokens each row of a non-selecting layer reads per step (the newest included)")

    cross_layer = True

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        _parse_layers(self.select_layers)

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The selecting layers of a model with ``num_layers`` layers (0: unknown; only explicit layers then)."""
        given = _parse_layers(self.select_layers)
        if given is None:  # auto
            if num_layers < 1:
                raise ValueError("tidaldecode select_layers='auto' needs the model's layer count (state.num_layers)")
            reselect = (13 * num_layers + 16) // 32  # round(13 * L / 32); kept only after layer 2
            return tuple(x for x in ((2, reselect) if reselect > 2 else (2,)) if x < num_layers)
        if num_layers and given[-1] >= num_layers:
            raise ValueError(f"tidaldecode select_layers={self.select_layers!r}: layer {given[-1]} does not exist "
                             f"(the model has {num_layers} layers: 0..{num_layers - 1})")
        return given

    def select(self, layer: int, q: Tensor, rows: PagedRows, state: SelectState) -> Selection | None:
        layers = self.layers(state.num_layers)
        if not layers or layer < layers[0]:
            return None  # dense layers before the first token selection layer
        covered = self.tokens >= rows.block_tables.shape[-1] * rows.block_size
        if layer in layers:  # token (re-)selection: full attention, remember the top positions
            if covered:
                state.step[_KEY] = None
                return None
            scores = group_attention_scores(q, rows, state)
            chosen = top_tokens(scores, rows.lengths, self.tokens, newest=True)
            state.step[_KEY] = token_positions(rows, chosen)
            return None
        positions = state.step.get(_KEY)
        if positions is None or covered:
            return None  # the last selecting layer read everything (its budget covered its rows), or this one does
        return Selection(tokens=map_positions(rows, positions))

    def extra_bytes_read(self, layer: int, rows: PagedRows, state: SelectState) -> Tensor | None:
        """Selecting layers: nothing besides their full read. Following layers: the row's token positions (read to
        map the chosen positions onto the row)."""
        layers = self.layers(state.num_layers)
        if (not layers or layer <= layers[0] or layer in layers or state.step.get(_KEY) is None
                or self.tokens >= rows.block_tables.shape[-1] * rows.block_size):
            return None
        return rows.lengths.long() * rows.pos.element_size()


def _parse_layers(text: str) -> tuple[int, ...] | None:
    """The layer indices of ``select_layers`` (None for ``auto``); ValueError naming what is allowed."""
    if text.strip() == "auto":
        return None
    allowed = "'auto' or comma-separated strictly ascending layer indices >= 0, e.g. '2,13'"
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"select_layers must be {allowed}; got {text!r}") from None
    if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"select_layers must be {allowed}; got {text!r}")
    return layers


def group_attention_scores(q: Tensor, rows: PagedRows, state: SelectState) -> Tensor:
    """[B, H, cap * block_size] fp32: each row's softmax attention probabilities over its tokens, summed over the
    query heads of its GQA group (-inf past the row's length). Scale ``D ** -0.5`` unless ``state.scale`` is set."""
    bsz, hq, d = q.shape
    tables = rows.block_tables.long()
    h, cap = tables.shape[1:]
    n = cap * rows.block_size
    k = rows.k[tables].reshape(bsz, h, n, d).float()  # [B, H, N, D]
    qg = q.view(bsz, h, hq // h, d).float()  # [B, H, G, D]
    scale = getattr(state, "scale", None) or d ** -0.5
    softcap = getattr(state, "softcap", None)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, H, G, N]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    valid = torch.arange(n, device=q.device)[None, None, :] < rows.lengths[:, :, None]  # [B, H, N]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).sum(2)
    return p.masked_fill(~valid, float("-inf"))


def top_tokens(scores: Tensor, lengths: Tensor, k: int, newest: bool) -> Tensor:
    """[B, H, k] int64 indices of each row's k highest ``scores`` [B, H, N] (-1 past the row's length; ties to the
    earlier token); with ``newest`` the row's newest token is always among them. Needs k <= N."""
    n = scores.shape[-1]
    j = torch.arange(n, device=scores.device)[None, None, :]
    if newest:
        scores = scores.masked_fill(j == lengths[:, :, None] - 1, float("inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    taken = torch.arange(k, device=scores.device)[None, None, :] < lengths[:, :, None]
    return torch.where(taken, order, -1)


def token_positions(rows: PagedRows, tokens: Tensor) -> Tensor:
    """[B, H, K] original positions of the tokens [B, H, K] (-1 = none) of each row (-1 where none)."""
    bs = rows.block_size
    tok = tokens.clamp(min=0)
    slots = rows.block_tables.long().gather(-1, tok // bs) * bs + tok % bs
    return torch.where(tokens >= 0, rows.pos.reshape(-1)[slots], -1)


def map_positions(rows: PagedRows, positions: Tensor) -> Tensor:
    """[B, H, K + 1] token indices in each row of the original ``positions`` [B, H, K] (-1 = none): -1 where the row
    does not keep that position; the row's newest token always last. Row positions are ascending."""
    tables = rows.block_tables.long()
    bsz, h, cap = tables.shape
    n = cap * rows.block_size
    lengths = rows.lengths.long()
    row_pos = rows.pos[tables].reshape(bsz, h, n)
    valid = torch.arange(n, device=tables.device)[None, None, :] < lengths[:, :, None]
    row_pos = row_pos.masked_fill(~valid, torch.iinfo(row_pos.dtype).max).contiguous()  # still ascending
    wanted = positions.to(row_pos.dtype).contiguous()
    idx = torch.searchsorted(row_pos, wanted).clamp(max=n - 1)
    found = (wanted >= 0) & (row_pos.gather(-1, idx) == wanted) & (idx < lengths[:, :, None] - 1)
    newest = torch.where(lengths > 0, lengths - 1, -1)[:, :, None]
    return torch.cat([torch.where(found, idx, -1), newest], dim=-1)
