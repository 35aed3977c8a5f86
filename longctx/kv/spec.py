"""KVSpec: a KV-cache method as a frozen value with one field per axis, and its text form.

Canonical text lists every non-default axis in a fixed order, each with all of
its parameters, e.g.::

    retain=snapkv(window=32,kernel=5,pooling=max) budget=pyramid(tokens=1024,fraction=0.0,beta=20.0)

``KVSpec.parse(str(spec)) == spec`` for every valid spec. Short aliases are
accepted on input: ``full``, ``snapkv:1024`` (method + token budget),
``h2o:0.25`` (budget as a fraction of the prompt), ``int8`` / ``int4``
(quantization), ``rerotate`` (positions), and several of them combine:
``snapkv:512 int8 rerotate``. Unknown methods and parameters fail with a
:class:`~longctx.errors.SpecError` that names the bad part and lists the valid
choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from longctx.errors import SpecError
from longctx.kv.registry import AXES, lookup, methods, params_of

DEFAULTS = {
    "prefill": "dense",
    "retain": "full",
    "quant": "none",
    "budget": "none",
    "select": "all",
    "positions": "native",
}
_TOKEN = re.compile(r"\S+\([^)]*\)|\S+")
_METHOD = re.compile(r"^([A-Za-z_][\w-]*)(?:\((.*)\))?$")


@dataclass(frozen=True)
class Method:
    """One axis' choice: a registered method name and all of its parameters (defaults filled in)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}({','.join(f'{k}={_fmt(v)}' for k, v in self.params)})"

    def get(self, key: str) -> Any:
        return dict(self.params)[key]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def make_method(axis: str, name: str, given: dict[str, Any] | None = None, where: str = "") -> Method:
    """Validate ``given`` against the method's parameters and fill defaults."""
    cls = lookup(axis, name)
    where = where or f"{axis}={name}"
    if cls is None:
        raise SpecError(f"{where}: unknown {axis} method {name!r}; choose one of: {', '.join(methods(axis))}")
    given = dict(given or {})
    infos = params_of(cls)
    valid = {p.name: p for p in infos}
    for key in given:
        if key not in valid:
            choices = ", ".join(valid) or "(none)"
            raise SpecError(f"{where}: unknown parameter {key!r} for {axis} method {name!r}; parameters: {choices}")
    values: dict[str, Any] = {}
    for p in infos:
        raw = given.get(p.name, p.default)
        values[p.name] = _coerce(raw, p.type, f"{where}: parameter {p.name!r}")
    try:
        cls(**values)  # runs __post_init__ range checks
    except (ValueError, TypeError) as e:
        raise SpecError(f"{where}: {e}") from None
    return Method(name, tuple((p.name, values[p.name]) for p in infos))


def _coerce(raw: Any, typ: type, where: str) -> Any:
    value = _coerce_type(raw, typ, where)
    if typ is float and not math.isfinite(value):
        raise SpecError(f"{where} must be a finite number, got {raw!r}")
    return value


def _coerce_type(raw: Any, typ: type, where: str) -> Any:
    if isinstance(raw, str) and typ is not str:
        text = raw
        try:
            if typ is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
        except ValueError:
            raise SpecError(f"{where} must be {typ.__name__}, got {text!r}") from None
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if typ is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, typ) or (typ is int and isinstance(raw, bool)):
        raise SpecError(f"{where} must be {typ.__name__}, got {raw!r}")
    return raw


def _parse_method(axis: str, text: str, where: str) -> Method:
    m = _METHOD.match(text)
    if not m:
        raise SpecError(f"{where}: cannot parse {text!r}; expected name or name(key=value,...)")
    name, body = m.group(1), m.group(2)
    given: dict[str, str] = {}
    if body:
        for part in body.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise SpecError(f"{where}: parameter {part!r} must be key=value")
            key, value = (s.strip() for s in part.split("=", 1))
            if key in given:
                raise SpecError(f"{where}: parameter {key!r} given twice")
            given[key] = value
    return make_method(axis, name, given, where)


@dataclass(frozen=True)
class KVSpec:
    """A KV method: one :class:`Method` per axis. Build with :meth:`parse` or :meth:`of`."""

    # Defaults carry their parameters' defaults too, so ``KVSpec() == KVSpec.parse("full")``.
    prefill: Method = dataclasses.field(default_factory=lambda: _default_method("prefill"))
    retain: Method = dataclasses.field(default_factory=lambda: _default_method("retain"))
    quant: Method = dataclasses.field(default_factory=lambda: _default_method("quant"))
    budget: Method = dataclasses.field(default_factory=lambda: _default_method("budget"))
    select: Method = dataclasses.field(default_factory=lambda: _default_method("select"))
    positions: Method = dataclasses.field(default_factory=lambda: _default_method("positions"))

    def __post_init__(self) -> None:
        if self.retain.name != "full" and self.budget.name == "none":
            raise SpecError(f"retain={self.retain.name} needs a budget, e.g. budget=uniform(tokens=1024) "
                            f"or the alias {self.retain.name}:1024")
        check = getattr(lookup("budget", self.budget.name), "check_spec", None)
        if check is not None:  # budgets that constrain the other axes (duo, razor)
            check(self)
        if getattr(lookup("retain", self.retain.name), "merges_evicted", False) and self.quant.name != "none":
            raise SpecError(f"retain={self.retain.name} merges evicted tokens into kept ones, which quantized rows "
                            f"cannot store; use it with quant=none")
        if self.select.name != "all" and not getattr(lookup("positions", self.positions.name),
                                                      "stores_rotated_keys", True):
            raise SpecError(f"select={self.select.name} scores stored keys against the rotated query, but "
                            f"positions={self.positions.name} stores raw keys; use positions=native or rope_scaling")

    def __str__(self) -> str:
        # An axis is omitted only when it equals the default method with default parameters.
        parts = [f"{axis}={getattr(self, axis)}" for axis in AXES if getattr(self, axis) != _default_method(axis)]
        return " ".join(parts) or "retain=full"

    @classmethod
    def of(cls, **axes: str | Method | dict[str, Any]) -> KVSpec:
        """Build from python values: ``KVSpec.of(retain="snapkv", budget={"name": "uniform", "tokens": 64})``."""
        fields: dict[str, Method] = {}
        for axis, value in axes.items():
            if axis not in AXES:
                raise SpecError(f"unknown axis {axis!r}; axes: {', '.join(AXES)}")
            if isinstance(value, Method):
                fields[axis] = make_method(axis, value.name, dict(value.params))
            elif isinstance(value, dict):
                value = dict(value)
                fields[axis] = make_method(axis, value.pop("name"), value)
            else:
                fields[axis] = _parse_method(axis, value, f"{axis}={value}")
        return cls(**_with_defaults(fields))

    @classmethod
    def parse(cls, text: str | KVSpec) -> KVSpec:
        if isinstance(text, KVSpec):
            return text
        if not isinstance(text, str):
            raise SpecError(f"a KV spec must be a string or KVSpec, got {type(text).__name__}: {text!r}")
        if not text.strip():
            raise SpecError("empty KV spec; try 'full' or 'snapkv:1024' (see `longctx methods`)")
        fields: dict[str, Method] = {}

        def put(axis: str, method: Method, token: str) -> None:
            if axis in fields:
                raise SpecError(f"{token!r}: axis {axis!r} given twice in {text!r}")
            fields[axis] = method

        for token in _TOKEN.findall(text):
            if "=" in token.split("(", 1)[0]:
                axis, value = token.split("=", 1)
                if axis not in AXES:
                    raise SpecError(f"{token!r}: unknown axis {axis!r}; axes: {', '.join(AXES)}")
                put(axis, _parse_method(axis, value, token), token)
                continue
            name, _, amount = token.partition(":")
            if amount:
                if lookup("retain", name) is None:
                    raise SpecError(f"{token!r}: unknown retain method {name!r}; "
                                    f"choose one of: {', '.join(methods('retain'))}")
                put("retain", make_method("retain", name, {}, token), token)
                put("budget", make_method("budget", "uniform", _budget_amount(amount, token), token), token)
                continue
            for axis in ("retain", "quant", "positions", "prefill", "select", "budget"):
                if lookup(axis, name) is not None and "(" not in token:
                    put(axis, make_method(axis, name, {}, token), token)
                    break
            else:
                if "(" in token:
                    bare = token.split("(", 1)[0]
                    axis = next((a for a in AXES if lookup(a, bare)), None)
                    if axis:
                        put(axis, _parse_method(axis, token, token), token)
                        continue
                raise SpecError(
                    f"{token!r}: not a KV method or alias; write axis=method(...) with axis in "
                    f"{', '.join(AXES)}, or an alias like snapkv:1024; methods: "
                    + "; ".join(f"{a}: {', '.join(methods(a))}" for a in AXES)
                )
        return cls(**_with_defaults(fields))


def _budget_amount(amount: str, where: str) -> dict[str, Any]:
    try:
        value = float(amount)
    except ValueError:
        raise SpecError(f"{where!r}: budget {amount!r} must be a token count (1024) or a fraction (0.25)") from None
    if value <= 0:
        raise SpecError(f"{where!r}: budget must be positive")
    if value < 1:
        return {"fraction": value}
    if not value.is_integer():
        raise SpecError(f"{where!r}: a token budget must be a whole number, got {amount}")
    return {"tokens": int(value)}


def _default_method(axis: str) -> Method:
    return make_method(axis, DEFAULTS[axis])


def _with_defaults(fields: dict[str, Method]) -> dict[str, Method]:
    return {axis: fields.get(axis) or make_method(axis, DEFAULTS[axis]) for axis in AXES}
