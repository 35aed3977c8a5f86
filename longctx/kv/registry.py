"""Registry of KV methods: axis -> name -> policy class.

A method is a frozen dataclass whose fields are its parameters (with
defaults) and whose docstring's first line is its one-line description.
Adding a method is one new file with ``@register("retain", "name")`` on the
class, plus one import line in ``longctx/kv/methods.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

AXES = ("prefill", "retain", "quant", "budget", "select", "positions")
AXIS_HELP = {
    "prefill": "how the prompt is fed: all at once or in chunks",
    "retain": "which cached tokens each row keeps",
    "quant": "storage precision of kept tokens (composes with retain)",
    "budget": "how many tokens each layer / kv-head may keep",
    "select": "which kept tokens each decode step reads",
    "positions": "which positions kept tokens carry",
}
_REGISTRY: dict[str, dict[str, type]] = {axis: {} for axis in AXES}

T = TypeVar("T")


def register(axis: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a frozen dataclass available as ``axis=name(...)``."""
    if axis not in _REGISTRY:
        raise ValueError(f"unknown axis {axis!r}")

    def deco(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if name in _REGISTRY[axis]:
            raise ValueError(f"{axis} method {name!r} registered twice")
        _REGISTRY[axis][name] = cls
        cls.method_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def methods(axis: str) -> dict[str, type]:
    _ensure_loaded()
    return dict(_REGISTRY[axis])


def lookup(axis: str, name: str) -> type | None:
    _ensure_loaded()
    return _REGISTRY[axis].get(name)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    type: type
    default: Any
    help: str


def params_of(cls: type) -> list[ParamInfo]:
    """The parameters of a method class, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        typ = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type), f.type)
        out.append(ParamInfo(f.name, typ, f.default, f.metadata.get("help", "")))
    return out


def describe(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def param(default: Any, help: str) -> Any:
    """A method parameter with a default and a one-line help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _ensure_loaded() -> None:
    import longctx.kv.methods  # noqa: F401, PLC0415 - registers every method
