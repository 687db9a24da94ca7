"""GRPO's reward: a built-in task's verifiable one, or the user's Python function.

A user's reward is named ``module:function`` (an importable module) or
``path/to/file.py:function``, and is called as TRL calls its reward functions, so one
written for TRL works here: ``function(prompts=[...], completions=[...], **columns)``,
each column of the prompt records a list beside them, returning one number per
completion (None for one it cannot score).

One completion's bad reward does not stop the run: a reward that raises for the batch is
called again completion by completion, and a completion whose reward raises, is None or is
not a finite number gets NaN, which ``grpo.group_advantages`` leaves out (and the run
counts as skipped). The first reason each kind of failure gave is said once.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...lora.config import ConfigError

RewardFunction = Callable[..., Sequence[Any]]


def load_reward(spec: str | None, task: str | None) -> tuple[str, RewardFunction]:
    """(a name for the logs, the function) for ``--reward`` (None: the task's own)."""
    if spec is None:
        from ...tasks import get_task

        if task is None:
            raise ConfigError("objective grpo needs a reward: give --reward module:function")
        built_in = getattr(get_task(task), "rewards", None)
        if built_in is None:
            raise ConfigError(
                f"task {task!r} has no built-in reward (sql and e2e have); give --reward "
                "module:function"
            )

        def task_reward(prompts, completions, **columns):
            rows = zip(*columns.values(), strict=True)
            examples = [dict(zip(columns, row, strict=True)) for row in rows]
            return built_in(completions, examples or [{}] * len(completions))

        return task, task_reward
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"reward {spec!r}: give module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward {spec!r}: no such file {path}")
        loader = importlib.util.spec_from_file_location(f"loralab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as error:  # the user's file: say what it raised, in one line
            raise ConfigError(f"reward {spec!r}: {path} raised {error!r} on import") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # not found, or the user's module raised: one line
            raise ConfigError(f"reward {spec!r}: cannot import {module_name}: {error!r}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: {module_name} has no function {name!r}")
    return name, function


def compute_rewards(
    function: RewardFunction,
    prompts: list[Any],
    completions: list[Any],
    records: list[dict],
    said: set[str] | None = None,
) -> list[float]:
    """One reward per completion (``records[i]`` the prompt record of completion ``i``);
    NaN where it could not be computed. ``said`` holds the failures already reported."""
    said = set() if said is None else said
    try:
        values = list(function(prompts=prompts, completions=completions, **_columns(records)))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
    except Exception as error:  # one bad completion must not stop the run: one by one
        _say_once(said, f"the reward raised {error!r} for the batch; scoring one by one")
        values = []
        for prompt, completion, record in zip(prompts, completions, records, strict=True):
            try:
                values.append(
                    function(prompts=[prompt], completions=[completion], **_columns([record]))[0]
                )
            except Exception as one:
                _say_once(said, f"the reward raised {one!r} for a completion; it is skipped")
                values.append(None)
    return [_number(value, said) for value in values]


def _columns(records: list[dict]) -> dict[str, list]:
    names = [name for name in records[0] if name not in ("prompt", "completion")]
    return {name: [record.get(name) for record in records] for name in names}


def _number(value: Any, said: set[str]) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        _say_once(said, f"the reward gave {value!r}, not a number; that completion is skipped")
        return math.nan
    if not math.isfinite(number):
        _say_once(said, f"the reward gave {number}; that completion is skipped")
        return math.nan
    return number


def _say_once(said: set[str], message: str) -> None:
    kind = message.split(" for ")[0].split("(")[0]
    if kind not in said:
        said.add(kind)
        warnings.warn(f"grpo: {message}", stacklevel=3)
