"""longctx: a long-context inference engine with composable KV-cache methods."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
