"""Tiny random checkpoints of every supported architecture, built with transformers and saved with
``save_pretrained`` (plus a small byte-level tokenizer), for architecture coverage on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3", "gemma3", "llama_yarn", "llama_linear",
         "llama_dynamic", "qwen2_sliding")
VOCAB = 300  # 256 byte tokens + specials + spare


def _config(arch: str):  # noqa: ANN202
    import transformers as tf  # noqa: PLC0415

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "llama3_rope":
        return tf.LlamaConfig(**{**common, "max_position_embeddings": 1024}, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0})
    if arch == "llama_yarn":
        return tf.LlamaConfig(**{**common, "max_position_embeddings": 512}, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0})
    if arch == "llama_linear":
        return tf.LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    if arch == "llama_dynamic":
        return tf.LlamaConfig(**{**common, "max_position_embeddings": 32},
                              rope_scaling={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=24, head_dim=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen2_sliding":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=20, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=32, sliding_window=24,
                                   query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention",
                                                                          "sliding_attention"],
                                   final_logit_softcapping=30.0)
    raise ValueError(arch)


def _model_class(arch: str):  # noqa: ANN202
    import transformers as tf  # noqa: PLC0415

    return tf.Gemma3ForCausalLM if arch == "gemma3" else tf.AutoModelForCausalLM


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template, "add_bos_token": False}))


def make_tiny(arch: str, folder: Path, seed: int = 0):  # noqa: ANN201
    """Build, save and return (folder, hf_model) for ``arch``."""
    torch.manual_seed(seed)
    cfg = _config(arch)
    model = _model_class(arch).from_config(cfg, dtype=torch.float32) if arch != "gemma3" else \
        _model_class(arch)(cfg)
    # Random init is small; scale up so attention patterns are not uniform and bugs show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model = model.float().eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder, model
