"""The head-score file: small, versioned JSON, keyed by the model's content hash and the probe settings.

Layout (``version`` 1)::

    {"format": "longctx-heads", "version": 1, "method": "retrieval" | "duo",
     "model": {"sha256": ..., "name": ..., "num_layers": L, "num_kv_heads": H, "num_heads": Hq},
     "settings": {...every probe / calibration setting...},
     "scores": [[float] * H] * L,          # higher = more of a retrieval head
     "extra": {"sink_mass": [[...]], ...},  # other [L][H] statistics
     "history": [float, ...],               # calibration losses, one per step (duo)
     "checksum": sha256 of the canonical JSON of everything above}

:func:`load_scores` rejects, with one line naming the file, anything that is not such a file (bad JSON, other
format or version, missing fields, wrong shapes, non-finite numbers, a checksum that does not match) and, given the
expected model hash, a file scored for another model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError

FORMAT = "longctx-heads"
VERSION = 1
METHODS = ("retrieval", "duo")


class HeadScoresError(LongctxError):
    """A head-score file is missing, corrupt, or belongs to another model."""


Grid = list[list[float]]


@dataclass(frozen=True)
class HeadScores:
    """Per-(layer, kv-head) scores of one model under one probe."""

    method: str
    model_sha256: str
    model_name: str
    num_layers: int
    num_kv_heads: int
    num_heads: int
    settings: dict[str, Any]
    scores: Grid
    extra: dict[str, Grid] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "method": self.method,
            "model": {"sha256": self.model_sha256, "name": self.model_name, "num_layers": self.num_layers,
                      "num_kv_heads": self.num_kv_heads, "num_heads": self.num_heads},
            "settings": self.settings, "scores": self.scores, "extra": self.extra, "history": self.history,
        }

    def to_json(self) -> str:
        body = self.payload()
        body["checksum"] = _checksum(body)
        return json.dumps(body, indent=1, sort_keys=True)


def _checksum(body: dict[str, Any]) -> str:
    canon = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def settings_key(method: str, settings: dict[str, Any]) -> str:
    """A short stable hash of a probe's method and settings (part of the cache file name)."""
    return hashlib.sha256(json.dumps([method, settings], sort_keys=True).encode()).hexdigest()[:12]


def save_scores(scores: HeadScores, path: str | Path) -> Path:
    """Write ``scores`` to ``path`` atomically (a temporary file renamed over it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(scores.to_json())
        tmp.replace(path)
    except OSError as e:
        raise HeadScoresError(f"cannot write heads file {path}: {e.strerror or e}") from None
    return path


def _grid(value: Any, layers: int, heads: int, what: str) -> Grid:
    if not isinstance(value, list) or len(value) != layers:
        raise ValueError(f"{what} must be {layers} rows (layers)")
    out = []
    for row in value:
        if not isinstance(row, list) or len(row) != heads:
            raise ValueError(f"{what} rows must hold {heads} numbers (kv-heads)")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row):
            raise ValueError(f"{what} holds a value that is not a finite number")
        out.append([float(x) for x in row])
    return out


def parse_scores(text: str, where: str = "heads file") -> HeadScores:
    """Parse and validate the text of a score file (no model check)."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadScoresError(f"{where} is corrupt: not JSON ({e.msg} at line {e.lineno})") from None
    try:
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if body.get("version") != VERSION:
            raise ValueError(f"version {body.get('version')!r}, this longctx reads version {VERSION}")
        if body.get("checksum") != _checksum(body):
            raise ValueError("checksum mismatch (truncated or edited)")
        method = body["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        model = body["model"]
        layers, kv_heads, heads = (int(model[k]) for k in ("num_layers", "num_kv_heads", "num_heads"))
        if layers < 1 or kv_heads < 1 or heads < kv_heads:
            raise ValueError("bad model shape")
        extra = body.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError("extra must be an object")
        history = body.get("history") or []
        if not isinstance(history, list) or not all(isinstance(x, (int, float)) for x in history):
            raise ValueError("history must be a list of numbers")
        settings = body["settings"]
        if not isinstance(settings, dict):
            raise ValueError("settings must be an object")
        return HeadScores(
            method=method, model_sha256=str(model["sha256"]), model_name=str(model.get("name", "")),
            num_layers=layers, num_kv_heads=kv_heads, num_heads=heads, settings=settings,
            scores=_grid(body["scores"], layers, kv_heads, "scores"),
            extra={str(k): _grid(v, layers, kv_heads, f"extra.{k}") for k, v in extra.items()},
            history=[float(x) for x in history],
        )
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise HeadScoresError(f"{where} is corrupt: {what}") from None


def load_scores(path: str | Path, model_sha256: str | None = None,
                shape: tuple[int, int] | None = None) -> HeadScores:
    """Read and validate ``path``; with ``model_sha256`` / ``shape`` ((layers, kv-heads)), reject another model's."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadScoresError(f"heads file {path} does not exist; create it with `longctx heads score`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HeadScoresError(f"heads file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    scores = parse_scores(text, f"heads file {path}")
    check_model(scores, path, model_sha256, shape)
    return scores


def check_model(scores: HeadScores, path: str | Path, model_sha256: str | None,
                shape: tuple[int, int] | None) -> None:
    """Raise :class:`HeadScoresError` if ``scores`` were not made for this model."""
    if model_sha256 is not None and scores.model_sha256 != model_sha256:
        raise HeadScoresError(
            f"heads file {path} belongs to another model ({scores.model_name or '?'}, sha256 "
            f"{scores.model_sha256[:12]}), not this one (sha256 {model_sha256[:12]}); score this model with "
            f"`longctx heads score --model PATH`")
    if shape is not None and (scores.num_layers, scores.num_kv_heads) != tuple(shape):
        raise HeadScoresError(
            f"heads file {path} is for a model with {scores.num_layers} layers x {scores.num_kv_heads} kv-heads, "
            f"this one has {shape[0]} x {shape[1]}")
