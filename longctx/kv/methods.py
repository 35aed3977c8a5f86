"""Imports every KV method module so each registers itself. Add one line per new method file."""

from longctx.kv import prefill  # noqa: F401
from longctx.kv.budget import adaptive, duo, headkv, pyramid, razor, uniform  # noqa: F401
from longctx.kv.positions import lm_infinite, native, rerotate, rope_scaling, self_extend  # noqa: F401
from longctx.kv.quant import kivi, none  # noqa: F401
from longctx.kv.retain import (  # noqa: F401
    a2sf,
    corm,
    d2o,
    full,
    h2o,
    hashevict,
    keynorm,
    kvzip,
    snapkv,
    streamingllm,
    tova,
)
from longctx.kv.select import lsh_sampling, quest, read_all, recycled, sparq, tidaldecode, tokenselect  # noqa: F401
