"""``longctx eval report DIR``: tables, plots, a baseline check and an optional transformers oracle.

Reads ``DIR/results.jsonl`` (the last line per key wins, so retried lines
replace failed ones) and prints, per model and task, the mean score with a 95 %
interval over samples (Wilson when every per-sample score is 0/1, else a t
interval), per method × budget × length, the KV bytes held, and the perplexity
table. It writes PNG plots and one self-contained HTML page (images embedded)
into ``DIR/report/``.

Baseline check: a method that beats ``full`` (same model, task, length) by
more than noise — ``full``'s mean lies outside the method's 95 % interval, or
the method's mean outside ``full``'s — is flagged: usually a bug, or too few
samples. With ``oracle="transformers"`` the ``full`` rows are rerun (greedy)
through Hugging Face transformers on the stored prompt ids and disagreements
are listed.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.eval.labels import SpecLabel, label_specs, spec_order
from longctx.eval.oracle import run_oracle
from longctx.eval.ppl import FULL_SPEC
from longctx.eval.runner import RESULTS_NAME
from longctx.eval.stats import Summary, summarize, t_interval
from longctx.safe_io import prepare_output_dir, write_text

REPORT_DIR = "report"


# ---- loading and labels ---------------------------------------------------------------------
_NUM = (int, float)
# Fields every result line must have, with their types; then optional ones (None allowed).
_REQUIRED: dict[str, tuple[type, ...]] = {"key": (str,), "model": (str,), "spec": (str,), "task": (str,),
                                           "length": (int,)}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "kind": (str,), "sample_id": (str,), "run_id": (str,), "score": _NUM, "correct": (bool,), "error": (str,),
    "meta": (dict,), "provenance": (dict,), "ppl_result": (dict,), "kv_bytes_held": _NUM,
    "kv_bytes_after_prefill": _NUM, "kv_bytes_peak": _NUM, "kv_bytes_full": _NUM, "kv_bytes_read_per_step": _NUM,
    "time_to_first_token": _NUM,
    "time_per_output_token": _NUM, "prompt_tokens": (int,), "generated_tokens": (int,),
}
_PPL_RESULT: dict[str, tuple[type, ...]] = {"nll_sum": _NUM, "count": _NUM, "nll": _NUM, "buckets": (list,)}


def _type_name(types: tuple[type, ...]) -> str:
    return "a number" if types == _NUM else {str: "a string", int: "an integer", bool: "true/false",
                                              dict: "an object", list: "a list"}[types[0]]


def _check_type(where: str, name: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int to Python; a true/false never stands in for a number here.
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if not ok:
        raise LongctxError(f"{where}: field {name!r} must be {_type_name(types)}, got {json.dumps(value)[:60]}")


def validate_result(r: Any, where: str) -> dict[str, Any]:
    """``r`` if it is a well-formed result line; else LongctxError naming ``where`` (file:line) and the field."""
    if not isinstance(r, dict):
        raise LongctxError(f"{where}: a result line must be a JSON object, got {type(r).__name__} "
                           f"{json.dumps(r)[:60]}")
    for name, types in _REQUIRED.items():
        if name not in r:
            raise LongctxError(f"{where}: missing required field {name!r}")
        _check_type(where, name, r[name], types)
    if r["length"] < 1:
        raise LongctxError(f"{where}: field 'length' must be a positive number of tokens, got {r['length']}")
    for name, types in _OPTIONAL.items():
        if r.get(name) is not None:
            _check_type(where, name, r[name], types)
    if r.get("kind") is not None and r["kind"] not in ("generate", "ppl"):
        raise LongctxError(f"{where}: field 'kind' must be 'generate' or 'ppl', got {r['kind']!r}")
    if not r.get("error") and r.get("kind") != "ppl" and r.get("score") is not None and r.get("sample_id") is None:
        raise LongctxError(f"{where}: missing field 'sample_id' (needed to average a scored line per sample)")
    res = r.get("ppl_result")
    if res is not None and not r.get("error"):
        for name, types in _PPL_RESULT.items():
            if name not in res:
                raise LongctxError(f"{where}: missing field 'ppl_result.{name}'")
            _check_type(where, f"ppl_result.{name}", res[name], types)
        for i, b in enumerate(res["buckets"]):
            if not isinstance(b, dict) or not all(isinstance(b.get(k), _NUM) for k in ("start", "end", "count")) \
                    or not isinstance(b.get("nll_sum"), _NUM):
                raise LongctxError(f"{where}: field 'ppl_result.buckets[{i}]' must be an object with numbers "
                                   f"start, end, count, nll_sum")
    return r


def read_result_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """``(lines, unparseable)``: every result line of ``path``, checked by :func:`validate_result`.

    A line that is not JSON at all (a write torn by a crash; the runner appends after it) is skipped and
    counted, as :func:`longctx.eval.runner.read_results` does; a JSON line of the wrong shape raises
    LongctxError naming the file, line and field.
    """
    out, bad = [], 0
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        raise LongctxError(f"cannot read {path} ({e.strerror or e})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            out.append(validate_result(r, f"{path}:{lineno}"))
    return out, bad


def _load(out_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    d = Path(out_dir)
    if not d.is_dir():
        raise LongctxError(f"{out_dir}: no such directory (run `longctx eval run --out {out_dir}` first)")
    path = d / RESULTS_NAME
    if not path.exists():
        raise LongctxError(f"{out_dir}: no {RESULTS_NAME} in it (run `longctx eval run --out {out_dir}` first)")
    rows, bad = read_result_lines(path)
    by_key: dict[str, dict[str, Any]] = {r["key"]: r for r in rows}
    if not by_key:
        raise LongctxError(f"{path}: no result lines" + (f" ({bad} unparseable line(s) skipped)" if bad else ""))
    return list(by_key.values()), bad


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Result lines of ``out_dir`` (last line per key wins); LongctxError when there are none, or when a line is
    malformed (wrong type, missing field, not an object: the message names file, line and field). Lines that
    are not JSON at all (torn writes) are skipped; :func:`make_report` says how many."""
    return _load(out_dir)[0]


# ---- aggregation ----------------------------------------------------------------------------
@dataclass
class Cell:
    """Aggregate of one (model, task, spec, length)."""

    summary: Summary
    n_questions: int
    n_errors: int
    kv_bytes_held: float | None
    kv_bytes_after_prefill: float | None
    kv_bytes_peak: float | None
    kv_bytes_full: float | None
    ttft: float | None
    tpot: float | None
    ppl: dict[str, Any] | None = None  # for ppl cells
    errors: list[str] = field(default_factory=list)
    kind: str = "generate"  # or "ppl"
    batch: int | None = None  # prompts in the largest batched generate call behind ttft/tpot (lines of one run)
    # KV bytes one decode step read: measured for select methods; what the rows hold at the end otherwise
    # (a step without a select method reads every held token)
    kv_bytes_read: float | None = None


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], Cell]:
    """(model, task, spec, length) -> :class:`Cell`; scores are averaged per sample, then over samples."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["task"], r["spec"], int(r["length"]))].append(r)
    cells = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        errors = sorted({r["error"] for r in rs if r.get("error")})
        is_ppl = any(r.get("kind") == "ppl" for r in rs)
        if is_ppl:
            summary, ppl = _ppl_summary(ok)
        else:
            per_sample: dict[str, list[float]] = defaultdict(list)
            for r in ok:
                if r.get("score") is not None:
                    per_sample[r["sample_id"]].append(float(r["score"]))
            summary = summarize([sum(v) / len(v) for v in per_sample.values()])
            ppl = None
        cells[key] = Cell(
            summary=summary, n_questions=len(ok), n_errors=len(rs) - len(ok),
            kv_bytes_held=_mean([r.get("kv_bytes_held") for r in ok]),
            kv_bytes_after_prefill=_mean([r.get("kv_bytes_after_prefill") for r in ok]),
            kv_bytes_peak=_mean([r.get("kv_bytes_peak") for r in ok]),
            kv_bytes_full=_mean([r.get("kv_bytes_full") for r in ok]),
            ttft=_mean([r.get("time_to_first_token") for r in ok]),
            tpot=_mean([r.get("time_per_output_token") for r in ok]),
            ppl=ppl, errors=errors, kind="ppl" if is_ppl else "generate", batch=_batch_size(ok),
            kv_bytes_read=_mean([r["kv_bytes_read_per_step"] if r.get("kv_bytes_read_per_step") is not None
                                 else r.get("kv_bytes_held") for r in ok]),
        )
    return cells


def _batch_size(rows: list[dict[str, Any]]) -> int | None:
    """The runner makes one batched ``generate`` per (model, task, length, spec) and run: the most timed lines
    one run contributed to this cell is the batch its TTFT/TPOT were measured in."""
    per_run: dict[Any, int] = defaultdict(int)
    for r in rows:
        if r.get("time_to_first_token") is not None or r.get("time_per_output_token") is not None:
            per_run[r.get("run_id")] += 1
    return max(per_run.values()) if per_run else None


def _ppl_summary(rows: list[dict[str, Any]]) -> tuple[Summary, dict[str, Any] | None]:
    """Token-pooled PPL, with a 95 % interval from a t interval on per-sample mean NLL (exponentiated)."""
    res = [r["ppl_result"] for r in rows if r.get("ppl_result")]
    if not res:
        return Summary(math.nan, math.nan, math.nan, 0, "none"), None
    nll_sum = sum(x["nll_sum"] for x in res)
    count = sum(x["count"] for x in res)
    pooled = nll_sum / count if count else math.nan
    lo, hi = t_interval([x["nll"] for x in res]) if len(res) > 1 else (math.nan, math.nan)
    summary = Summary(_exp(pooled), _exp(lo), _exp(hi), len(res), "t(log)" if len(res) > 1 else "none")
    nb = len(res[0]["buckets"])
    buckets = []
    for b in range(nb):
        s = sum(x["buckets"][b]["nll_sum"] for x in res if len(x["buckets"]) == nb)
        c = sum(x["buckets"][b]["count"] for x in res if len(x["buckets"]) == nb)
        start, end = res[0]["buckets"][b]["start"], res[0]["buckets"][b]["end"]
        buckets.append({"start": start, "end": end, "count": c, "nll": s / c if c else None,
                        "ppl": _exp(s / c) if c else None})
    one = [x["one_pass"] for x in res if x.get("one_pass")]
    one_pass = _exp(sum(x["nll_sum"] for x in one) / sum(x["count"] for x in one)) if one else None
    return summary, {"ppl": _exp(pooled), "nll": pooled, "tokens": count, "buckets": buckets,
                     "one_pass_ppl": one_pass, "finite": all(x.get("finite", True) for x in res)}


def _exp(x: float) -> float:
    if x is None or math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# ---- baseline check -------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    model: str
    task: str
    length: int
    spec: str
    method: str
    budget: str
    value: float
    full_value: float
    metric: str
    message: str


def baseline_flags(cells: dict[tuple[str, str, str, int], Cell], labels: dict[str, SpecLabel]) -> list[Flag]:
    """Methods that beat ``full`` (same model, task, length) by more than the 95 % interval."""
    flags = []
    for (model, task, spec, length), cell in sorted(cells.items()):
        if spec == FULL_SPEC:
            continue
        full = cells.get((model, task, FULL_SPEC, length))
        if full is None or full.summary.n == 0 or cell.summary.n == 0:
            continue
        a, b = cell.summary, full.summary
        lower_is_better = cell.kind == "ppl"
        better = a.mean < b.mean if lower_is_better else a.mean > b.mean
        if not better:
            continue
        beyond = (not math.isnan(a.lo) and not a.contains(b.mean)) or (not math.isnan(b.lo) and not b.contains(a.mean))
        if not beyond:
            continue
        lab = labels[spec]
        metric = "perplexity" if lower_is_better else "score"
        flags.append(Flag(model, task, length, spec, lab.method, lab.budget, a.mean, b.mean, metric,
                          f"{lab.method}:{lab.budget} beats full on {task} at {length} tokens "
                          f"({metric} {a.fmt(3)} vs full {b.fmt(3)}), beyond the 95% interval: check for a bug "
                          f"or add samples"))
    return flags


# ---- oracle ---------------------------------------------------------------------------------
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.2f} MiB"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def text(self) -> str:
        widths = [max(len(self.header[i]), *(len(r[i]) for r in self.rows)) if self.rows else len(self.header[i])
                  for i in range(len(self.header))]
        lines = [self.title, "  ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def build_tables(cells: dict[tuple[str, str, str, int], Cell], labels: dict[str, SpecLabel]) -> list[Table]:
    tables = []
    models = sorted({k[0] for k in cells})
    for model in models:
        mname = Path(model).name
        tasks = sorted({k[1] for k in cells if k[0] == model})
        for task in tasks:
            keys = [k for k in cells if k[0] == model and k[1] == task]
            lengths = sorted({k[3] for k in keys})
            specs = [s for s in spec_order(labels) if any(k[2] == s for k in keys)]
            is_ppl = any(cells[k].kind == "ppl" for k in keys)
            def score_cell(c: Cell | None, is_ppl: bool = is_ppl) -> str:
                if c is None:
                    return ""
                cell = c.summary.fmt(2 if is_ppl else 3) + f" n={c.summary.n}" if c.summary.n else "-"
                if is_ppl and c.ppl and c.ppl.get("one_pass_ppl") is not None:
                    cell += f" (1-pass {c.ppl['one_pass_ppl']:.2f})"
                if c.n_errors:
                    cell += f" ({c.n_errors} err)"
                return cell

            rows = _spec_rows(cells, labels, model, task, specs, lengths, score_cell)
            metric = "perplexity (token-pooled) [95% interval over samples]" if is_ppl else \
                "mean score [95% interval over samples]"
            tables.append(Table(f"{mname} / {task}: {metric}", ["method", "budget", *[f"L={L}" for L in lengths]],
                                rows, note="Wilson interval for 0/1 per-sample scores, t interval otherwise"
                                if not is_ppl else "interval: t on per-sample mean NLL, exponentiated"))
            if is_ppl:
                continue
            rows = _spec_rows(cells, labels, model, task, specs, lengths, _kv_cell)
            tables.append(Table(f"{mname} / {task}: KV held at end (% of full cache), peak, batch TTFT / TPOT",
                                ["method", "budget", *[f"L={L}" for L in lengths]], rows, note=TIMING_NOTE))
        overview = _overview(cells, labels, model)
        if overview is not None:
            tables.insert(next(i for i, t in enumerate(tables) if t.title.startswith(f"{mname} /")), overview)
    return tables


def _spec_rows(cells: dict[tuple[str, str, str, int], Cell], labels: dict[str, SpecLabel], model: str, task: str,
               specs: list[str], lengths: list[int], fmt: Callable[[Cell | None], str]) -> list[list[Any]]:
    """One table row per spec: method, budget, then ``fmt`` of its cell at each length (None where missing)."""
    return [[labels[s].method, labels[s].budget, *(fmt(cells.get((model, task, s, L))) for L in lengths)]
            for s in specs]


def _kv_cell(c: Cell | None) -> str:
    if c is None or c.kv_bytes_held is None:
        return "-"
    ratio = f" ({c.kv_bytes_held / c.kv_bytes_full:.0%})" if c.kv_bytes_full else ""
    timing = ""
    if c.ttft is not None or c.tpot is not None:
        batch = f" (batch of {c.batch})" if c.batch else ""
        timing = f" batch TTFT {_ms(c.ttft)} ms, batch TPOT {_ms(c.tpot)} ms{batch}"
    return f"{_mib(c.kv_bytes_held)}{ratio} peak {_mib(c.kv_bytes_peak)}{timing}"


TIMING_NOTE = ("TTFT / TPOT are batch-inclusive, not single-request latency: the eval runs one batched generate "
               "per (length, spec) over all its prompts (batch of N = prompts in that call), so a prompt's time to "
               "first token includes prefilling the other prompts of the batch, and time per output token is a "
               "decode step of the whole batch.")


def _overview(cells: dict[tuple[str, str, str, int], Cell], labels: dict[str, SpecLabel], model: str) -> Table | None:
    """Mean over generation tasks of each task's mean score, and KV held as % of full, per method × length."""
    keys = [k for k in cells if k[0] == model and cells[k].kind != "ppl" and cells[k].summary.n]
    tasks = sorted({k[1] for k in keys})
    if len(tasks) < 2:
        return None
    lengths = sorted({k[3] for k in keys})
    rows = []
    for s in [s for s in spec_order(labels) if any(k[2] == s for k in keys)]:
        row = [labels[s].method, labels[s].budget]
        for L in lengths:
            cs = [cells[k] for k in keys if k[2] == s and k[3] == L]
            if not cs:
                row.append("-")
                continue
            held = [c.kv_bytes_held / c.kv_bytes_full for c in cs if c.kv_bytes_held and c.kv_bytes_full]
            row.append(f"{sum(c.summary.mean for c in cs) / len(cs):.3f} ({len(cs)} tasks)"
                       + (f", KV {sum(held) / len(held):.0%}" if held else ""))
        rows.append(row)
    return Table(f"{Path(model).name}: overview, mean score over tasks ({', '.join(tasks)}) and KV held vs full",
                 ["method", "budget", *[f"L={L}" for L in lengths]], rows)


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'/>"
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def _html_page(title: str, tables: list[Table], flags: list[Flag], oracle: dict[str, Any] | None,
               images: list[Path], provenance: list[dict[str, Any]], errors: list[str]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append("<h2>Baseline check</h2>")
    if flags:
        parts.append("<ul class='flags'>" + "".join(f"<li>{html.escape(f.message)}</li>" for f in flags) + "</ul>")
    else:
        parts.append("<p>No method beats <code>full</code> beyond its 95% interval.</p>")
    if oracle is not None:
        parts.append("<h2>Transformers oracle (full cache, greedy)</h2>")
        parts.append(f"<p>{html.escape(_oracle_line(oracle))}</p>")
        if oracle.get("disagreements"):
            t = Table("disagreements", ["key", "first diff token", "longctx", "transformers", "score differs"],
                      [[d["key"], str(d["first_diff_token"]), repr(d["ours"])[:120], repr(d["transformers"])[:120],
                        str(d["score_differs"])] for d in oracle["disagreements"]])
            parts.append(t.html())
    parts.append("<h2>Tables</h2>")
    parts.append(f"<p class='note'>{html.escape(TIMING_NOTE)}</p>")
    parts += [t.html() for t in tables]
    if errors:
        parts.append("<h2>Errors</h2><ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in errors) + "</ul>")
    parts.append("<h2>Plots</h2>")
    parts += [_img_tag(p) for p in images]
    parts.append("<h2>Provenance</h2>")
    for p in provenance:
        parts.append(f"<pre>{html.escape(json.dumps(p, indent=1, sort_keys=True))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 6px;"
             "font-size:13px;text-align:left}th{background:#eee}img{max-width:100%}.flags li{color:#b00}"
             ".note{font-size:12px;color:#555}pre{background:#f6f6f6;padding:.5em;font-size:11px;overflow:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _oracle_line(oracle: dict[str, Any]) -> str:
    if not oracle.get("checked"):
        return f"oracle: nothing checked ({oracle.get('note') or oracle.get('error') or 'no rows'})"
    d = oracle["disagreements"]
    return (f"oracle: {oracle['agree']}/{oracle['checked']} full-cache outputs identical to transformers greedy; "
            f"{len(d)} disagree ({sum(1 for x in d if x['score_differs'])} with a different score)")


@dataclass
class Report:
    tables: list[Table]
    flags: list[Flag]
    oracle: dict[str, Any] | None
    files: list[Path]
    html_path: Path
    text: str


def make_report(out_dir: str | Path, oracle: str | None = None, oracle_samples: int = 20, device: str = "cpu",
                plots: bool = True, progress: bool = False) -> Report:
    """Build the tables, flags, plots and HTML of ``out_dir``; return them (the CLI prints ``text``)."""
    out = Path(out_dir)
    rows, unparseable = _load(out)
    if oracle not in (None, "transformers"):
        raise LongctxError(f"--oracle {oracle!r}: the only oracle is 'transformers'")
    labels = label_specs(sorted({r["spec"] for r in rows}))
    cells = aggregate(rows)
    tables = build_tables(cells, labels)
    tables.insert(0, Table("KV specs (canonical form, as stored)", ["method", "budget", "spec"],
                           [[labels[s].method, labels[s].budget, s] for s in spec_order(labels)]))
    flags = baseline_flags(cells, labels)
    oracle_res = None
    if oracle == "transformers":
        try:
            oracle_res = run_oracle(out, rows, oracle_samples, device=device, progress=progress)
        except LongctxError as e:
            oracle_res = {"checked": 0, "agree": 0, "disagreements": [], "error": str(e)}
    rdir = out / REPORT_DIR
    prepare_output_dir(rdir, "report folder")
    files: list[Path] = []
    if plots:
        try:
            from longctx.eval import plots as P  # noqa: PLC0415
        except ImportError as e:
            raise LongctxError(f"plots need matplotlib ({e}); `pip install matplotlib` or pass --no-plots") from None
        files = P.make_plots(rows, cells, labels, rdir)
    errors = sorted({f"{r['task']} L={r['length']} {labels[r['spec']].method}:{labels[r['spec']].budget}: "
                     f"{r['error']}" for r in rows if r.get("error")})
    runs = {}
    for r in rows:
        p = r.get("provenance") or {}
        rid = r.get("run_id")
        if rid and rid not in runs:
            runs[rid] = {k: v for k, v in p.items() if k not in ("spec", "task", "max_new_tokens", "stop_strings",
                                                                 "task_class", "prefill_tokens", "num_buckets",
                                                                 "sampling")}
    title = f"longctx eval report: {out.resolve().name}"
    html_path = rdir / "index.html"
    skipped = [f"{unparseable} unparseable line(s) of {RESULTS_NAME} skipped (torn writes)"] if unparseable else []
    write_text(html_path, _html_page(title, tables, flags, oracle_res, files, list(runs.values()),
                                     skipped + errors))
    if oracle_res is not None:
        write_text(rdir / "oracle.json", json.dumps(oracle_res, indent=1, default=str))
    lines = [title, f"{len(rows)} results, {len(labels)} specs, {len(runs)} run(s)"
             + "".join(f"; {x}" for x in skipped), ""]
    for t in tables:
        lines += [t.text(), ""]
    lines.append("Baseline check:")
    lines += [f"  FLAG {f.message}" for f in flags] or ["  ok: no method beats full beyond its 95% interval"]
    if oracle_res is not None:
        lines.append("  " + _oracle_line(oracle_res))
        for d in oracle_res.get("disagreements", []):
            lines.append(f"    {d['key']}: first diff at token {d['first_diff_token']}: longctx {d['ours']!r} "
                         f"vs transformers {d['transformers']!r}")
    if errors:
        lines += ["", f"Errors ({len(errors)} kinds):"] + [f"  {e}" for e in errors]
    lines += ["", f"Report: {html_path}" + (f" and {len(files)} PNG files in {rdir}" if files else "")]
    return Report(tables, flags, oracle_res, files, html_path, "\n".join(lines))
