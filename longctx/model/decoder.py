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
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


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

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
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

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        if self.act == "silu":
            gate = F.silu(gate)
        else:
            gate = F.gelu(gate, approximate="tanh" if self.act == "gelu_pytorch_tanh" else "none")
        return self.down_proj(gate * self.up_proj(x))


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

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def forward(self, input_ids: Tensor, ctx: AttentionContext) -> Tensor:
        """input_ids [num_tokens] (packed) -> hidden states [num_tokens, hidden_size]."""
        x = self.model.embed_tokens(input_ids)
        if self.model.embed_scale is not None:
            x = x * torch.tensor(self.model.embed_scale, dtype=x.dtype)
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [n, hidden_size] -> logits [n, vocab_size] in fp32."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden, weight).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
