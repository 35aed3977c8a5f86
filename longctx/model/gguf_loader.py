"""Loading a llama.cpp GGUF file into an in-memory, Hugging-Face-style checkpoint.

:func:`load_gguf` reads a GGUF with the ``gguf`` package (no ``transformers`` at runtime) and returns a
:class:`LoadedCheckpoint`: an HF-like ``config.json`` dict, a float32 ``state_dict`` under HF parameter
names, a ``tokenizers.Tokenizer`` (built in :mod:`longctx.model.gguf_tokenizer`), a tokenizer config and
a generation config.

What is undone from llama.cpp's conversion:

* tensor names (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``, ...);
* dimension order: GGUF lists dims fastest-first (``ne0, ne1``), the reverse of torch's ``(out, in)``;
* quantization: every tensor is dequantized to float32;
* llama/mistral Q and K rows: the converter interleaves the two rotary halves of each head
  (``reshape(heads, 2, d/2, in).swapaxes(1, 2)``) for llama.cpp's RoPE; we apply the inverse;
* Gemma norms: the converter stores ``w + 1`` for every ``*norm.weight``; HF Gemma stores ``w``.

Supported ``general.architecture`` values: llama (model_type "mistral" when general.name says
Mistral), qwen2, qwen3, gemma3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from longctx.errors import CheckpointError, UnsupportedArchitectureError
from longctx.model.gguf_tokenizer import build_tokenizer


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hf_class: str
    permute_qk: bool  # llama.cpp interleaved the rotary halves of Q/K rows
    norm_offset: float  # llama.cpp stored norm weights as w + norm_offset
    hidden_act: str
    ffn_norm: str  # HF name of blk.N.ffn_norm


_LLAMA = _Arch("llama", "LlamaForCausalLM", True, 0.0, "silu", "post_attention_layernorm")
_MISTRAL = _Arch("mistral", "MistralForCausalLM", True, 0.0, "silu", "post_attention_layernorm")
SUPPORTED_ARCHITECTURES: dict[str, _Arch] = {
    "llama": _LLAMA,
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", False, 0.0, "silu", "post_attention_layernorm"),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", False, 0.0, "silu", "post_attention_layernorm"),
    # model_type as HF's Gemma3TextConfig / Gemma3ForCausalLM spell it (GGUFs hold the text model only)
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", False, 1.0, "gelu_pytorch_tanh", "pre_feedforward_layernorm"),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Tensors llama.cpp writes that have no HF parameter (precomputed RoPE frequency factors).
_REQUIRED_LAYER_TENSORS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.down_proj",
    "input_layernorm",
)
_IGNORED_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_ROPE_SCALING_KEYS = {
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


@dataclass
class LoadedCheckpoint:
    """A GGUF checkpoint converted to Hugging Face conventions, entirely in memory."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]


def _read_header(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any], _Arch, dict[str, Any]]:
    """(reader, metadata, architecture, HF-style config) of the GGUF file at ``path``."""
    reader = _open(path)
    meta = {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    arch_name = meta.get("general.architecture")
    if arch_name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path}: unsupported architecture general.architecture={arch_name!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = SUPPORTED_ARCHITECTURES[arch_name]
    if arch is _LLAMA and "mistral" in str(meta.get("general.name", "")).lower():
        arch = _MISTRAL  # llama.cpp converts Mistral models as "llama"
    shapes = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors}
    return reader, meta, arch, _build_config(meta, arch_name, arch, shapes, path)


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """Only the HF-style config of a GGUF file (no weights dequantized, no tokenizer built)."""
    return _read_header(Path(path))[3]


def load_gguf(path: str | Path) -> LoadedCheckpoint:
    """Read the GGUF file at ``path``; raise :class:`CheckpointError` if it is missing, not GGUF,
    truncated or corrupt, and :class:`UnsupportedArchitectureError` for an unknown architecture."""
    path = Path(path)
    reader, meta, arch, config = _read_header(path)
    state_dict = _load_tensors(reader, arch, config, path)
    tokenizer, tokenizer_config, eos_ids = build_tokenizer(meta, path)
    generation_config: dict[str, Any] = {"eos_token_id": eos_ids, "bos_token_id": config.get("bos_token_id")}
    return LoadedCheckpoint(config, state_dict, tokenizer, tokenizer_config, generation_config)


def _open(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .gguf model file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file; pass the path of a .gguf model file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # the reader raises ValueError/IndexError/... on any inconsistency
        raise CheckpointError(f"{path}: GGUF file is truncated or corrupt ({type(err).__name__}: {err})") from err
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(f"{path}: GGUF file is truncated or corrupt (tensor {tensor.name} ends past EOF)")
    return reader


def _field_value(field: gguf.ReaderField) -> Any:
    """A metadata value as a Python scalar, string or list (nested arrays come back as None)."""
    kinds = field.types
    if not kinds:
        return None

    def text(index: int) -> str:
        return bytes(field.parts[index]).decode("utf-8", errors="replace")

    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if len(kinds) != 2:
            return None
        if kinds[1] == gguf.GGUFValueType.STRING:
            return [text(i) for i in field.data]
        if not field.data:
            return []
        values = np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data]).tolist()
        return [bool(v) for v in values] if kinds[1] == gguf.GGUFValueType.BOOL else values
    if kinds[0] == gguf.GGUFValueType.STRING:
        return text(field.data[0])
    value = np.asarray(field.parts[field.data[0]]).reshape(-1)[0].item()
    return bool(value) if kinds[0] == gguf.GGUFValueType.BOOL else value


def _build_config(
    meta: dict[str, Any], arch_name: str, arch: _Arch, shapes: dict[str, tuple[int, ...]], path: Path
) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        return max(value) if isinstance(value, list) and value else value  # per-layer lists

    def count(key: str, default: Any = None) -> Any:
        """A positive integer metadata value; required when ``default`` is None."""
        value = meta.get(f"{arch_name}.{key}")
        if value is None:
            if default is None:
                raise CheckpointError(f"{path}: GGUF metadata lacks required key {arch_name}.{key}")
            return default
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise CheckpointError(f"{path}: GGUF metadata {arch_name}.{key} must be a positive integer, got {value!r}")
        return max(values)

    hidden, layers, heads = count("embedding_length"), count("block_count"), count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise CheckpointError(f"{path}: GGUF metadata {arch_name}.attention.head_count ({heads}) is not a multiple "
                              f"of {arch_name}.attention.head_count_kv ({kv_heads})")
    q_shape = shapes.get("blk.0.attn_q.weight")
    if meta.get(f"{arch_name}.attention.key_length") is not None:
        head_dim = count("attention.key_length")
    else:
        rows, what = (q_shape[0], "blk.0.attn_q rows") if q_shape else (hidden, f"{arch_name}.embedding_length")
        if rows % heads:
            raise CheckpointError(f"{path}: GGUF {what} ({rows}) is not divisible by {arch_name}.attention.head_count "
                                  f"({heads}) and {arch_name}.attention.key_length is not given")
        head_dim = rows // heads
    embed = shapes.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "_name_or_path": meta.get("general.name"),
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length", shapes.get("blk.0.ffn_up.weight", (None,))[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": arch.hidden_act,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": embed[0] if embed else get("vocab_size", len(tokens)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if isinstance(value := meta.get(f"tokenizer.ggml.{key}"), int):
            config[f"{name}_token_id"] = value
    scaling_type = get("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        prefix = f"{arch_name}.rope.scaling."
        config["rope_scaling"] = {"rope_type": scaling_type}
        for key, value in meta.items():
            if key.startswith(prefix) and key != prefix + "type":
                suffix = key[len(prefix) :]
                config["rope_scaling"][_ROPE_SCALING_KEYS.get(suffix, suffix)] = value
    if (window := get("attention.sliding_window")) is not None:
        config["sliding_window"] = window
    if arch.model_type == "gemma3_text":
        pattern = meta.get(f"{arch_name}.attention.sliding_window_pattern", 6)  # llama.cpp's default: 6
        if not isinstance(pattern, list):
            pattern = count("attention.sliding_window_pattern", 6)
        elif len(pattern) != layers:
            raise CheckpointError(f"{path}: GGUF metadata {arch_name}.attention.sliding_window_pattern lists "
                                  f"{len(pattern)} layers, not {arch_name}.block_count ({layers})")
        if isinstance(pattern, list):  # per layer, True = sliding window
            layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        else:  # every pattern-th layer is global, the others use the sliding window
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
        config.update(
            hidden_activation=arch.hidden_act,
            # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B model, 1/sqrt(head_dim) otherwise
            query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
            layer_types=layer_types,
            rope_local_base_freq=10000.0,  # llama.cpp hard-codes the sliding layers' RoPE base
            final_logit_softcapping=get("final_logit_softcapping"),
            attn_logit_softcapping=get("attn_logit_softcapping"),
            attention_dropout=0.0,
        )
        if not isinstance(pattern, list):
            config["sliding_window_pattern"] = pattern
    return config


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row interleave: within each head, GGUF row ``2*i + j`` is HF row
    ``j*(d/2) + i`` (HF keeps the two rotary halves as contiguous blocks)."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_name(name: str, arch: _Arch) -> str | None:
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        hf = arch.ffn_norm if parts[2] == "ffn_norm" else _LAYER_NAMES.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{suffix}"
    return None


def _load_tensors(reader: gguf.GGUFReader, arch: _Arch, config: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        hf_name = _hf_name(tensor.name, arch)
        if hf_name is None:
            raise CheckpointError(
                f"{path}: unexpected tensor {tensor.name!r} for a {arch.model_type} model; "
                "this GGUF variant is not supported"
            )
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = np.asarray(values, dtype=np.float32).reshape(shape)
        except NotImplementedError as err:
            raise CheckpointError(
                f"{path}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which the "
                f"installed gguf package cannot dequantize ({err})"
            ) from err
        except ValueError as err:
            raise CheckpointError(f"{path}: tensor {tensor.name} is corrupt ({err})") from err
        if np.shares_memory(values, tensor.data) or not values.flags.writeable:
            values = values.copy()  # detach from the read-only file mapping
        weight = torch.from_numpy(values)
        if arch.permute_qk and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = _unpermute_rope_rows(weight, config["num_attention_heads"])
        elif arch.permute_qk and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = _unpermute_rope_rows(weight, config["num_key_value_heads"])
        if arch.norm_offset and hf_name.endswith("norm.weight"):
            weight = weight - arch.norm_offset
        state_dict[hf_name] = weight.contiguous()
    _check_complete(state_dict, config, path)
    return state_dict


def _check_complete(state_dict: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config["num_hidden_layers"]):
        required += [f"model.layers.{i}.{name}.weight" for name in _REQUIRED_LAYER_TENSORS]
    missing = [name for name in required if name not in state_dict]
    if missing:
        raise CheckpointError(f"{path}: GGUF file lacks tensors {missing[:5]} ({len(missing)} missing)")
