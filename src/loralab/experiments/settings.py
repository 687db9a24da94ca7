"""The settings of the paper's experiments: which embedded model each task runs on, the
learning rate of each method, how big the runs are (``Scale``), and the arms an
experiment compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from .store import Shard

# The embedded model each built-in task runs on: the classifier for nli (the paper's
# RoBERTa/DeBERTa analogue), the causal LM for the generation tasks (its GPT-2/GPT-3).
TASK_MODELS = {
    "nli": ("minilm-l6", "classification"),
    "e2e": ("smollm2-135m", "causal-lm"),
    "sql": ("smollm2-135m", "causal-lm"),
}

# Learning rates per method, as the paper tunes them per method (Appendix D): methods
# that train few parameters from a zero or neutral start take larger steps. Checked on nli
# (MiniLM, 250–300 steps of batch 8): LoRA 66.5 and 67.0 (two seeds) at 1e-3, 64.5 and
# 67.0 at 2e-3, chance (33.5) at 5e-3; at 2e-3 some runs fell to chance and stayed there
# (all four weights at r = 4, LoRA+PE), which none did at 1e-3. BitFit 69.5 at 2e-3,
# chance at 1e-2. AdaLoRA starts from P, Q of N(0, 0.02) and Λ = 0, a product of three
# small factors that 2e-3 left at chance (34.5, two seeds) and 5e-3 took to 67.5.
LEARNING_RATES = {
    "full": 1e-4,
    "ft-top2": 2e-4,
    "bitfit": 2e-3,
    "preembed": 1e-2,
    "prelayer": 5e-3,
    "adapter-h": 2e-3,
    "adapter-l": 2e-3,
    "lora": 1e-3,
    "lora-pe": 1e-3,
    "adalora": 5e-3,
}
# The classifier's new head (nli on MiniLM) trains at this rate in every method, not at
# the method's: at LoRA's 1e-3 one seed of four stayed at chance for 200 steps of low-data's
# n = 10,000 setting (37.8 %), at 1e-2 none did (66.8 ± 0.8 %; ``reproduce recipe``).
HEAD_LEARNING_RATE = 1e-2
# The metric a task's learning rate is chosen by (on validation), the first of its table.
EXPERIMENT_TASKS = ("nli", "e2e", "sql")  # the order of the tables


def primary_metric(task: str) -> str:
    """The metric the tables report for ``task``: the task's own (``Task.primary_metric``)."""
    from ..tasks import get_task

    return get_task(task).primary_metric


DATA_SEED = 0  # every arm and seed sees the same examples and the same test split
RUN_THREADS = 1  # every run trains on one thread, whatever the number of jobs


@dataclass(frozen=True)
class Scale:
    """How big the runs of an experiment are (``--quick`` or the full mode)."""

    steps: int
    train_size: int
    test_size: int
    seeds: tuple[int, ...]
    batch_size: int = 8
    max_length: int = 96
    quick: bool = False
    """The ``--quick`` mode: an experiment may also run fewer tasks in it."""
    jobs: int = 1
    """Runs trained side by side, each in a process of its own on one thread (``--jobs``):
    the time changes, the numbers do not."""
    per_task: tuple[tuple[str, Scale], ...] = ()
    """Tasks that run at a size of their own: a task on the 135M-parameter causal LM takes
    some 30× longer a step than nli on MiniLM. Their seeds, jobs, mode, selection and
    store are this scale's."""
    lr_grid: tuple[float, ...] = ()
    """Learning-rate selection: each method's rate times each of these factors is trained
    with the first seed and scored on ``validation_size`` validation examples; the best
    is then trained with every seed and scored on test. Empty: each method's own rate."""
    validation_size: int = 0
    name: str = ""
    """The mode (``quick``, ``standard``, ``full``): the results folder's name."""
    store: str | None = None
    """The result store's folder (``experiments/store.py``): runs found there are read, not
    trained, and each run is kept there as it finishes. Not part of what a run computes."""
    shard: Shard | None = None
    """``--shard K/N``: train only every N-th run of each plan (the others' shards train
    the rest). Not part of what a run computes."""
    quantized_base: str | None = None
    """``--quantized-base``: every run trains over its base stored so (gguf, nf4, fp4,
    int8); None, the dense base. A method that trains the base's weights refuses it."""

    def with_seeds(self, count: int | None) -> Scale:
        if count is None:
            return self
        return replace(self, seeds=tuple(range(count)))  # keeps a subclass

    def for_task(self, task: str) -> Scale:
        """The scale ``task``'s runs train and score at."""
        own = dict(self.per_task).get(task)
        if own is None:
            return self
        shared = ("seeds", "jobs", "quick", "name", "store", "shard", "quantized_base")
        return replace(own, per_task=(), **{key: getattr(self, key) for key in shared})

    def describe(self) -> str:
        """One line for the report: what was run, at what size."""
        sizes = self._size()
        for task, own in self.per_task:
            sizes += f"; {task}: {own._size()}"
        base = f"; the base quantized: {self.quantized_base}" if self.quantized_base else ""
        return (
            f"{sizes}; seeds {list(self.seeds)}; "
            f"{self.jobs} job{'s' if self.jobs != 1 else ''} of one thread{base}"
        )

    def _size(self) -> str:
        size = (
            f"{self.steps} steps × batch {self.batch_size}, {self.train_size} training "
            f"examples, {self.test_size} test examples"
        )
        if self.lr_grid:
            factors = ", ".join(f"{f:g}" for f in self.lr_grid)
            size += (
                f", learning rate chosen from ×{{{factors}}} of each method's on "
                f"{self.validation_size} validation examples"
            )
        return size


# The sizes of a run on the embedded causal LM (e2e, sql on SmolLM2-135M), in an
# experiment's per_task. Measured on the 2-core build machine, one thread a run, two runs
# side by side: 4.7 s a step of batch 8 (MiniLM on nli: 0.16 s, full fine-tuning 0.3 s),
# and about 25 s to score 64 sql or e2e test examples. A quick run: 40 steps, about 4 min.
LM_QUICK = Scale(steps=40, train_size=1000, test_size=64, seeds=(0, 1), batch_size=8)
# Learning-rate selection: each method's own rate halved, kept and doubled (and one step
# further where the best is at an edge, runs.run_arms).
LR_GRID = (0.5, 1.0, 2.0)
# nli validation examples a candidate rate is scored on: MiniLM scores 200 in about 3 s.
NLI_VALIDATION = 200


def selecting(scale: Scale, validation_size: int) -> Scale:
    """``scale`` with each method's learning rate chosen from ``LR_GRID`` on
    ``validation_size`` validation examples."""
    return replace(scale, lr_grid=LR_GRID, validation_size=validation_size)


# The standard mode: the quick size, each method's learning rate chosen from three on 32
# validation examples (a run scores 96 examples, about 50 s, beside 40 steps of 3–4 s).
LM_STANDARD = selecting(LM_QUICK, 32)
LM_FULL = Scale(steps=200, train_size=2000, test_size=200, seeds=(0, 1, 2), batch_size=8)
# The full mode of the experiments that compare methods: rates chosen on 100 examples.
LM_FULL_SELECTED = selecting(LM_FULL, 100)

# The full mode on nli (MiniLM): the paper's GLUE-style setting at a laptop's size, which
# every experiment's full mode starts from (its own seeds, its LM tasks in per_task).
NLI_FULL = Scale(steps=1500, train_size=10_000, test_size=1000, seeds=(0, 1, 2), batch_size=8)
# The same with each method's learning rate chosen on 500 validation examples.
NLI_FULL_SELECTED = selecting(NLI_FULL, 500)


def default_jobs() -> int:
    """One job per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Arm:
    """One configuration an experiment compares: a row of its table."""

    label: str
    task: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    x: float | None = None  # where it sits on a figure's x axis, if it has one
