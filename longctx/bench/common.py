"""Helpers shared by the benchmarks: the default corpus, machine/load description, RSS readings, medians.

The benchmarks' text is, in order: the file given on the command line; ``austen_emma.txt`` in the corpus folder
named by the environment variable ``LONGCTX_CORPORA`` (see :func:`longctx.eval.haystack.default_corpus`); the
development checkout's ``../shared/data/corpora/austen_emma.txt`` when it exists; else the excerpt of *Persuasion*
shipped in the package (``longctx/data/haystack_persuasion.txt``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

from longctx.errors import LongctxError

CORPUS_NAME = "austen_emma.txt"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_corpus(folder: str | Path | None = None) -> Path | None:
    """``austen_emma.txt`` of the corpus folder (``folder``, else ``$LONGCTX_CORPORA``, else the development
    checkout's ``../shared/data/corpora``), or None when there is no such folder or no such file in it."""
    from longctx.eval.haystack import default_corpus as corpus_folder  # noqa: PLC0415

    found = corpus_folder(folder)
    if found is None or not (found / CORPUS_NAME).is_file():
        return None
    return found / CORPUS_NAME


def load_text(path: str | Path | None, corpora: str | Path | None = None) -> tuple[str, str]:
    """(text, source label): the given file, else :func:`default_corpus` (of ``corpora``), else longctx's built-in
    haystack. Raises :class:`LongctxError` when ``path`` is not a readable file."""
    from longctx.eval.needle import builtin_haystack  # noqa: PLC0415

    p = Path(path) if path else default_corpus(corpora)
    if p is None:
        return builtin_haystack(), "longctx built-in haystack (Austen, Persuasion excerpt)"
    if not p.is_file():
        raise LongctxError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8", errors="replace"), str(p)
    except OSError as e:
        raise LongctxError(f"{p}: cannot read text file ({e.strerror or e})") from None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` when tracked files differ from it), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


_NOT_GIVEN: Any = object()


def machine_info(load_before: list[float] | None = _NOT_GIVEN) -> dict[str, Any]:
    """What the numbers were measured on, including the load average (the CPU is shared with other work).

    Given ``load_before`` (:func:`loadavg` taken when the run started; None where the OS has none) the result
    also records it and the load average now, as ``loadavg_before`` / ``loadavg_after``."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": loadavg(),
        "longctx_git": git_revision(),
    }
    if load_before is not _NOT_GIVEN:
        info["loadavg_before"] = load_before
        info["loadavg_after"] = loadavg()
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> float | None:
    """Current resident set size of this process in MiB (Linux), else None."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start) in MiB, else None."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran
        pass


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token sequences (where two engines' outputs part)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
