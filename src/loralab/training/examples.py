"""A run's examples: where they come from (a built-in task, the user's files, or records
given to ``train`` in memory), which are validated on, the run's copy of records given
in memory, and the examples as token ids."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.arrow_files import splits_of
from ..data.encoding import PREFERENCE_REFUSAL, encode_dataset
from ..data.packing import pack
from ..data.pairs import encode_completions, encode_pairs
from ..data.records import (
    DataError,
    checked_rows,
    example_shape,
    label_names_of,
    read_located_examples,
    read_located_splits,
)
from ..files.atomic_write import text_writer, write_files_atomically
from ..lora.config import ConfigError
from ..methods.prefix import PromptTokens
from .config import TrainConfig
from .objectives.grpo_step import encode_prompts


@dataclass
class Examples:
    """A run's raw examples, read and checked before any model is loaded."""

    train: list[dict]
    validation: list[dict]
    label_names: tuple[str, ...] | None  # the classes, for a classifier
    train_where: list[str] = dataclasses.field(default_factory=list)
    """Where each training record is (file and line or row), for the user's data."""
    validation_where: list[str] = dataclasses.field(default_factory=list)


@dataclass
class Datasets:
    """A run's examples as token ids, and the rows its batches are drawn from."""

    train: list
    validation: list
    label_names: tuple[str, ...] | None
    examples: Examples
    rows: list = dataclasses.field(default_factory=list)
    """What a batch holds: the training examples, or with ``packing`` the rows they were
    packed into."""

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = self.train


def load_examples(config: TrainConfig, data: Any = None) -> Examples:
    """Training and validation examples: from ``data`` (a ``datasets.Dataset`` or
    ``DatasetDict``, or a sequence of records, given to ``train``), the user's files, or
    a built-in task."""
    classifier = config.model_kind == "classification"
    if data is None and config.data is None:
        return _task_examples(config, classifier)
    if data is not None:
        splits = {
            name: checked_rows(split, f"data[{name!r}]", data_format=config.data_format)
            for name, split in splits_of(data, "data").items()
        }
        label = "the data given to train()"
    else:
        splits, label = read_located_splits(config.data, config.data_format), config.data
    train_rows, validation_rows = _data_splits(config, splits, label)
    if config.grpo:  # no validation loss: each step logs its completions' reward
        validation_rows = []
    validation_rows = validation_rows[: config.validation_size]
    train_examples = [record for _, record in train_rows]
    validation_examples = [record for _, record in validation_rows]
    _check_shape_fits_model(label, train_examples, classifier, config.objective)
    if validation_examples:
        where = config.validation_data or f"{label} (its validation records)"
        _check_shape_fits_model(where, validation_examples, classifier, config.objective)
    return Examples(
        train_examples,
        validation_examples,
        label_names_of(train_examples) if classifier else None,
        train_where=[where for where, _ in train_rows],
        validation_where=[where for where, _ in validation_rows],
    )


def _task_examples(config: TrainConfig, classifier: bool) -> Examples:
    from ..tasks import get_task

    if config.validation_split_fraction is not None:
        raise ConfigError(
            "validation_split_fraction holds out part of your own data; a built-in "
            f"task ({config.task}) has its own validation split"
        )
    task = get_task(config.task)
    if classifier and task.kind != "classification":
        raise ConfigError(f"task {task.name!r} is not a classification task")
    data_seed = config.seed if config.data_seed is None else config.data_seed
    if config.grpo:  # the task's prompts, each with what its reward reads; no validation
        if config.reward is None and getattr(task, "rewards", None) is None:
            raise ConfigError(
                f"objective='grpo' needs a reward; task {task.name!r} has none built in (sql "
                "and e2e have), so give --reward module:function"
            )
        return Examples(
            task.splits(seed=data_seed, train_size=config.train_size)["train"], [], None
        )
    if config.objective != "sft":
        if getattr(task, "preference_splits", None) is None:
            raise ConfigError(
                f"objective={config.objective!r} trains on preference pairs; task "
                f"{task.name!r} has none (e2e has), so give --data with "
                "{prompt, chosen, rejected} records"
            )
        splits = task.preference_splits(seed=data_seed, train_size=config.train_size)
        return Examples(splits["train"], splits["validation"][: config.validation_size], None)
    splits = task.splits(seed=data_seed, train_size=config.train_size)
    label_names = tuple(task.labels) if classifier else None
    return Examples(splits["train"], splits["validation"][: config.validation_size], label_names)


Located = list[tuple[str, dict]]  # records, each with where it is


def _data_splits(
    config: TrainConfig, splits: dict[str, Located], label: str
) -> tuple[Located, Located]:
    """The training records of the data's ``splits`` (its ``data_split``) and the
    validation ones: ``validation_data``, else the data's own validation split, else
    ``validation_split_fraction`` of the training records, else none."""
    if config.data_split not in splits:
        raise DataError(
            f"{label}: no split {config.data_split!r} (data_split); it has {', '.join(splits)}"
        )
    train_examples = splits[config.data_split]
    own = [name for name in VALIDATION_SPLITS if name in splits and name != config.data_split]
    fraction = config.validation_split_fraction
    if fraction is not None and (config.validation_data or own):
        given = config.validation_data or f"{label}'s {own[0]!r} split"
        raise DataError(
            f"validation_split_fraction {fraction} and {given} both give the validation "
            "set; drop one"
        )
    if config.validation_data:
        return train_examples, read_located_examples(config.validation_data, config.data_format)
    if own:
        return train_examples, splits[own[0]]
    if fraction is None:
        return train_examples, []
    seed = config.seed if config.data_seed is None else config.data_seed
    order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed))
    held = round(len(train_examples) * fraction)
    if held == 0 or held == len(train_examples):
        raise DataError(
            f"{label}: validation_split_fraction {fraction} of "
            f"{len(train_examples)} records holds out {held}; it must leave at least one "
            "record on each side"
        )
    held_out = set(order[:held].tolist())
    validation = [r for i, r in enumerate(train_examples) if i in held_out]
    return [r for i, r in enumerate(train_examples) if i not in held_out], validation


DATA_COPY = "data"  # the run's folder for the records it was given in memory


def with_data_copy(config: TrainConfig, run_dir: Path, examples: Examples) -> TrainConfig:
    """``config`` naming a JSONL copy of the records the run trains and validates on
    (written atomically into the run's folder), as if they had been given as files."""
    folder = run_dir / DATA_COPY
    folder.mkdir(exist_ok=True)
    writers = {"train.jsonl": text_writer(_jsonl(examples.train))}
    if examples.validation:
        writers["validation.jsonl"] = text_writer(_jsonl(examples.validation))
    write_files_atomically(folder, writers)
    return dataclasses.replace(
        config,
        data=str(folder / "train.jsonl"),
        data_split="train",
        validation_data=str(folder / "validation.jsonl") if examples.validation else None,
        validation_split_fraction=None,
        data_format="auto",  # the copy holds the records as the encoder reads them
    )


def _jsonl(records: list[dict]) -> str:
    """The records as JSON Lines (built before any file is opened, so a record that is
    not JSON leaves nothing half-written)."""
    lines = []
    for index, record in enumerate(records):
        try:
            lines.append(json.dumps(record, ensure_ascii=False, default=_plain) + "\n")
        except TypeError as error:
            raise DataError(f"data, record {index}: not JSON: {error}") from None
    return "".join(lines)


def _plain(value: Any) -> Any:
    """A NumPy or PyTorch scalar or array as the Python value JSON takes."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# The names a saved DatasetDict's validation split goes by, in the order they are looked for.
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


def _check_shape_fits_model(
    path: str, examples: list[dict], classifier: bool, objective: str = "sft"
) -> None:
    """A classifier trains on {text, label} records, a preference objective on pairs,
    GRPO on prompts and supervised fine-tuning of a causal LM on the other shapes; said
    before the model loads, not when the first record is encoded."""
    shape = example_shape(examples[0])
    if objective == "grpo":
        if shape not in ("prompt", "prompt_completion"):
            raise DataError(
                f"{path}: objective grpo samples completions for {{prompt}} records (other "
                f"fields go to the reward); these are {shape} records"
            )
        return
    if shape == "prompt":
        raise DataError(
            f"{path}: these records have a prompt and no completion: prompts for "
            "--objective grpo, which samples completions and scores them with a reward; "
            "supervised fine-tuning needs {prompt, completion} records"
        )
    if objective == "kto":
        if shape not in ("preference", "unpaired"):
            raise DataError(
                f"{path}: objective kto trains on {{prompt, completion, label: true/false}} "
                f"records or on preference pairs; these are {shape} records"
            )
        return
    if shape == "unpaired":
        raise DataError(
            f"{path}: these are completions marked desirable or not (a true/false label): "
            "they train with --objective kto"
        )
    pairs = objective != "sft"
    if pairs and shape != "preference":
        raise DataError(
            f"{path}: a preference objective trains on {{prompt, chosen, rejected}} pairs; "
            f"these are {shape} records (they train with objective sft)"
        )
    if shape == "preference" and not pairs:
        raise DataError(
            f"{path}: these are preference records (prompt, chosen, rejected): {PREFERENCE_REFUSAL}"
        )
    if classifier and shape != "text_label":
        raise DataError(
            f"{path}: model_kind 'classification' trains on {{text, label}} records; "
            f"these are {shape} records (for a causal LM, leave model_kind at 'causal-lm')"
        )
    if not classifier and shape == "text_label":
        raise DataError(
            f"{path}: {{text, label}} records train a classifier; set model_kind to "
            "'classification' (--model-kind classification)"
        )


def encode_examples(
    config: TrainConfig, examples: Examples, tokenizer, prompt_tokens: PromptTokens | None = None
) -> Datasets:
    """The examples as token ids, ready for batching (with a prefix method's tokens); a
    preference objective's as pairs."""

    def encode(items: list[dict], where: str | list[str]) -> list:
        if config.objective == "kto":
            return encode_completions(
                tokenizer, items, config.max_length, prompt_tokens, config.long_examples, where
            )
        if config.grpo:
            return encode_prompts(tokenizer, items, config.max_length, where)
        if config.objective != "sft":
            return encode_pairs(
                tokenizer, items, config.max_length, prompt_tokens, config.long_examples, where
            )
        return encode_dataset(
            tokenizer,
            items,
            config.max_length,
            examples.label_names,
            prompt_tokens=prompt_tokens,
            train_on=config.train_on,
            long_examples=config.long_examples,
            where=where,
        )

    # Where each record is (the user's data), else its number in the task's split.
    validation = (
        encode(
            examples.validation, examples.validation_where or f"{config.task}: validation record"
        )
        if examples.validation
        else []
    )
    train = encode(examples.train, examples.train_where or f"{config.task}: training record")
    for split, given, kept in (
        ("training", examples.train, train),
        ("validation", examples.validation or [], validation),
    ):
        if len(kept) < len(given):
            warnings.warn(
                f"{len(given) - len(kept)} of {len(given)} {split} examples were dropped: "
                f"their completion starts after max_length={config.max_length} tokens, so "
                "no token of it would be learnt; raise --max-length to keep them",
                stacklevel=2,
            )
    rows = pack(train, config.max_length) if config.packing else train
    return Datasets(train, validation, examples.label_names, examples, rows)
