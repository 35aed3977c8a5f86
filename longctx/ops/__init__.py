"""Fused elementwise ops of the decoder (RMSNorm, residual add + RMSNorm, gated activation, RoPE + KV write).

Each op lives in its own module as three pieces (``STYLE.md``): a plain-torch reference twin (the
definition, what runs on CPU and what the tests check), a Triton kernel, and a dispatcher that picks the
kernel for CUDA tensors when Triton is importable. ``LONGCTX_KERNELS=torch`` forces the twins everywhere
(e.g. to bisect a GPU difference). Without fusion a decode step of an 8B model runs ~1,500 tiny kernels
(an fp32 RMSNorm alone is seven); these ops cut that to a handful per layer.
``check.run_all()`` compares every kernel with its twin on CUDA (``scripts/gpu_check.py`` calls it).
"""
