"""Benchmarks: CPU generation speed against Hugging Face transformers, and a needle-retrieval table per KV method.

Run them as modules (``python -m longctx.bench.cpu_generation``, ``python -m longctx.bench.needle_table``);
results and how to read them are in ``BENCHMARKS.md``.
"""
