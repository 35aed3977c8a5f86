"""Triton kernels, each beside its torch reference twin (``STYLE.md``: kernels beside an oracle).

Importing this package never imports Triton: each kernel module imports it lazily behind a guard, so
``longctx`` works on machines without Triton (the references run anywhere; the wrappers raise a clear error).
``check.run_all()`` compares every kernel with its reference on CUDA (``scripts/gpu_check.py`` calls it).
"""
