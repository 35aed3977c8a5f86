"""The evaluation grid: models × KV specs × tasks × lengths × samples, resumable, batched.

:func:`run_grid` appends one JSON line per (model, spec, task, length, sample,
question) to ``out_dir/results.jsonl``: the score, the output text and ids, the
expected answers, the question's metadata (depth, ...), KV bytes held / after
prefill / peak next to what a full cache would hold, prompt tokens, time to
first token and per output token, and a full provenance record (see
:mod:`longctx.eval.provenance`). Each line has a stable ``key``; a rerun skips
every key already in the file, so an interrupted grid continues where it
stopped.

For each (model, length, task) the samples are built once; for each spec, all
questions of all samples go to the engine in ONE ``generate`` call (the engine
batches them and prefills a context shared by several questions once). The
task ``ppl`` (:mod:`longctx.eval.ppl`) scores perplexity instead of generating.

Prompt token ids are stored once each, deduplicated by sha256, in
``out_dir/prompts.jsonl`` so an oracle (``longctx eval report --oracle``) can
rerun exactly what the engine saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longctx.errors import LongctxError
from longctx.eval.ppl import PPL_TASK, PerplexityTask
from longctx.eval.provenance import line_provenance, run_provenance, sha256_text
from longctx.kv.spec import KVSpec

RESULTS_NAME = "results.jsonl"
PROMPTS_NAME = "prompts.jsonl"
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


# ---- argument parsing -----------------------------------------------------------------------
def parse_lengths(text: str | int | Sequence[str | int]) -> list[int]:
    """``"2k,4k,8k"`` -> ``[2048, 4096, 8192]``; plain ints pass through; ``1.5k`` -> 1536."""
    items: list[str | int]
    if isinstance(text, int):
        items = [text]
    elif isinstance(text, str):
        items = [t for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    if not items:
        raise LongctxError("no context lengths given; e.g. --lengths 2k,4k,8k")
    out: list[int] = []
    for item in items:
        if isinstance(item, int):
            value = item
        else:
            m = _LENGTH.match(str(item))
            if not m:
                raise LongctxError(f"bad length {item!r}; write tokens as 2048 or 2k (k = 1024), comma-separated")
            num = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
            if not num.is_integer():
                raise LongctxError(f"bad length {item!r}: not a whole number of tokens")
            value = int(num)
        if value < 1:
            raise LongctxError(f"bad length {item!r}: must be positive")
        if value not in out:
            out.append(value)
    return out


def parse_specs(text: str | KVSpec | Sequence[str | KVSpec]) -> list[str]:
    """Specs separated by ';' (or a list) -> canonical spec strings, duplicates removed, order kept."""
    items = [s for s in text.split(";")] if isinstance(text, str) else [text] if isinstance(text, KVSpec) else list(text)
    items = [s for s in items if not isinstance(s, str) or s.strip()]
    if not items:
        raise LongctxError("no KV specs given; e.g. --kv 'full; snapkv:512'")
    out: list[str] = []
    for s in items:
        canonical = str(KVSpec.parse(s.strip() if isinstance(s, str) else s))  # SpecError names the bad part
        if canonical not in out:
            out.append(canonical)
    return out


def resolve_tasks(names: str | Sequence[Any]) -> list[Any]:
    """Task names (comma-separated or a list; group aliases like ``ruler`` expand) -> task objects.

    Task objects (anything with ``name`` and ``samples``/``windows``) pass through unchanged.
    """
    items = [t.strip() for t in names.split(",") if t.strip()] if isinstance(names, str) else list(names)
    if not items:
        raise LongctxError("no tasks given; e.g. --tasks needle,ruler,ppl")
    out: list[Any] = []
    for item in items:
        found = [item] if not isinstance(item, str) else _lookup_task(item)
        for task in found:
            if task.name not in [t.name for t in out]:
                out.append(task)
    return out


def _lookup_task(name: str) -> list[Any]:
    from longctx.eval import tasks as registry  # noqa: PLC0415

    key = name.strip().lower()
    if key == PPL_TASK:
        return [PerplexityTask()]
    if key in registry.GROUPS:
        return [registry.get_task(n) for n in registry.GROUPS[key]]
    if key not in registry.TASKS:
        groups = ", ".join(f"{g} ({'+'.join(n)})" for g, n in registry.GROUPS.items())
        raise LongctxError(f"unknown task {name!r}; tasks: {', '.join([*registry.TASKS, PPL_TASK])}; groups: {groups}")
    return [registry.get_task(key)]


def load_haystack(haystack: str | Path | None) -> tuple[str, str]:
    """``(text, source)``: :func:`longctx.eval.haystack.load_haystack` of a file or folder of ``*.txt``, or the
    built-in synthetic filler when ``haystack`` is None."""
    from longctx.eval import haystack as hmod  # noqa: PLC0415

    text = hmod.load_haystack(haystack)
    return text, "builtin:synthetic_filler" if haystack is None else str(Path(haystack).resolve())


def prompt_text(sample: Any, question: Any) -> str:
    """The user message for ``question`` about ``sample``: the context first, the question last."""
    try:
        from longctx.eval.tasks import base  # noqa: PLC0415

        build = getattr(base, "build_prompt", None) or getattr(base, "prompt_text", None)
        if build is not None:
            return build(sample, question)
    except ImportError:  # pragma: no cover
        pass
    sep = "" if sample.context.endswith("\n") or question.text.startswith("\n") else "\n\n"
    return f"{sample.context}{sep}{question.text}"


# ---- results file ---------------------------------------------------------------------------
def read_results(path: Path) -> list[dict[str, Any]]:
    """Every parseable line of a results file (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class _Writer:
    """Appends JSON lines, flushing after each batch; repairs a missing final newline first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, 2)
                last = f.read(1)
            if last != b"\n":
                with open(path, "ab") as f:
                    f.write(b"\n")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
            f.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def result_key(model_sha: str, spec: str, task: str, length: int, seed: int, chat: bool, haystack_sha: str,
               sample_id: str, question_index: int | None) -> str:
    q = "-" if question_index is None else str(question_index)
    return "|".join([model_sha[:16], spec, task, str(length), f"seed={seed}", f"chat={int(chat)}",
                     f"hay={haystack_sha[:12]}", sample_id, q])


# ---- the grid -------------------------------------------------------------------------------
@dataclass
class GridSummary:
    out_dir: Path
    written: int = 0
    skipped: int = 0
    errors: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS_NAME


@dataclass
class _Item:
    """One pending unit of work: a question of a sample (or a ppl window)."""

    key: str
    sample: Any
    sample_index: int
    question_index: int | None
    question: Any = None
    prompt_ids: list[int] | None = None


def run_grid(
    models: str | Path | Sequence[str | Path],
    specs: str | Sequence[str | KVSpec],
    tasks: str | Sequence[Any],
    lengths: str | int | Sequence[str | int],
    samples: int,
    seed: int = 0,
    out_dir: str | Path = "longctx-eval",
    haystack: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    chat: bool = True,
    progress: bool = True,
    *,
    max_kv_bytes: int = 8 << 30,
    retry_errors: bool = False,
    llm_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> GridSummary:
    """Run every (model, spec, task, length, sample, question) not already in ``out_dir/results.jsonl``.

    Args:
        models: model paths (checkpoint folders or ``.gguf`` files).
        specs: KV specs (a ';'-separated string or a list); stored in canonical form.
        tasks: task names (comma-separated or list; ``ppl`` for perplexity; group aliases expand) or objects.
        lengths: context lengths in tokens (``"2k,4k"`` or ints).
        samples: samples per (task, length).
        chat: wrap each prompt in the model's chat template (generation tasks; ppl never does).
        retry_errors: rerun lines recorded with an error instead of skipping them.
        llm_factory: ``(path, device=, dtype=, max_kv_bytes=) -> LLM``, for tests; default :class:`LLM`.
    """
    start = time.perf_counter()
    model_list = [models] if isinstance(models, (str, Path)) else list(models)
    if not model_list:
        raise LongctxError("no model given")
    for m in model_list:
        if not Path(m).exists():
            raise LongctxError(f"model {m}: no such file or folder")
    spec_list = parse_specs(specs)
    task_list = resolve_tasks(tasks)
    length_list = parse_lengths(lengths)
    if samples < 1:
        raise LongctxError(f"--samples must be >= 1, got {samples}")
    hay_text, hay_source = load_haystack(haystack)
    hay_sha = sha256_text(hay_text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    done = {r["key"] for r in read_results(results_path) if "key" in r and (not retry_errors or not r.get("error"))}
    prompts_path = out / PROMPTS_NAME
    stored_prompts = {r["sha256"] for r in read_results(prompts_path) if "sha256" in r}
    writer, prompt_writer = _Writer(results_path), _Writer(prompts_path)
    summary = GridSummary(out)
    say = log or (lambda msg: tqdm.write(msg) if progress else None)

    if llm_factory is None:
        from longctx.engine.llm import LLM  # noqa: PLC0415

        llm_factory = LLM

    for model_path in model_list:
        llm = llm_factory(str(model_path), device=device, dtype=dtype, max_kv_bytes=max_kv_bytes)
        run_prov = run_provenance(llm, model_path, seed=seed, device=device, dtype=dtype, chat=chat,
                                  haystack_sha256=hay_sha, haystack_source=hay_source, out_dir=out)
        model_sha = run_prov["model"]["sha256"]
        run_id = sha256_text(json.dumps({k: v for k, v in run_prov.items() if k != "timestamp"},
                                        sort_keys=True, default=str))[:16]
        run_prov["run_id"] = run_id

        # Build every (length, task) cell's samples once, and find what is left to do.
        cells: list[tuple[int, Any, list[Any], dict[str, list[_Item]]]] = []
        total = 0
        for length in length_list:
            for task in task_list:
                is_ppl = _is_ppl(task)
                try:
                    if is_ppl:
                        built = task.windows(llm.tokenizer, length, samples, seed, hay_text)
                    else:
                        built = task.samples(llm.tokenizer, length, samples, seed, hay_text)
                except LongctxError as e:  # e.g. a length too short for the task: record it, go on
                    records = _build_error_records(model_path, run_prov, spec_list, task, length, seed, chat,
                                                   hay_sha, done, retry_errors, f"{type(e).__name__}: {e}")
                    writer.write(records)
                    summary.written += len(records)
                    summary.errors += len(records)
                    summary.skipped += len(spec_list) - len(records)
                    if records:
                        say(f"{task.name} at {length} tokens: {e}")
                    continue
                pending: dict[str, list[_Item]] = {}
                for spec in spec_list:
                    items = []
                    for si, s in enumerate(built):
                        qs = [(None, None)] if is_ppl else list(enumerate(s.questions))
                        for qi, q in qs:
                            key = result_key(model_sha, spec, task.name, length, seed, chat and not is_ppl,
                                             hay_sha, s.sample_id, qi)
                            if key in done:
                                summary.skipped += 1
                                continue
                            items.append(_Item(key, s, si, qi, q))
                    if items:
                        pending[spec] = items
                        total += len(items)
                if pending:
                    cells.append((length, task, built, pending))
        if not total:
            say(f"{model_path}: nothing to do ({summary.skipped} results already in {results_path})")
            continue

        bar = tqdm(total=total, desc=f"eval {Path(model_path).name}", unit="q", disable=not progress,
                   dynamic_ncols=True)
        try:
            for length, task, _built, pending in cells:
                for spec, items in pending.items():
                    bar.set_postfix_str(f"{task.name} L={length} {_short(spec)}", refresh=True)
                    ctx = _Ctx(llm, run_prov, spec, task, length, seed, chat, model_path, hay_sha)
                    if _is_ppl(task):
                        records = _run_ppl(ctx, items, summary)
                    else:
                        records = _run_generate(ctx, items, summary, stored_prompts, prompt_writer)
                    writer.write(records)
                    summary.written += len(records)
                    summary.errors += sum(1 for r in records if r.get("error"))
                    bar.update(len(items))
        finally:
            bar.close()
        del llm
    summary.seconds = time.perf_counter() - start
    return summary


def _is_ppl(task: Any) -> bool:
    return getattr(task, "kind", None) == "ppl" or task.name == PPL_TASK


def _build_error_records(model_path: str | Path, run_prov: dict[str, Any], specs: list[str], task: Any, length: int,
                         seed: int, chat: bool, hay_sha: str, done: set[str], retry_errors: bool,
                         error: str) -> list[dict[str, Any]]:
    """One error line per spec when a task cannot build its samples at ``length`` (keyed like a sample)."""
    records = []
    for spec in specs:
        key = result_key(run_prov["model"]["sha256"], spec, task.name, length, seed, chat and not _is_ppl(task),
                         hay_sha, "(build)", None)
        if key in done:
            continue
        prov = line_provenance(run_prov, spec=spec, task=task.name,
                               max_new_tokens=getattr(task, "max_new_tokens", None))
        records.append({"key": key, "run_id": run_prov["run_id"], "model": str(model_path),
                        "model_sha256": run_prov["model"]["sha256"], "spec": spec, "task": task.name,
                        "length": length, "seed": seed, "sample_id": "(build)", "sample_index": None,
                        "question_index": None, "provenance": prov, "kind": "ppl" if _is_ppl(task) else "generate",
                        "score": None, "error": error})
    return records


def _short(spec: str) -> str:
    return spec if len(spec) <= 40 else spec[:37] + "..."


@dataclass
class _Ctx:
    llm: Any
    run_prov: dict[str, Any]
    spec: str
    task: Any
    length: int
    seed: int
    chat: bool
    model_path: str | Path
    haystack_sha: str

    def base_record(self, item: _Item, max_new_tokens: int | None, extra_prov: dict[str, Any]) -> dict[str, Any]:
        prov = line_provenance(self.run_prov, spec=self.spec, task=self.task.name, max_new_tokens=max_new_tokens,
                               extra=extra_prov)
        return {
            "key": item.key,
            "run_id": self.run_prov["run_id"],
            "model": str(self.model_path),
            "model_sha256": self.run_prov["model"]["sha256"],
            "spec": self.spec,
            "task": self.task.name,
            "length": self.length,
            "seed": self.seed,
            "sample_id": item.sample.sample_id,
            "sample_index": item.sample_index,
            "question_index": item.question_index,
            "provenance": prov,
        }


def _task_stop(task: Any) -> tuple[str, ...]:
    stop = getattr(task, "stop", ()) or ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _run_generate(ctx: _Ctx, items: list[_Item], summary: GridSummary, stored_prompts: set[str],
                  prompt_writer: _Writer) -> list[dict[str, Any]]:
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415

    llm, task = ctx.llm, ctx.task
    max_new = int(task.max_new_tokens)
    stop = _task_stop(task)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, stop=stop)
    extra_prov = {"stop_strings": list(stop), "task_class": f"{type(task).__module__}.{type(task).__qualname__}"}
    errors: dict[int, str] = {}
    new_prompts = []
    for i, it in enumerate(items):
        try:
            it.prompt_ids = llm.encode(prompt_text(it.sample, it.question), chat=ctx.chat)
        except LongctxError as e:
            errors[i] = f"{type(e).__name__}: {e}"
    outputs: dict[int, Any] = {}
    runnable = [i for i in range(len(items)) if i not in errors]
    if runnable:
        summary.generate_calls += 1
        try:
            outs = llm.generate([items[i].prompt_ids for i in runnable], params, kv=ctx.spec, chat=False)
            outputs = dict(zip(runnable, outs, strict=True))
        except LongctxError:
            # One prompt may be at fault (too long for the context, ...): retry one by one to pin it down.
            for i in runnable:
                summary.generate_calls += 1
                try:
                    outputs[i] = llm.generate([items[i].prompt_ids], params, kv=ctx.spec, chat=False)[0]
                except LongctxError as e:
                    errors[i] = f"{type(e).__name__}: {e}"
    records = []
    for i, it in enumerate(items):
        q = it.question
        rec = ctx.base_record(it, max_new, extra_prov)
        meta = {**dict(getattr(it.sample, "meta", {}) or {}), **dict(q.meta or {})}
        rec.update({"kind": "generate", "question": q.text, "expected": list(q.answers), "meta": meta})
        if it.prompt_ids is not None:
            sha = hashlib.sha256(json.dumps(it.prompt_ids).encode()).hexdigest()
            rec["prompt_sha256"] = sha
            rec["prompt_tokens"] = len(it.prompt_ids)
            if sha not in stored_prompts:
                stored_prompts.add(sha)
                new_prompts.append({"sha256": sha, "chat": ctx.chat, "ids": it.prompt_ids})
        if i in errors:
            rec.update({"score": None, "output": None, "error": errors[i]})
        else:
            out = outputs[i]
            s = out.stats
            rec.update({
                "score": float(task.score(out.text, q)),
                "output": out.text,
                "output_ids": list(out.token_ids),
                "finish_reason": s.finish_reason,
                "prompt_tokens": s.prompt_tokens,
                "generated_tokens": s.generated_tokens,
                "kv_bytes_held": s.kv_bytes_held,
                "kv_bytes_after_prefill": s.kv_bytes_after_prefill,
                "kv_bytes_peak": s.kv_bytes_peak,
                "kv_bytes_full": s.kv_bytes_full,
                "time_to_first_token": _finite(s.time_to_first_token),
                "time_per_output_token": _finite(s.time_per_output_token),
                "error": None,
            })
        records.append(rec)
    prompt_writer.write(new_prompts)
    return records


def _run_ppl(ctx: _Ctx, items: list[_Item], summary: GridSummary) -> list[dict[str, Any]]:
    task = ctx.task
    extra_prov = {"prefill_tokens": task.prefill_tokens, "num_buckets": task.num_buckets,
                  "task_class": f"{type(task).__module__}.{type(task).__qualname__}"}
    t0 = time.perf_counter()
    summary.generate_calls += 1
    error = None
    try:
        results = task.evaluate(ctx.llm, [it.sample for it in items], ctx.spec)
    except LongctxError as e:
        results, error = [None] * len(items), f"{type(e).__name__}: {e}"
    elapsed = time.perf_counter() - t0
    records = []
    for it, res in zip(items, results, strict=True):
        rec = ctx.base_record(it, None, extra_prov)
        rec.update({"kind": "ppl", "score": None, "meta": {"offset": it.sample.offset},
                    "prompt_tokens": len(it.sample.ids), "time_total": elapsed / len(items)})
        if res is None:
            rec.update({"ppl": None, "nll": None, "error": error})
        else:
            rec.update({"nll": _finite(res["nll"]), "ppl": _finite(res["ppl"]), "ppl_result": res, "error": None})
        records.append(rec)
    return records
