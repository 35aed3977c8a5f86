"""Provenance of an evaluation run: everything needed to reproduce (or distrust) a number.

A record names the code (longctx version, git commit and whether the tree was
dirty), the model (sha256 of its weights file(s), cached by size + mtime so a
large file is hashed once), the tokenizer (vocab size, sha256 of its JSON), the
chat template (used or not, and its sha256), the generation settings (stop ids,
max new tokens, truncation rule), the KV spec in canonical form, the seed, the
haystack (sha256), the device and dtype, library versions and a timestamp.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import longctx

# Files of a checkpoint folder that determine the model's behaviour.
_MODEL_FILE_PATTERNS = ("*.safetensors", "*.gguf", "config.json", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TRUNCATION_RULE = (
    "none: the context is built to the requested length in tokens of the model's tokenizer (user-message text, "
    "before the question and chat template); prompts are never truncated, a prompt longer than the model's context "
    "fails with PromptTooLongError (recorded as an error line) unless the KV spec's positions method extends it"
)
HASH_CACHE_NAME = "hash_cache.json"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_cache(cache_path: Path | None) -> dict[str, Any]:
    if cache_path is None or not cache_path.exists():
        return {}
    try:
        return json.loads(cache_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached_sha256(path: Path, cache_path: Path | None) -> str:
    """sha256 of ``path``'s bytes, cached in ``cache_path`` (JSON) under (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    cache = _load_cache(cache_path)
    entry = cache.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path)
    if cache_path is not None:
        cache = _load_cache(cache_path)  # re-read: another process may have added entries
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(cache_path)
        except OSError:
            pass  # a read-only out dir only costs a re-hash next time
    return digest


def model_fingerprint(path: str | Path, cache_path: Path | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "files": {name: sha256}, "bytes"}`` of a model file or checkpoint folder.

    For a folder, ``sha256`` is the sha256 of the sorted ``name:sha256`` lines of its relevant files.
    """
    p = Path(path)
    if p.is_file():
        digest = cached_sha256(p, cache_path)
        return {"path": str(p.resolve()), "sha256": digest, "files": {p.name: digest}, "bytes": p.stat().st_size}
    files = sorted({f for pat in _MODEL_FILE_PATTERNS for f in p.glob(pat) if f.is_file()})
    hashes = {f.name: cached_sha256(f, cache_path) for f in files}
    combined = sha256_text("\n".join(f"{name}:{h}" for name, h in sorted(hashes.items())))
    return {"path": str(p.resolve()), "sha256": combined, "files": hashes,
            "bytes": sum(f.stat().st_size for f in files)}


def git_info(where: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding longctx, or ``None`` values outside git."""
    where = where or Path(longctx.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Vocab size, sha256 of the tokenizer JSON, chat template hash, BOS and stop ids."""
    try:
        tok_json = tokenizer.tok.to_str()
    except Exception:  # noqa: BLE001 - any tokenizer without a JSON form
        tok_json = None
    template = getattr(tokenizer, "chat_template", None)
    return {
        "vocab_size": tokenizer.vocab_size,
        "sha256": sha256_text(tok_json) if tok_json is not None else None,
        "bos_id": getattr(tokenizer, "bos_id", None),
        "add_bos": getattr(tokenizer, "add_bos", None),
        "stop_ids": list(getattr(tokenizer, "stop_ids", ())),
        "chat_template_sha256": sha256_text(template) if template else None,
    }


_GIT_CACHE: dict[str, Any] = {}


def run_provenance(llm: Any, model_path: str | Path, *, seed: int, device: str, dtype: str, chat: bool,
                   haystack_sha256: str, haystack_source: str, out_dir: Path | None = None) -> dict[str, Any]:
    """The per-(run, model) part of a provenance record."""
    if "git" not in _GIT_CACHE:
        _GIT_CACHE["git"] = git_info()
    tok = tokenizer_info(llm.tokenizer)
    cache_path = (Path(out_dir) / HASH_CACHE_NAME) if out_dir is not None else None
    return {
        "longctx_version": longctx.__version__,
        "git_commit": _GIT_CACHE["git"]["commit"],
        "git_dirty": _GIT_CACHE["git"]["dirty"],
        "model": model_fingerprint(model_path, cache_path),
        "model_type": getattr(llm.config, "model_type", None),
        "max_position_embeddings": getattr(llm.config, "max_position_embeddings", None),
        "tokenizer": tok,
        "chat_template_used": bool(chat),
        "chat_template_sha256": tok["chat_template_sha256"] if chat else None,
        "stop_ids": tok["stop_ids"],
        "truncation": TRUNCATION_RULE,
        "seed": seed,
        "haystack_sha256": haystack_sha256,
        "haystack_source": haystack_source,
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(dtype),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _device_name(device: str) -> str:
    try:
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or platform.machine()


def line_provenance(run: dict[str, Any], *, spec: str, task: str, max_new_tokens: int | None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A full record for one result line: the run part plus spec, task and generation settings."""
    rec = dict(run)
    rec.update({"spec": spec, "task": task, "max_new_tokens": max_new_tokens, "sampling": "greedy"})
    if extra:
        rec.update(extra)
    return rec
