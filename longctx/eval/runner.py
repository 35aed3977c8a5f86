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

import torch
from tqdm import tqdm

from longctx.errors import LongctxError, PromptTooLongError
from longctx.eval.ppl import PPL_TASK, PerplexityTask
from longctx.eval.provenance import line_provenance, run_provenance, sha256_text
from longctx.kv.spec import KVSpec
from longctx.safe_io import open_for_write, prepare_output_dir

RESULTS_NAME = "results.jsonl"
PROMPTS_NAME = "prompts.jsonl"
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
MAX_LENGTH = 4 * 1024 * 1024  # longest context length accepted (4M tokens), checked before any context is built


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
        if value > MAX_LENGTH:
            raise LongctxError(f"bad length {item!r}: {value} tokens is more than the maximum of {MAX_LENGTH} "
                               f"(4m) tokens")
        if value not in out:
            out.append(value)
    return out


def parse_specs(text: str | KVSpec | Sequence[str | KVSpec]) -> list[str]:
    """Specs separated by ';' (or a list) -> canonical spec strings, duplicates removed, order kept."""
    if isinstance(text, (str, KVSpec)):
        items: list[str | KVSpec] = list(text.split(";")) if isinstance(text, str) else [text]
    else:
        items = list(text)
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
                with open_for_write(path, "ab") as f:
                    f.write(b"\n")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open_for_write(self.path, "a") as f:
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
    sample_index: int | None
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
        log: where one-line messages go (default: above the progress bar).
    """
    start = time.perf_counter()
    model_list = [models] if isinstance(models, (str, Path)) else list(models)
    if not model_list:
        raise LongctxError("no model given")
    for m in model_list:
        if not Path(m).exists():
            raise LongctxError(f"model {m}: no such file or folder")
    if samples < 1:
        raise LongctxError(f"--samples must be >= 1, got {samples}")
    lengths = parse_lengths(lengths)  # before any work: a length over MAX_LENGTH fails at once
    out = prepare_output_dir(out_dir)  # before any work: a bad --out must not lose a finished run
    hay_text, hay_source = load_haystack(haystack)
    if llm_factory is None:
        from longctx.engine.llm import LLM  # noqa: PLC0415

        llm_factory = LLM
    grid = _Grid(specs=parse_specs(specs), tasks=resolve_tasks(tasks), lengths=parse_lengths(lengths),
                 samples=samples, seed=seed, out=out, haystack=hay_text, haystack_source=hay_source,
                 haystack_sha=sha256_text(hay_text), device=device, dtype=dtype, chat=chat, progress=progress,
                 max_kv_bytes=max_kv_bytes, llm_factory=llm_factory, summary=GridSummary(out),
                 log=log or (lambda msg: tqdm.write(msg) if progress else None))
    results = read_results(out / RESULTS_NAME)
    grid.done = {r["key"] for r in results if "key" in r and (not retry_errors or not r.get("error"))}
    grid.stored_prompts = {r["sha256"] for r in read_results(out / PROMPTS_NAME) if "sha256" in r}
    for model_path in model_list:
        # Inference mode for the whole grid: the engine's pool must not mix inference tensors (grown under
        # stream_logprobs' inference mode) with normal tensors that later in-place copies touch.
        with torch.inference_mode():
            grid.run_model(model_path)
    grid.summary.seconds = time.perf_counter() - start
    return grid.summary


@dataclass
class _Grid:
    """The state of one :func:`run_grid` call."""

    specs: list[str]
    tasks: list[Any]
    lengths: list[int]
    samples: int
    seed: int
    out: Path
    haystack: str
    haystack_source: str
    haystack_sha: str
    device: str
    dtype: str
    chat: bool
    progress: bool
    max_kv_bytes: int
    llm_factory: Callable[..., Any]
    summary: GridSummary
    log: Callable[[str], None]
    done: set[str] = field(default_factory=set)
    stored_prompts: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.writer = _Writer(self.out / RESULTS_NAME)
        self.prompt_writer = _Writer(self.out / PROMPTS_NAME)

    def write(self, records: list[dict[str, Any]]) -> None:
        self.writer.write(records)
        self.summary.written += len(records)
        self.summary.errors += sum(1 for r in records if r.get("error"))

    def run_model(self, model_path: str | Path) -> None:
        llm = self.llm_factory(str(model_path), device=self.device, dtype=self.dtype, max_kv_bytes=self.max_kv_bytes)
        if self.chat and not getattr(llm.tokenizer, "chat_template", None) and \
                not all(_is_ppl(t) for t in self.tasks):
            raise LongctxError(f"{model_path}: the model has no chat template; run with --no-chat (chat=False)")
        self._check_lengths(llm, model_path)
        run_prov = run_provenance(llm, model_path, seed=self.seed, device=self.device, dtype=self.dtype,
                                  chat=self.chat, haystack_sha256=self.haystack_sha,
                                  haystack_source=self.haystack_source, out_dir=self.out)
        run_prov["run_id"] = sha256_text(json.dumps({k: v for k, v in run_prov.items() if k != "timestamp"},
                                                    sort_keys=True, default=str))[:16]
        # Build every (length, task) cell's samples once, and find what is left to do.
        cells: list[tuple[int, Any, dict[str, list[_Item]]]] = []
        for length in self.lengths:
            for task in self.tasks:
                pending = self._pending(llm, run_prov, model_path, task, length)
                if pending:
                    cells.append((length, task, pending))
        total = sum(len(items) for _, _, pending in cells for items in pending.values())
        if not total:
            self.log(f"{model_path}: nothing to do ({self.summary.skipped} results already in "
                     f"{self.out / RESULTS_NAME})")
            return
        bar = tqdm(total=total, desc=f"eval {Path(model_path).name}", unit="q", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            for length, task, pending in cells:
                for spec, items in pending.items():
                    bar.set_postfix_str(f"{task.name} L={length} {_short(spec)}", refresh=True)
                    ctx = _Ctx(llm, run_prov, spec, task, length, self.seed, self.chat, model_path)
                    if _is_ppl(task):
                        records = _run_ppl(ctx, items, self.summary)
                    else:
                        records = _run_generate(ctx, items, self.summary, self.stored_prompts, self.prompt_writer)
                    self.write(records)
                    bar.update(len(items))
        finally:
            bar.close()

    def _check_lengths(self, llm: Any, model_path: str | Path) -> None:
        """Raise :class:`PromptTooLongError` before any context is built when a length exceeds the model's
        context for a spec whose positions do not extend it (the decision of ``LLM.check_length``)."""
        limit = getattr(llm, "max_model_len", None)
        extends = getattr(llm, "extends_context", None)
        if limit is None or extends is None:  # a stand-in engine without the checks
            return
        longest = max(self.lengths)
        if longest <= limit:
            return
        short = [spec for spec in self.specs if not extends(KVSpec.parse(spec))]
        if short:
            raise PromptTooLongError(
                f"{model_path}: length {longest} exceeds the model's context of {limit} tokens (max_model_len) for "
                f"--kv {'; '.join(short)!r}; use lengths up to {limit}, or a positions method that extends the "
                f"context (e.g. --kv 'positions=self_extend(group=4,window=1024)'); set "
                f"LONGCTX_ALLOW_BEYOND_CONTEXT=1 to run plain RoPE past it anyway"
            )

    def _key(self, run_prov: dict[str, Any], spec: str, task: Any, length: int, sample_id: str,
             question_index: int | None) -> str:
        return result_key(run_prov["model"]["sha256"], spec, task.name, length, self.seed,
                          self.chat and not _is_ppl(task), self.haystack_sha, sample_id, question_index)

    def _pending(self, llm: Any, run_prov: dict[str, Any], model_path: str | Path, task: Any,
                 length: int) -> dict[str, list[_Item]]:
        """spec -> items not done yet, for one (task, length); a task that cannot build is recorded as errors."""
        is_ppl = _is_ppl(task)
        try:
            build = task.windows if is_ppl else task.samples
            built = build(llm.tokenizer, length, self.samples, self.seed, self.haystack)
        except LongctxError as e:  # e.g. a length too short for the task: record it once per spec, go on
            records = []
            for spec in self.specs:
                key = self._key(run_prov, spec, task, length, "(build)", None)
                if key in self.done:
                    self.summary.skipped += 1
                    continue
                ctx = _Ctx(llm, run_prov, spec, task, length, self.seed, self.chat, model_path)
                rec = ctx.base_record(_Item(key, None, None, None), getattr(task, "max_new_tokens", None), {})
                rec.update({"kind": "ppl" if is_ppl else "generate", "score": None,
                            "error": f"{type(e).__name__}: {e}"})
                records.append(rec)
            if records:
                self.log(f"{task.name} at {length} tokens: {e}")
            self.write(records)
            return {}
        pending: dict[str, list[_Item]] = {}
        for spec in self.specs:
            items = []
            for si, s in enumerate(built):
                for qi, q in [(None, None)] if is_ppl else list(enumerate(s.questions)):
                    key = self._key(run_prov, spec, task, length, s.sample_id, qi)
                    if key in self.done:
                        self.summary.skipped += 1
                    else:
                        items.append(_Item(key, s, si, qi, q))
            if items:
                pending[spec] = items
        return pending


def _is_ppl(task: Any) -> bool:
    return getattr(task, "kind", None) == "ppl" or task.name == PPL_TASK


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
            "sample_id": item.sample.sample_id if item.sample is not None else "(build)",
            "sample_index": item.sample_index,
            "question_index": item.question_index,
            "provenance": prov,
        }


def task_params(task: Any) -> dict[str, Any]:
    """The task's public settings (e.g. needle depths), as far as they are plain JSON values."""
    out = {}
    for k, v in vars(task).items():
        if k.startswith("_"):
            continue
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


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
    extra_prov = {"stop_strings": list(stop), "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
                  "task_params": task_params(task)}
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
                "kv_bytes_read_per_step": s.kv_bytes_read_per_step,
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
                  "task_class": f"{type(task).__module__}.{type(task).__qualname__}", "task_params": task_params(task)}
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
