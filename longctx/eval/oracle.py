"""The transformers oracle of ``longctx eval report --oracle transformers``.

Re-runs a sample of the ``full`` rows of an eval folder through Hugging Face
``transformers`` greedy decoding on the stored prompt ids (``DIR/prompts.jsonl``)
and reports where its answers or scores disagree with longctx's.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.eval.ppl import FULL_SPEC
from longctx.eval.runner import PROMPTS_NAME, read_results


def run_oracle(out_dir: Path, rows: list[dict[str, Any]], max_checks: int = 20, device: str = "cpu",
               progress: bool = False) -> dict[str, Any]:
    """Rerun up to ``max_checks`` ``full`` generation rows through transformers (greedy); compare token ids."""
    candidates = [r for r in rows if r["spec"] == FULL_SPEC and r.get("kind") == "generate" and not r.get("error")
                  and r.get("prompt_sha256") and r.get("output_ids") is not None]
    if not candidates:
        return {"checked": 0, "agree": 0, "disagreements": [], "note": "no full-cache generation rows to check"}
    candidates.sort(key=lambda r: r["key"])
    if len(candidates) > max_checks:
        step = len(candidates) / max_checks
        candidates = [candidates[int(i * step)] for i in range(max_checks)]
    prompts = {p["sha256"]: p["ids"] for p in read_results(out_dir / PROMPTS_NAME) if "sha256" in p}
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in candidates:
        by_model[r["model"]].append(r)
    checked, agree, disagreements, skipped = 0, 0, [], []
    for model, rs in by_model.items():
        prov = rs[0].get("provenance", {})
        jobs = []
        for r in rs:
            ids = prompts.get(r["prompt_sha256"])
            if ids is None:
                skipped.append(f"{r['key']}: prompt ids not stored")
                continue
            jobs.append((r, ids))
        if not jobs:
            continue
        outs = hf_greedy(model, [(ids, int(r["provenance"]["max_new_tokens"])) for r, ids in jobs],
                         stop_ids=prov.get("stop_ids", []), dtype=prov.get("dtype", "fp32"), device=device,
                         progress=progress)
        for (r, _ids), (hf_ids, hf_text) in zip(jobs, outs, strict=True):
            checked += 1
            ours = list(r["output_ids"])
            stop_ids = set(prov.get("stop_ids", []))
            hf_cut = list(hf_ids)
            if hf_cut and hf_cut[-1] in stop_ids:
                hf_cut = hf_cut[:-1]
            if r.get("finish_reason") == "stop" and (not ours or ours[-1] not in stop_ids) and len(hf_cut) > len(ours):
                hf_cut = hf_cut[: len(ours)]  # a stop string ended ours; compare the prefix
            if hf_cut == ours:
                agree += 1
                continue
            first = next((i for i, (a, b) in enumerate(zip(ours, hf_cut, strict=False)) if a != b),
                         min(len(ours), len(hf_cut)))
            hf_score = _rescore(r, hf_text)
            disagreements.append({"key": r["key"], "task": r["task"], "length": r["length"],
                                  "first_diff_token": first, "ours": r.get("output"), "transformers": hf_text,
                                  "our_score": r.get("score"), "transformers_score": hf_score,
                                  "score_differs": hf_score is not None and hf_score != r.get("score")})
    return {"checked": checked, "agree": agree, "disagreements": disagreements, "skipped": skipped,
            "device": device}


def hf_greedy(model: str | Path, jobs: list[tuple[list[int], int]], stop_ids: list[int], dtype: str = "fp32",
              device: str = "cpu", progress: bool = False) -> list[tuple[list[int], str | None]]:
    """Greedy generation with Hugging Face transformers: ``jobs`` = (prompt ids, max new tokens) ->
    (new token ids, decoded text). Works for checkpoint folders and GGUF files transformers can load."""
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
    except ImportError:
        raise LongctxError("--oracle transformers needs the transformers package (pip install transformers)") from None
    p = Path(model)
    if not p.exists():
        raise LongctxError(f"oracle: model {model} no longer exists")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")
        .replace("float16", "fp16"), torch.float32)
    kwargs: dict[str, Any] = {}
    where = str(p)
    if p.is_file():
        if p.suffix != ".gguf":
            raise LongctxError(f"oracle: {model} is neither a checkpoint folder nor a .gguf file")
        where, kwargs = str(p.parent), {"gguf_file": p.name}
    try:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            hf = transformers.AutoModelForCausalLM.from_pretrained(where, torch_dtype=torch_dtype, **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure is a user-facing "cannot check"
        raise LongctxError(f"oracle: transformers cannot load {model}: {type(e).__name__}: {e}") from None
    hf = hf.to(device).eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception:  # noqa: BLE001
        tok = None
    out = []
    iterator = jobs
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        iterator = tqdm(jobs, desc="oracle", unit="prompt")
    eos = list(stop_ids) or None
    for ids, max_new in iterator:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                            eos_token_id=eos, pad_token_id=(eos[0] if eos else 0), num_beams=1,
                            temperature=None, top_p=None, top_k=None)
        new = [int(t) for t in y[0, len(ids):].tolist()]
        cut = new[:-1] if new and eos and new[-1] in eos else new
        text = tok.decode(cut, skip_special_tokens=True) if tok is not None else None
        out.append((new, text))
    return out


def _rescore(row: dict[str, Any], text: str) -> float | None:
    try:
        from longctx.eval.runner import resolve_tasks  # noqa: PLC0415
        from longctx.eval.tasks.base import Question  # noqa: PLC0415

        task = resolve_tasks([row["task"]])[0]
        q = Question(row.get("question") or "", tuple(row.get("expected") or ()), dict(row.get("meta") or {}))
        return float(task.score(text, q))
    except Exception:  # noqa: BLE001 - rescoring is best effort
        return None


# ---- rendering ------------------------------------------------------------------------------
