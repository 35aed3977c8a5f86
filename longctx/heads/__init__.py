"""Attention-head analysis: which (layer, kv-head) rows copy from far context and which only need sinks + a window.

- :mod:`longctx.heads.prompts`: synthetic copy (needle) and passkey prompts built from the shared corpora;
- :mod:`longctx.heads.contexts`: plain-torch attention contexts for the one decoder (probing, gated mixing);
- :mod:`longctx.heads.retrieval`: retrieval-head scores by a copy-paste probe, plus sink statistics;
- :mod:`longctx.heads.duo`: DuoAttention's gate calibration (model frozen, gates optimised);
- :mod:`longctx.heads.store`: the versioned JSON score file, keyed by the model's content hash;
- :mod:`longctx.heads.binding`: which loaded model a model config belongs to (hash, ``heads=auto``);
- :mod:`longctx.heads.resolve`: ``heads=FILE|auto`` of a budget method -> validated scores;
- :mod:`longctx.heads.select`: scores -> retrieval masks and per-(layer, kv-head) budget tables;
- :mod:`longctx.heads.show`: tables and heatmaps of a score file.
"""
