"""Rebuilding a Hugging Face ``tokenizers.Tokenizer`` from a GGUF file's tokenizer metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``),
token kinds (``token_type``), BPE merges or SentencePiece scores, and special-token ids as metadata.
:func:`build_tokenizer` turns that metadata into a ``tokenizers.Tokenizer`` that encodes and decodes
like the tokenizer ``transformers`` builds from the same file, plus an HF-style tokenizer config.

Supported ``tokenizer.ggml.model`` values:

* ``"gpt2"``: byte-level BPE (SmolLM2, Llama 3, Qwen2/3, ...). The split regex is picked from
  ``tokenizer.ggml.pre``; pre-types without an entry use GPT-2's own regex (what transformers does).
* ``"llama"``: SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma). Merges are recovered
  from the token scores (Gemma: from the token order) when the file lists none.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from longctx.errors import CheckpointError

# llama.cpp token types (llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex applied before the byte-level mapping. Anything else (e.g. "smollm",
# "gpt2", "starcoder", "default") uses the GPT-2 regex built into tokenizers' ByteLevel pre-tokenizer.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}

_EOG_TOKEN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def derive_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens, best score first; ties go to longer left then longer right pieces, then to token order."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    candidates: list[tuple[float, int, int, str, str]] = []
    for token, score in dict(zip(tokens, scores, strict=False)).items():
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((-score, -len(left), -len(right), left, right) for left, right in local)
    candidates.sort(key=lambda c: c[:3])  # stable: equal keys keep their order
    return [(left, right) for _, _, _, left, right in candidates]


def _byte_level_model(tokens: Sequence[str], merges: list[tuple[str, str]]) -> Tokenizer:
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[spelled] = index
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _set_byte_level_split(tokenizer: Tokenizer, pre_type: str | None) -> None:
    split = PRE_TOKENIZER_SPLITS.get(pre_type or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )


def _sentencepiece_model(
    tokens: Sequence[str], merges: list[tuple[str, str]], unk: str | None, gemma: bool, add_space_prefix: bool
) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # Gemma: spaces become "▁" verbatim, no prefix space, no pre-splitting
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    else:
        scheme = "first" if add_space_prefix else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        if add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _token(tokens: Sequence[str], token_id: Any) -> str | None:
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return None


def build_tokenizer(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, Any], list[int]]:
    """Build ``(tokenizer, tokenizer_config, eos_token_ids)`` from GGUF metadata of the file at ``path``.

    ``eos_token_ids`` lists every end-of-generation id: ``eos``, ``eot``/``eom`` if given, and control
    tokens spelled like a known end-of-turn marker (llama.cpp stops on these too).
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise CheckpointError(
            f"{path}: unsupported tokenizer model tokenizer.ggml.model={kind!r}; "
            f"longctx supports {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    if not tokens:
        raise CheckpointError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens vocabulary")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    arch = meta.get("general.architecture", "")
    gemma = kind == "llama" and str(arch).startswith("gemma")
    raw_merges = meta.get("tokenizer.ggml.merges")
    merges = [(left, right) for left, _, right in (m.partition(" ") for m in raw_merges)] if raw_merges else None
    ids = {
        name: meta.get(f"tokenizer.ggml.{key}")
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
            ("eot", "eot_token_id"),
            ("eom", "eom_token_id"),
        )
    }
    if kind == "gpt2":
        if merges is None:
            merges = derive_merges(tokens, [-float(i) for i in range(len(tokens))])
        tokenizer = _byte_level_model(tokens, merges)
        _set_byte_level_split(tokenizer, meta.get("tokenizer.ggml.pre"))
        letters: set[str] | None = set(byte_alphabet().values())
    else:
        spelled = list(tokens)
        if gemma:  # Gemma stores tokens made only of spaces with real spaces; the model sees "▁"s
            spelled = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
        if merges is None:
            scores = meta.get("tokenizer.ggml.scores")
            if gemma or not scores:  # Gemma's scores do not follow its merge order; its token order does
                scores = [-float(i) for i in range(len(spelled))]
            merges = derive_merges(spelled, scores)
        unk = _token(spelled, ids["unk"])
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer = _sentencepiece_model(spelled, merges, unk, gemma, add_prefix)
        tokens, letters = spelled, None

    control = [
        t
        for t, k in zip(tokens, types, strict=False)
        if k == TOKEN_TYPE_CONTROL and (letters is None or set(t) <= letters)
    ]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user = [t for t, k in zip(tokens, types, strict=False) if k == TOKEN_TYPE_USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = _token(tokens, ids["bos"]), _token(tokens, ids["eos"])
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = " ".join([*(["BOS:0"] if add_bos else []), "$A:0", *(["EOS:0"] if add_eos else [])])
    pair = " ".join([single, *(["BOS:1"] if add_bos else []), "$B:1", *(["EOS:1"] if add_eos else [])])
    specials = [
        {"id": name, "ids": [ids[key]], "tokens": [text]}
        for name, key, text, on in (("BOS", "bos", bos, add_bos), ("EOS", "eos", eos, add_eos))
        if on
    ]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    config: dict[str, Any] = {
        "tokenizer_model": kind,
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "additional_special_tokens": control,
    }
    for name in ("unk", "pad"):
        if (text := _token(tokens, ids[name])) is not None:
            config[f"{name}_token"] = text
    eos_ids = [ids[k] for k in ("eos", "eot", "eom") if isinstance(ids[k], int)]
    controls = set(control)
    for index, token in enumerate(tokens):
        if token in _EOG_TOKEN_TEXTS and token in controls and index not in eos_ids:
            eos_ids.append(index)
    return tokenizer, config, eos_ids
