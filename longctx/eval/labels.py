"""How a spec is named in reports and plots: its method and budget amount (:func:`spec_label`), and labels
for a set of specs that tell apart methods sharing a short name by the settings in which they differ
(:func:`label_specs`)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.eval.ppl import FULL_SPEC
from longctx.kv.spec import KVSpec

__all__ = ["SpecLabel", "label_specs", "spec_label", "spec_order"]


@dataclass(frozen=True)
class SpecLabel:
    spec: str  # canonical
    method: str  # display name of everything but the budget amount
    budget: str  # "512", "25%", "all"
    budget_tokens: int | None
    budget_fraction: float | None
    method_key: str  # canonical spec with the budget amount removed

    @property
    def is_full(self) -> bool:
        return self.spec == FULL_SPEC


_DEFAULT_NAMES = {"prefill": "dense", "retain": "full", "quant": "none", "budget": "none", "select": "all",
                  "positions": "native"}


def spec_label(spec: str) -> SpecLabel:
    """Method and budget of a spec string, via :meth:`KVSpec.parse`."""
    try:
        k = KVSpec.parse(spec)
    except LongctxError:
        return SpecLabel(spec, spec, "?", None, None, spec)
    params = dict(k.budget.params)
    tokens = int(params.get("tokens", 0) or 0) or None
    fraction = float(params.get("fraction", 0.0) or 0.0) or None
    read = int(dict(k.select.params).get("tokens", 0) or 0) if k.budget.name == "none" else 0
    if read:  # a select method alone: its amount is the tokens each step reads (nothing is deleted)
        tokens = read
        budget = f"read {read}"
    elif k.budget.name == "none":
        budget = "all"
    elif tokens:
        budget = str(tokens)
    elif fraction:
        budget = f"{fraction:.0%}" if (fraction * 100).is_integer() else f"{fraction:.3g}"
    elif "heads" in params:  # duo / razor: what a row keeps follows from its head's score, not an amount
        budget = "per head"
    else:
        budget = "?"
    names = [k.retain.name] if k.retain.name != "full" else []
    for axis in ("quant", "budget", "select", "positions", "prefill"):
        m = getattr(k, axis)
        if axis == "budget" and m.name in ("uniform", "none"):
            continue
        if m.name != _DEFAULT_NAMES[axis]:
            names.append(m.name)
    method = "+".join(names) or "full"
    stripped = {key: v for key, v in params.items() if key not in ("tokens", "fraction")}
    keyed = k
    if read:  # the same method at another read amount groups with this one
        rest = tuple((key, v) for key, v in k.select.params if key != "tokens")
        keyed = dataclasses.replace(k, select=dataclasses.replace(k.select, params=rest))
    method_key = " ".join(p for p in str(keyed).split(" ") if not p.startswith("budget=")) + \
        (f" budget={k.budget.name}{sorted(stripped.items())}" if k.budget.name != "none" else "")
    return SpecLabel(str(k), method, budget, tokens, fraction, method_key)


def label_specs(specs: list[str]) -> dict[str, SpecLabel]:
    """Labels for ``specs``; two different methods with the same short name are told apart by the settings in
    which they differ (``snapkv(window=8)``, ``duo(heads=duo_smollm2, retrieval=0.25)``)."""
    labels = {s: spec_label(s) for s in specs}
    by_method: dict[str, set[str]] = defaultdict(set)
    for lab in labels.values():
        by_method[lab.method].add(lab.method_key)
    out = {}
    for s, lab in labels.items():
        keys = by_method[lab.method]
        if len(keys) > 1:
            name = _distinguished(lab, [k for k in labels.values() if k.method_key in keys])
            lab = SpecLabel(lab.spec, name, lab.budget, lab.budget_tokens, lab.budget_fraction, lab.method_key)
        out[s] = lab
    # shortened values can still coincide (two head files of one name in different folders): those get the
    # canonical form, which is unique per method
    names: dict[str, set[str]] = defaultdict(set)
    for lab in out.values():
        names[lab.method].add(lab.method_key)
    return {s: lab if len(names[lab.method]) == 1 else dataclasses.replace(lab, method=lab.method_key)
            for s, lab in out.items()}


def _settings_of(lab: SpecLabel) -> dict[str, Any] | None:
    """Every setting of every axis of ``lab``'s spec but the budget amount, by name (``axis.name`` where two
    axes share a name); None when the spec does not parse."""
    try:
        k = KVSpec.parse(lab.spec)
    except LongctxError:
        return None
    flat: dict[str, Any] = {}
    for axis in ("retain", "quant", "budget", "select", "positions", "prefill"):
        for key, value in getattr(k, axis).params:
            if (axis == "budget" and key in ("tokens", "fraction")) or (
                    axis == "select" and key == "tokens" and lab.budget.startswith("read")):
                continue
            flat[f"{axis}.{key}" if any(n.endswith(f".{key}") or n == key for n in flat) else key] = value
    return flat


def _short(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or value.endswith(".json")):
        return Path(value).stem  # a head-score file: its name
    return f"{value:g}" if isinstance(value, float) else str(value)


def _distinguished(lab: SpecLabel, group: list[SpecLabel]) -> str:
    """``method(k=v, ...)`` over the settings in which the specs of ``group`` differ; the canonical key if none
    can be named."""
    mine, others = _settings_of(lab), [_settings_of(g) for g in group]
    if mine is None or any(o is None for o in others):
        return lab.method_key
    differ = [key for key in mine if any(o.get(key) != mine[key] for o in others)]  # type: ignore[union-attr]
    if not differ:
        return lab.method_key
    return f"{lab.method}({', '.join(f'{key}={_short(mine[key])}' for key in differ)})"


def spec_order(labels: dict[str, SpecLabel]) -> list[str]:
    def key(s: str) -> tuple:
        lab = labels[s]
        return (not lab.is_full, lab.method, lab.budget_tokens or 0, lab.budget_fraction or 0.0, s)

    return sorted(labels, key=key)
