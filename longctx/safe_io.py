"""Output folders and files written safely: checked writable before any work, never through symlinks.

``prepare_output_dir`` runs before a long job (an eval run, a benchmark) so that a bad ``--out`` fails
in the first second instead of after the work, losing the results. ``open_for_write`` opens a file
with ``O_NOFOLLOW``, so a symlink planted in an output folder cannot redirect a write outside it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO

from longctx.errors import LongctxError


def prepare_output_dir(path: str | Path, what: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check it is a real, writable folder."""
    out = Path(path)
    if out.is_symlink():
        raise LongctxError(f"{what} {out} is a symlink; give a real folder")
    if out.exists() and not out.is_dir():
        raise LongctxError(f"{what} {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".longctx-write-check-"):
            pass
    except OSError as e:
        raise LongctxError(f"{what} {out} is not writable ({e.strerror or e})") from None
    return out


def open_for_write(path: str | Path, mode: str = "w") -> IO:
    """``open(path, mode)`` for ``w``/``a`` (text) or ``wb``/``ab`` that refuses to follow a symlink."""
    if mode not in ("w", "a", "wb", "ab"):
        raise ValueError(f"mode must be one of w, a, wb, ab; got {mode!r}")
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if Path(path).is_symlink():
            raise LongctxError(f"{path} is a symlink; refusing to write through it") from None
        raise LongctxError(f"cannot write {path} ({e.strerror or e})") from None
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def write_text(path: str | Path, text: str) -> None:
    with open_for_write(path, "w") as f:
        f.write(text)
