"""Imports every KV method module so each registers itself. Add one line per new method file."""

from longctx.kv import prefill, select  # noqa: F401
from longctx.kv.budget import adaptive, pyramid, uniform  # noqa: F401
from longctx.kv.positions import lm_infinite, native, rerotate, rope_scaling, self_extend  # noqa: F401
from longctx.kv.quant import kivi, none  # noqa: F401
from longctx.kv.retain import a2sf, corm, full, h2o, keynorm, snapkv, streamingllm, tova  # noqa: F401
