"""Every supported architecture against transformers, on tiny random checkpoints (``tests.tiny``).

transformers is the oracle: prompt logits (fp32, 1e-4), greedy generation token for token, batched
runs against one-prompt runs, a bf16 smoke test, and a sharded checkpoint. Prompts are longer than
every sliding window (20-24 tokens) and than ``llama_dynamic``'s 32-token trained context, so
window masking/trimming and dynamic NTK are exercised.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.errors import CheckpointError
from longctx.kv.spec import KVSpec
from tests.tiny import ARCHS, VOCAB, write_tokenizer

TinyCheckpoint = Callable[[str], tuple[Path, Any]]

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ATOL = 1e-4
PROMPT_LEN = 50
BATCH_LENS = (40, 53, 47)
MAX_NEW = 20


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def _reset_hf_rope(hf: torch.nn.Module) -> None:
    """Undo transformers' dynamic-NTK state (``inv_freq`` grown by an earlier, longer call and kept):
    each oracle call must start from the checkpoint's own frequencies, as longctx does per request."""
    for m in hf.modules():
        if hasattr(m, "original_inv_freq") and hasattr(m, "original_max_seq_len"):
            m.register_buffer("inv_freq", m.original_inv_freq.clone(), persistent=False)
            m.max_seq_len_cached = m.original_max_seq_len


@torch.no_grad()
def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    _reset_hf_rope(hf)
    return hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0].float()


@torch.no_grad()
def _hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    _reset_hf_rope(hf)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=VOCAB - 1)
    return out[0, len(ids):].tolist()


GREEDY = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_transformers(arch: str, tiny_checkpoint: TinyCheckpoint) -> None:
    folder, hf = tiny_checkpoint(arch)
    ids = _ids(PROMPT_LEN, seed=1)
    ours = LLM(folder).prompt_logits(ids)
    ref = _hf_logits(hf, ids)
    assert ours.shape == ref.shape == (PROMPT_LEN, VOCAB)
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{arch}: max |logit diff| {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_generation_matches_transformers(arch: str, tiny_checkpoint: TinyCheckpoint) -> None:
    folder, hf = tiny_checkpoint(arch)
    prompts = [_ids(n, seed=10 + i) for i, n in enumerate(BATCH_LENS)]
    llm = LLM(folder)
    outs = llm.generate(prompts, GREEDY)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        ref = _hf_greedy(hf, p, MAX_NEW)
        assert len(ref) == MAX_NEW
        assert out.token_ids == ref, f"{arch}: prompt {i} ({len(p)} tokens) diverges from transformers"
        assert out.stats.finish_reason == "length"
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_one_prompt_at_a_time(arch: str, tiny_checkpoint: TinyCheckpoint) -> None:
    folder, _ = tiny_checkpoint(arch)
    prompts = [_ids(n, seed=10 + i) for i, n in enumerate(BATCH_LENS)]
    llm = LLM(folder)
    batched = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    single = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert batched == single


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prefill_last_token_logits_equal_single_prompt_logits(arch: str,
                                                                      tiny_checkpoint: TinyCheckpoint) -> None:
    """One packed forward over three prompts gives each prompt the last-token logits it gets alone
    (and that transformers gives it)."""
    folder, hf = tiny_checkpoint(arch)
    prompts = [_ids(n, seed=10 + i) for i, n in enumerate(BATCH_LENS)]
    llm = LLM(folder)
    reqs = [llm._make_request(p, GREEDY, KVSpec.parse("full"), chat=False) for p in prompts]
    try:
        batched = llm.runner.run([(r, len(p)) for r, p in zip(reqs, prompts, strict=True)])
    finally:
        for r in reqs:
            r.kv.release()
    assert batched.shape == (len(prompts), VOCAB)
    for i, p in enumerate(prompts):
        single = llm.prompt_logits(p)[-1]
        ref = _hf_logits(hf, p)[-1]
        assert (batched[i] - single).abs().max().item() <= ATOL, f"{arch}: prompt {i} batched != alone"
        assert (batched[i] - ref).abs().max().item() <= ATOL, f"{arch}: prompt {i} batched != transformers"
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_agree_with_fp32_transformers(arch: str, tiny_checkpoint: TinyCheckpoint) -> None:
    folder, hf = tiny_checkpoint(arch)
    ids = _ids(PROMPT_LEN, seed=2)
    llm = LLM(folder, dtype="bf16")
    assert llm.dtype == torch.bfloat16 and llm.pool.dtype == torch.bfloat16
    ours = llm.prompt_logits(ids)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    ref = _hf_logits(hf, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"{arch}: bf16 argmax agrees with fp32 on only {agree:.0%} of positions"
    diff = (ours - ref).abs().max().item()  # logits here span about +-2.5; bf16 noise is ~0.05
    assert diff <= 0.1, f"{arch}: bf16 max |logit diff| {diff:.3g} > 0.1"


def test_sharded_checkpoint_loads_with_identical_logits(tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    folder, hf = tiny_checkpoint("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    write_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1, "expected several shards"
    assert not (sharded / "model.safetensors").exists()
    ids = _ids(PROMPT_LEN, seed=3)
    ours = LLM(sharded).prompt_logits(ids)
    assert torch.equal(ours, LLM(folder).prompt_logits(ids))
    assert (ours - _hf_logits(hf, ids)).abs().max().item() <= ATOL


def test_sharded_checkpoint_with_a_stray_safetensors_file_reads_only_indexed_shards(
        tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    """The index decides which files are weights: an unrelated ``*.safetensors`` beside the shards is ignored."""
    folder, hf = tiny_checkpoint("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    write_tokenizer(sharded)
    shutil.copy(folder / "model.safetensors", sharded / "zz-backup.safetensors")
    ids = _ids(PROMPT_LEN, seed=4)
    assert (LLM(sharded).prompt_logits(ids) - _hf_logits(hf, ids)).abs().max().item() <= ATOL


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_outside_the_model_folder_are_refused(tiny_checkpoint: TinyCheckpoint, tmp_path: Path,
                                                            escape: str) -> None:
    folder, _ = tiny_checkpoint("llama")
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": escape}}))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        LLM(model)
