"""The built-in tasks: small, seeded analogues of the LoRA paper's benchmarks.

- ``e2e``: restaurant meaning representation → description (E2E NLG; BLEU, ROUGE-L);
- ``sql``: question over a table → SQL (WikiSQL; execution accuracy in SQLite);
- ``nli``: premise + hypothesis → entailment / neutral / contradiction (MNLI; accuracy);
- ``pydoc``: CPython's own documentation as language-modelling text (perplexity).

Everything is generated from a seed: no downloads, the same splits in every process.
"""

from __future__ import annotations

from .e2e import E2ETask
from .nli import NliTask
from .pydoc import PydocTask
from .sql import SqlTask
from .task import Task, TaskError

_TASKS: dict[str, type] = {"e2e": E2ETask, "sql": SqlTask, "nli": NliTask, "pydoc": PydocTask}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (one of ``TASK_NAMES``)."""
    if not isinstance(name, str) or name not in _TASKS:
        raise TaskError(f"unknown task {name!r}; the built-in tasks are {', '.join(TASK_NAMES)}")
    return _TASKS[name]()


__all__ = ["TASK_NAMES", "Task", "TaskError", "get_task"]
