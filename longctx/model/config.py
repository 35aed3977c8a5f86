"""Model configuration: one typed view of a Hugging Face ``config.json``.

Every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma3) is the same
decoder with a few flags. This module reads the HF config dict once, with
explicit defaults, and turns family differences into those flags. It accepts
both the transformers-4 (``rope_theta`` + ``rope_scaling``) and
transformers-5 (``rope_parameters``) spellings.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from longctx.errors import CheckpointError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding parameters of one layer type.

    ``rope_type`` is one of ROPE_TYPES; ``params`` holds the type's fields
    (``factor``, ``original_max_position_embeddings``, ``low_freq_factor``, ...).
    """

    theta: float
    rope_type: str = "default"
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a decoder-only model, read from an HF config dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    rope_local: RopeConfig | None = None  # rope of sliding layers when it differs (Gemma3)
    layer_types: tuple[str, ...] = ()  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    gemma_norms: bool = False  # (1 + w) RMSNorm, sandwich norms, sqrt(hidden) embedding scale
    attn_scale: float = 0.0  # softmax scale; 0 means head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def window_of(self, layer: int) -> int | None:
        """Sliding window (in tokens) of ``layer``, or None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_of(self, layer: int) -> RopeConfig:
        if self.rope_local is not None and self.is_sliding(layer):
            return self.rope_local
        return self.rope

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V per token over all layers at 2 bytes per element (bf16/fp16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an HF config dict. ``source`` names the file in error messages."""
        try:
            return cls._from_hf(cfg, source)
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as e:  # a field of the wrong type
            raise CheckpointError(f"{source}: invalid config ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_hf(cls, cfg: dict[str, Any], source: str) -> ModelConfig:
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in SUPPORTED_MODEL_TYPES:
            what = "required field 'model_type' is missing" if model_type is None else \
                f"model_type {model_type!r} is not supported"
            raise UnsupportedArchitectureError(
                f"{source}: {what}; "
                f"supported: {', '.join(t for t in SUPPORTED_MODEL_TYPES if t != 'gemma3_text')}"
            )

        def need(key: str, default: Any = None) -> int:
            """A positive integer field; required when ``default`` is None (null counts as absent)."""
            value = cfg.get(key)
            if value is None:
                if default is None:
                    raise CheckpointError(f"{source}: required field {key!r} is missing")
                return default
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 1 \
                    or (isinstance(value, float) and not value.is_integer()):
                raise CheckpointError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
            return int(value)

        hidden = need("hidden_size")
        num_heads = need("num_attention_heads")
        num_layers = need("num_hidden_layers")
        if cfg.get("head_dim") is None and hidden % num_heads:
            raise CheckpointError(f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads "
                                  f"({num_heads}) and no 'head_dim' is given")
        head_dim = need("head_dim", hidden // num_heads)
        num_kv_heads = need("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads ({num_heads}) is not a multiple of "
                                  f"num_key_value_heads ({num_kv_heads})")
        is_gemma = model_type == "gemma3_text"
        rope, rope_local = _read_rope(cfg, is_gemma, source)
        layer_types = _read_layer_types(cfg, model_type, num_layers, source)
        if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
            raise CheckpointError(f"{source}: field 'layer_types' must list 'full_attention' or 'sliding_attention' "
                                  f"for each of the {num_layers} layers, got {list(layer_types)}")
        sliding_window = need("sliding_window") if "sliding_attention" in layer_types else None
        eos = cfg.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [eos]
        if not all(i is None or _is_token_id(i) for i in eos_list):
            raise CheckpointError(f"{source}: field 'eos_token_id' must be a token id or a list of token ids, "
                                  f"got {eos!r}")
        eos_ids = tuple(int(i) for i in eos_list if i is not None)
        bos = cfg.get("bos_token_id")
        if bos is not None and not _is_token_id(bos):
            raise CheckpointError(f"{source}: field 'bos_token_id' must be a token id, got {bos!r}")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise CheckpointError(f"{source}: hidden activation {act!r} is not supported")
        return cls(
            model_type="gemma3" if is_gemma else model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=positive_real(cfg, "rms_norm_eps", 1e-6, source),
            max_position_embeddings=need("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_gemma)),
            rope=rope,
            rope_local=rope_local,
            layer_types=layer_types,
            sliding_window=sliding_window,
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            hidden_act=act,
            gemma_norms=is_gemma,
            attn_scale=positive_real(cfg, "query_pre_attn_scalar", 256.0, source) ** -0.5 if is_gemma
            else 0.0,
            attn_logit_softcapping=positive_real(cfg, "attn_logit_softcapping", None, source),
            final_logit_softcapping=positive_real(cfg, "final_logit_softcapping", None, source),
            bos_token_id=bos,
            eos_token_ids=eos_ids,
        )


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive_real(cfg: dict[str, Any], key: str, default: float | None, source: str) -> float | None:
    """``cfg[key]`` as a finite positive float (``default`` when absent or null); else a CheckpointError naming it."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{source}: invalid config: field {key!r} must be a positive finite number, "
                              f"got {value!r}")
    return float(value)


def _int_field(cfg: dict[str, Any], key: str, default: int, source: str, minimum: int = 1) -> int:
    """``cfg[key]`` as an integer >= ``minimum`` (``default`` when absent or null); else a CheckpointError."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < minimum or not float(value).is_integer():
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CheckpointError(f"{source}: field {key!r} must be {what}, got {value!r}")
    return int(value)


def _read_layer_types(cfg: dict[str, Any], model_type: str, num_layers: int, source: str) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if types:
        if not isinstance(types, list):
            raise CheckpointError(f"{source}: field 'layer_types' must be a list, got {types!r}")
        return tuple(types)
    window = cfg.get("sliding_window")
    if model_type == "mistral" and window:
        return ("sliding_attention",) * num_layers
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and window:
        first = _int_field(cfg, "max_window_layers", num_layers, source, minimum=0)
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    if model_type == "gemma3_text":
        key = "sliding_window_pattern" if cfg.get("sliding_window_pattern") is not None else "_sliding_window_pattern"
        pattern = _int_field(cfg, key, 6, source)
        return tuple(
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
        )
    return ("full_attention",) * num_layers


def rope_from_dict(d: dict[str, Any], default_theta: float, source: str) -> RopeConfig:
    """Parse one rope parameter dict (``rope_type``/``type``, ``rope_theta``, type fields)."""
    d = dict(d)
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    theta = positive_real(d, "rope_theta", default_theta, source)
    d.pop("rope_theta", None)
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type != "default" and "factor" not in d:
        raise CheckpointError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    if "factor" in d:
        positive_real(d, "factor", None, source)
    return RopeConfig(theta=theta, rope_type=rope_type, params=tuple(sorted(d.items())))


def _read_rope(cfg: dict[str, Any], is_gemma: bool, source: str) -> tuple[RopeConfig, RopeConfig | None]:
    theta = positive_real(cfg, "rope_theta", 10000.0, source)
    params = cfg.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise CheckpointError(f"{source}: field {key!r} must be an object, got {cfg[key]!r}")
    if params and ("full_attention" in params or "sliding_attention" in params):
        full = rope_from_dict(params.get("full_attention", {}), theta, source)
        local = rope_from_dict(params.get("sliding_attention", {}), 10000.0, source)
        return full, local
    if params:
        rope = rope_from_dict(params, theta, source)
    else:
        rope = rope_from_dict(cfg.get("rope_scaling") or {}, theta, source)
    if is_gemma:
        return rope, RopeConfig(theta=positive_real(cfg, "rope_local_base_freq", 10000.0, source))
    return rope, None


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
