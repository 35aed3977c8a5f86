"""Tokenizers and haystacks for the task-generator tests (built once per session, kept cheap)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from longctx.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The byte-level tokenizer of ``tests.tiny`` (one token per UTF-8 byte)."""
    from tests.tiny import write_tokenizer

    folder = tmp_path_factory.mktemp("byte_tokenizer")
    write_tokenizer(folder)
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="session")
def smol_tokenizer(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """SmolLM2's BPE tokenizer, built from the GGUF's metadata only (no weights) and cached as tokenizer.json in
    pytest's cache (reading the GGUF metadata takes seconds; the JSON loads in a fraction of one)."""
    import longctx.model.gguf_tokenizer as gguf_tokenizer
    from longctx.errors import CheckpointError
    from longctx.model.default_model import default_model_path
    from longctx.model.gguf_loader import _field_value, _open

    try:
        smollm2_path = default_model_path()
    except CheckpointError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    stat = smollm2_path.stat()
    key = hashlib.sha256(f"{smollm2_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()
                         + Path(gguf_tokenizer.__file__).read_bytes()).hexdigest()[:16]
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    name = f"longctx_smollm2_tokenizer_{key}"
    folder = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    if not (folder / "tokenizer.json").exists():
        reader = _open(smollm2_path)
        meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tok, cfg, eos = gguf_tokenizer.build_tokenizer(meta, smollm2_path)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        tok.save(str(folder / "tokenizer.tmp.json"))
        (folder / "tokenizer.tmp.json").replace(folder / "tokenizer.json")
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="session")
def synthetic() -> str:
    from longctx.eval.haystack import load_haystack

    return load_haystack(None)


@pytest.fixture(scope="session")
def corpus() -> str:
    """The project's benchmark corpora (all ``*.txt`` of ``../shared/data/corpora``, ~2.5M tokens), if present."""
    from longctx.eval.haystack import default_corpus, load_haystack

    folder = default_corpus()
    if folder is None:
        pytest.skip("../shared/data/corpora is not present")
    return load_haystack(folder)
