"""The one decoder: Llama, Mistral, Qwen2, Qwen3 and Gemma3 as config flags.

Tokens are packed token-major (``[num_tokens, ...]``) across the sequences of
a batch; the model never sees a padded batch and never knows which KV method
runs. Each attention layer projects q/k/v (plus QK-norm where the family has
it) and hands the *un-rotated* q and k to ``ctx.attend``: the KV layer owns
positions (RoPE), storage, eviction and the attention computation itself.

Parameter names follow the HF checkpoints (``self_attn.q_proj``,
``mlp.down_proj``, ``input_layernorm``) so loading is a strict name match.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.model.config import ModelConfig
from longctx.model.rope import Rotary
from longctx.ops.gated_act import gated_act
from longctx.ops.rms_norm import add_rms_norm, rms_norm


class AttentionContext(Protocol):
    """What the decoder needs from the KV layer during one forward pass."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim], un-rotated.

        Returns the attention output [num_tokens, num_heads, head_dim].
        """
        ...


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; Gemma scales by (1 + w) and casts after the product."""

    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.gemma)

    def add_forward(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + delta), x + delta): the residual add fused with the norm that follows it."""
        return add_rms_norm(x, delta, self.weight, self.eps, self.gemma)


def fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input into one tensor and make each
    linear's parameters views into it: one GEMM instead of several, no extra memory, names unchanged.
    Returns (weight, bias) of the fused projection."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    sizes = [lin.weight.shape[0] for lin in linears]
    for lin, w in zip(linears, weight.split(sizes), strict=True):
        lin.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        for lin, b in zip(linears, bias.split(sizes), strict=True):
            lin.bias = nn.Parameter(b, requires_grad=False)
    return weight, bias


def is_fused(linears: list[nn.Linear], fused: tuple[Tensor, Tensor | None] | None) -> bool:
    """Whether ``fused`` (weight, bias) still backs every one of ``linears`` (a later ``.to()``,
    ``load_state_dict(assign=True)`` or a replaced parameter breaks the views; the unfused path then runs)."""
    if fused is None:
        return False
    for i, tensor in enumerate(fused):
        if tensor is None:
            continue
        step = (tensor.stride(0) if tensor.dim() else 1) * tensor.element_size()
        offset = 0
        for lin in linears:
            param = lin.weight if i == 0 else lin.bias
            if param is None or param.data_ptr() != tensor.data_ptr() + offset * step:
                return False
            offset += param.shape[0]
    return True


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms)
        self.qk_norm = cfg.qk_norm
        self.rotary = Rotary(cfg.rope_of(layer), d, cfg.max_position_embeddings)
        self.qkv: tuple[Tensor, Tensor | None] | None = None  # fused projection (see fuse())

    def fuse(self) -> None:
        """Idempotent: fusing again would move the weights under captured CUDA graphs."""
        if not is_fused([self.q_proj, self.k_proj, self.v_proj], self.qkv):
            self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        n = x.shape[0]
        if is_fused([self.q_proj, self.k_proj, self.v_proj], self.qkv):
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.qkv).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(n, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out = ctx.attend(self.layer, q, k, v, self.rotary)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.act = cfg.hidden_act
        self.gate_up: tuple[Tensor, Tensor | None] | None = None  # fused projection (see fuse())

    def fuse(self) -> None:
        """Idempotent (see :meth:`Attention.fuse`)."""
        if not is_fused([self.gate_proj, self.up_proj], self.gate_up):
            self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: Tensor) -> Tensor:
        if is_fused([self.gate_proj, self.up_proj], self.gate_up):
            gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(gated_act(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]),
                                        self.act).view(gate.shape))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, gemma = cfg.rms_norm_eps, cfg.gemma_norms
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, gemma)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, gemma)
        self.sandwich = gemma
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, gemma)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, gemma)

    def forward(self, x: Tensor, ctx: AttentionContext, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: the residual stream; delta: the previous layer's output not yet added to it (the add is fused
        into this layer's first norm). Returns (residual stream, this layer's output not yet added)."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_forward(x, delta)
        h = self.self_attn(h, ctx)
        if self.sandwich:
            h, x = self.pre_feedforward_layernorm.add_forward(x, self.post_attention_layernorm(h))
            return x, self.post_feedforward_layernorm(self.mlp(h))
        h, x = self.post_attention_layernorm.add_forward(x, h)
        return x, self.mlp(h)


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and final norm (the HF ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.gemma_norms else None


class CausalLM(nn.Module):
    """Decoder plus LM head. ``forward`` gives hidden states; ``compute_logits`` the head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def fuse_projections(self) -> None:
        """Run q/k/v and gate/up as one GEMM each (weights concatenated, the named parameters become views)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def forward(self, input_ids: Tensor, ctx: AttentionContext) -> Tensor:
        """input_ids [num_tokens] (packed) -> hidden states [num_tokens, hidden_size]."""
        x = self.model.embed_tokens(input_ids)
        if self.model.embed_scale is not None:
            x = x * torch.tensor(self.model.embed_scale, dtype=x.dtype)
        delta = None
        for layer in self.model.layers:
            x, delta = layer(x, ctx, delta)
        return self.model.norm(x) if delta is None else self.model.norm.add_forward(x, delta)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [n, hidden_size] -> logits [n, vocab_size] in fp32."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden, weight).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
