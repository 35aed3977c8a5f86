"""The evaluation tasks by name, and the groups of them that ``--tasks`` accepts.

``TASKS`` maps each task name to its class (constructible with no arguments); ``GROUPS`` maps a group alias to its
task names (``ruler``: the six RULER tasks). :func:`get_task` builds one task; :func:`get_tasks` expands a
comma-separated list of task names and groups.
"""

from __future__ import annotations

from collections.abc import Iterable

from longctx.errors import LongctxError
from longctx.eval.tasks.base import Question, Sample, Task
from longctx.eval.tasks.needle import NeedleTask, PasskeyTask
from longctx.eval.tasks.ruler import (
    CommonWordsExtraction,
    FrequentWordsExtraction,
    NiahMultiKey,
    NiahMultiQuery,
    NiahMultiValue,
    VariableTracking,
)

TASKS: dict[str, type] = {
    cls.name: cls
    for cls in (NeedleTask, PasskeyTask, NiahMultiKey, NiahMultiValue, NiahMultiQuery, VariableTracking,
                CommonWordsExtraction, FrequentWordsExtraction)
}
GROUPS: dict[str, tuple[str, ...]] = {
    "ruler": ("niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"),
}


def _valid_names() -> str:
    groups = ", ".join(f"{g} ({'+'.join(names)})" for g, names in GROUPS.items())
    return f"tasks: {', '.join(TASKS)}; groups: {groups}"


def get_task(name: str) -> Task:
    """A new instance (default settings) of the task called ``name``; :class:`LongctxError` listing the valid
    names otherwise (a group name is refused here: use :func:`get_tasks`)."""
    key = name.strip().lower()
    if key in TASKS:
        return TASKS[key]()
    if key in GROUPS:
        raise LongctxError(f"{name!r} is a group of tasks ({', '.join(GROUPS[key])}); use get_tasks() to expand it")
    raise LongctxError(f"unknown task {name!r}; valid {_valid_names()}")


def get_tasks(names: str | Iterable[str]) -> list[Task]:
    """Tasks for a comma-separated string or a list of task names and group aliases, expanded in order and
    without duplicates (``"needle,ruler"`` -> needle and the six RULER tasks)."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    wanted: list[str] = []
    for part in parts:
        key = part.strip().lower()
        if not key:
            continue
        wanted.extend(GROUPS.get(key, (key,)))
    if not wanted:
        raise LongctxError(f"no task named; valid {_valid_names()}")
    return [get_task(n) for n in dict.fromkeys(wanted)]


__all__ = ["GROUPS", "TASKS", "Question", "Sample", "Task", "get_task", "get_tasks"]
