"""The training loop: LoRA on a built-in task or a user's data file.

Every setting is a field of ``TrainConfig``; the command line and YAML files map onto it.
A run directory holds the resolved config, metrics (JSONL), a loss curve (PNG), the
final adapter and a checkpoint. A checkpoint has everything a run needs to continue bit
for bit: adapter, optimizer, scheduler, RNG state and step (the data order is a pure
function of the seed and the step), and it is written atomically, so a run killed at any
moment — SIGKILL included — resumes from the last complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .checkpoint import CHECKPOINT, check_resumable, find_checkpoint, save_checkpoint
from .config import ConfigError, LoraConfig
from .data import DataError, batch_stream, collate, encode_dataset, label_names_of, read_examples
from .inject import trainable_parameters
from .methods import Method, MethodSettings, get_method
from .methods.adalora import AdaLora, AdaLoraConfig
from .methods.adalora_report import write_rank_report
from .methods.files import load_method, save_method
from .methods.prefix import PromptTokens, prompt_tokens

SCHEDULES = ("linear", "cosine", "constant")
MODEL_KINDS = ("causal-lm", "classification")


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI flags and YAML keys are these fields."""

    model: str = "smollm2-135m"
    """An embedded model alias, a local model directory, a .gguf file, or a Hub id."""
    model_kind: str = "causal-lm"
    """``causal-lm`` or ``classification`` (a new classification head, trained in full)."""
    task: str | None = "e2e"
    """A built-in task (e2e, sql, nli, pydoc); ignored when ``data`` is given."""
    data: str | None = None
    """A JSONL or CSV training file: {prompt, completion}, {messages}, {text}, {text, label}."""
    validation_data: str | None = None
    """A file for validation loss; default: the task's validation split, or none."""
    output_dir: str = "runs/latest"
    """Where the config, metrics, loss curve, checkpoint and adapter are written."""
    train_size: int | None = None
    """Examples drawn from a built-in task's generator for training (None: its default)."""
    validation_size: int = 64
    """Validation examples used for the validation loss."""

    method: str = "lora"
    """How to adapt: lora, lora-pe, full, ft-top2, bitfit, preembed, prelayer, adapter-h,
    adapter-l, adalora (``loralab.methods``)."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA α; the update is scaled by α / r."""
    lora_dropout: float = 0.05
    """Dropout on the input of the low-rank path."""
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    """Weights to adapt: names, suffixes or short names (q, k, v, o, …), or all-linear."""
    prefix_length: int = 10
    """Prefix methods: l_p trainable tokens before the prompt."""
    infix_length: int = 0
    """Prefix methods: l_i trainable tokens between the prompt and the completion."""
    adapter_rank: int = 8
    """Adapter^H / Adapter^L: the bottleneck width r."""
    top_layers: int = 2
    """FT-Top2: how many of the last transformer blocks train."""
    target_r: int = 4
    """AdaLoRA: the average rank per matrix at the end (``r`` is the initial rank)."""
    adalora_tinit: int = 0
    """AdaLoRA: warm-up steps before any pruning."""
    adalora_tfinal: int = 0
    """AdaLoRA: final steps with the ranks fixed."""
    adalora_delta_t: int = 1
    """AdaLoRA: steps between two re-allocations of the budget."""
    adalora_beta1: float = 0.85
    """AdaLoRA: EMA coefficient of the smoothed sensitivity."""
    adalora_beta2: float = 0.85
    """AdaLoRA: EMA coefficient of the uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality regulariser on P and Q."""

    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    schedule: str = "linear"
    """Decay after warm-up: linear, cosine or constant."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the peak learning rate."""
    max_steps: int = 100
    """Optimizer steps in the run."""
    batch_size: int = 8
    """Examples per micro-batch."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 128
    """Tokens per example at most (longer ones are cut)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 turns it off)."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast."""
    seed: int = 0
    """Seeds the LoRA init, dropout and data order: a CPU run repeats bit for bit."""
    data_seed: int | None = None
    """Seeds a built-in task's examples and splits (None: ``seed``); fix it to compare
    seeds of training on the same data."""

    eval_every: int = 50
    """Validation loss every N steps (0: only at the end)."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar."""
    resume: bool = False
    """Continue from the checkpoint in ``output_dir``."""

    def __post_init__(self) -> None:
        positive_ints = ("max_steps", "batch_size", "gradient_accumulation", "max_length", "r")
        for name in positive_ints:
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 1, "an integer ≥ 1")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 0, "an integer ≥ 0")
        _require("log_every", self.log_every, lambda v: _is_int(v) and v >= 1, "an integer ≥ 1")
        _require("validation_size", self.validation_size, lambda v: _is_int(v) and v >= 0, "≥ 0")
        if self.data_seed is not None:
            _require("data_seed", self.data_seed, lambda v: _is_int(v) and v >= 0, "≥ 0")
        if self.train_size is not None:
            _require("train_size", self.train_size, lambda v: _is_int(v) and v >= 1, "≥ 1")
        _require(
            "learning_rate", self.learning_rate, lambda v: _is_number(v) and 0 < v < 1, "in (0, 1)"
        )
        _require("weight_decay", self.weight_decay, lambda v: _is_number(v) and v >= 0, "≥ 0")
        _require("max_grad_norm", self.max_grad_norm, lambda v: _is_number(v) and v >= 0, "≥ 0")
        _require("schedule", self.schedule, lambda v: v in SCHEDULES, f"one of {SCHEDULES}")
        _require("model_kind", self.model_kind, lambda v: v in MODEL_KINDS, f"one of {MODEL_KINDS}")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} is longer than max_steps={self.max_steps}"
            )
        if self.data is None and self.task is None:
            raise ConfigError("give a built-in task (task) or a data file (data)")
        get_method(self.method)  # an unknown name lists the valid ones
        self.method_settings()  # l_p, l_i, adapter rank, top layers: validated there
        self.lora_config()  # r, alpha, dropout, targets: validated by LoraConfig itself
        if self.method == "adalora":
            self.adalora_config()  # target_r ≤ r, a schedule that fits max_steps

    def adalora_config(self) -> AdaLoraConfig:
        """AdaLoRA's settings: ``r`` is its initial rank, the schedule spans the run."""
        targets = self.target_modules
        targets = "all-linear" if targets in ("all-linear", ["all-linear"]) else targets
        return AdaLoraConfig(
            init_r=self.r,
            target_r=self.target_r,
            tinit=self.adalora_tinit,
            tfinal=self.adalora_tfinal,
            deltaT=self.adalora_delta_t,
            beta1=self.adalora_beta1,
            beta2=self.adalora_beta2,
            orth_reg_weight=self.orth_reg_weight,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
        ).for_steps(self.max_steps)

    def method_object(self) -> Method:
        """The method the run applies, built with the run's settings where it needs them."""
        if self.method == "adalora":
            return AdaLora(self.adalora_config())
        return get_method(self.method)

    def method_settings(self) -> MethodSettings:
        return MethodSettings(
            prefix_length=self.prefix_length,
            infix_length=self.infix_length,
            adapter_rank=self.adapter_rank,
            top_layers=self.top_layers,
        )

    def lora_config(self) -> LoraConfig:
        targets = self.target_modules
        # On the command line every value is a list: one "all-linear" means the keyword.
        targets = "all-linear" if targets in ("all-linear", ["all-linear"]) else targets
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(name: str, value: Any, check, allowed: str) -> None:
    if not check(value):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def config_from_file(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file, with ``overrides`` (the command line) on top."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: malformed YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
    merged = {**data, **(overrides or {})}
    try:
        return TrainConfig(**merged)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# -- the pieces of a run ------------------------------------------------------------------------


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of the peak learning rate at ``step``: warm-up, then the decay."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass
class Examples:
    """A run's raw examples, read and checked before any model is loaded."""

    train: list[dict]
    validation: list[dict]
    label_names: tuple[str, ...] | None  # the classes, for a classifier


@dataclass
class Datasets:
    train: list
    validation: list
    label_names: tuple[str, ...] | None
    examples: Examples


def load_examples(config: TrainConfig) -> Examples:
    """Training and validation examples: from the user's files or a built-in task."""
    classifier = config.model_kind == "classification"
    if config.data is not None:
        train_examples = read_examples(config.data)
        validation_examples = (
            read_examples(config.validation_data) if config.validation_data else []
        )
        label_names = label_names_of(train_examples) if classifier else None
    else:
        from .tasks import get_task

        task = get_task(config.task)
        if classifier and task.kind != "classification":
            raise ConfigError(f"task {task.name!r} is not a classification task")
        data_seed = config.seed if config.data_seed is None else config.data_seed
        splits = task.splits(seed=data_seed, train_size=config.train_size)
        train_examples, validation_examples = splits["train"], splits["validation"]
        label_names = tuple(task.labels) if classifier else None
    return Examples(train_examples, validation_examples[: config.validation_size], label_names)


def encode_examples(
    config: TrainConfig, examples: Examples, tokenizer, prompt_tokens: PromptTokens | None = None
) -> Datasets:
    """The examples as token ids, ready for batching (with a prefix method's tokens)."""

    def encode(items: list[dict]) -> list:
        return encode_dataset(
            tokenizer, items, config.max_length, examples.label_names, prompt_tokens=prompt_tokens
        )

    validation = encode(examples.validation) if examples.validation else []
    return Datasets(encode(examples.train), validation, examples.label_names, examples)


def prepare_model(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Apply the run's method (LoRA by default) with its settings; a classifier's new head
    always trains in full."""
    method = config.method_object()
    settings = config.method_settings()
    lora = config.lora_config() if method.uses_lora else None
    method.check(model, settings, lora, config.max_length)
    torch.manual_seed(config.seed)  # the method's init is part of what the seed fixes
    method.apply(model, settings, lora)
    return model


@torch.no_grad()
def validation_loss(model: nn.Module, data: list, batch_size: int, pad_id: int) -> float:
    """Mean loss per counted token (causal LM) or per example (classifier)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], pad_id)
        loss = model(**batch).loss.item()
        labels = batch["labels"]
        weight = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.numel()
        total += loss * weight
        count += weight
    model.train(was_training)
    return total / max(count, 1)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    validation: list[tuple[int, float]]
    seconds: float
    trainable: int
    total: int
    model: nn.Module | None = None
    tokenizer: Any = None
    datasets: Datasets | None = None


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run; a checkpoint was written first."""


def train(config: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    """Run training as ``config`` says. ``model``/``tokenizer`` skip loading (library use)."""
    run_dir = Path(config.output_dir)
    checkpoint = None
    if config.resume:
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir}")
        saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        check_resumable(saved["config"], config, checkpoint)
    writer = _tensorboard_writer(config, run_dir)  # fails before any work if not installed
    examples = load_examples(config)  # bad data fails before the model is loaded
    if model is None:
        from .models import load_model

        labels = {"num_labels": len(examples.label_names)} if examples.label_names else {}
        model, tokenizer = load_model(config.model, kind=config.model_kind, **labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if checkpoint is None:
        prepare_model(config, model)
    else:
        load_method(model, checkpoint / "adapter")
    # After the method: a prefix method's special tokens are part of every example.
    datasets = encode_examples(config, examples, tokenizer, prompt_tokens(model))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    hooks = config.method_object()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config)
    )
    step = 0
    if checkpoint is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = saved["step"]
        torch.set_rng_state(saved["rng_torch"])
        random.setstate(_as_python_state(saved["rng_python"]))
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    metrics_path = run_dir / "metrics.jsonl"
    history = _read_history(metrics_path, up_to=step)
    report = trainable_parameters(model)
    lengths = [len(item) for item in datasets.train]
    consumed = step * config.gradient_accumulation  # the data order is fixed by the seed
    stream = batch_stream(lengths, config.batch_size, config.seed, start=consumed)
    model.train()
    started = time.perf_counter()
    bar = _progress_bar(config, initial=step)
    interrupted = False
    with _interruptible() as stop:
        while step < config.max_steps:
            step_started = time.perf_counter()
            loss_value, tokens = _optimizer_step(
                model, optimizer, parameters, stream, datasets.train, pad_id, config, hooks
            )
            scheduler.step()
            step += 1
            if hasattr(hooks, "after_optimizer_step"):
                hooks.after_optimizer_step(model, step, config.max_steps)
            seconds = time.perf_counter() - step_started
            entry = {
                "step": step,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / seconds,
                "seconds": seconds,
            }
            if step % config.log_every == 0 or step == config.max_steps:
                history.append(entry)
                _append_jsonl(metrics_path, entry)
                if writer:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", entry["lr"], step)
            due_eval = config.eval_every and step % config.eval_every == 0
            if datasets.validation and (due_eval or step == config.max_steps):
                value = validation_loss(model, datasets.validation, config.batch_size, pad_id)
                evaluation = {"step": step, "validation_loss": value}
                history.append(evaluation)
                _append_jsonl(metrics_path, evaluation)
                if writer:
                    writer.add_scalar("validation/loss", value, step)
            if bar:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{entry['lr']:.2e}",
                    tok_s=f"{entry['tokens_per_s']:.0f}",
                )
            # A signal lets the step in flight finish, so the state saved is exactly the
            # one an uninterrupted run has between two steps.
            due_save = config.save_every and step % config.save_every == 0
            if (due_save or stop.requested) and step < config.max_steps:
                save_checkpoint(run_dir, model, optimizer, scheduler, step, config)
            if stop.requested and step < config.max_steps:
                interrupted = True
                break
    if bar:
        bar.close()
    if writer:
        writer.close()
    if interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {step} of {config.max_steps}; a checkpoint is in "
            f"{run_dir / CHECKPOINT}: add --resume to continue"
        )
    adapter_dir = save_method(model, run_dir / "adapter", base_model_name_or_path=config.model)
    if config.method == "adalora":  # the ranks AdaLoRA chose: a table, JSON and a heatmap
        write_rank_report(model, run_dir)
    _plot_losses(history, run_dir / "loss.png")
    model.eval()
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        steps=step,
        losses=[e["loss"] for e in history if "loss" in e],
        validation=[(e["step"], e["validation_loss"]) for e in history if "validation_loss" in e],
        seconds=time.perf_counter() - started,
        trainable=report.trainable,
        total=report.total,
        model=model,
        tokenizer=tokenizer,
        datasets=datasets,
    )


def _optimizer_step(
    model, optimizer, parameters, stream, data, pad_id, config, hooks=None
) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one step, then the update.

    The reported loss is the task's; a method's regulariser (AdaLoRA) is added to what is
    differentiated, not to what is logged."""
    regularizer = getattr(hooks, "regularizer", None)
    optimizer.zero_grad(set_to_none=True)
    total_loss, tokens = 0.0, 0
    for _ in range(config.gradient_accumulation):
        batch = collate([data[i] for i in next(stream)], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**batch).loss / config.gradient_accumulation
        extra = regularizer(model) if regularizer else None
        (loss if extra is None else loss + extra / config.gradient_accumulation).backward()
        total_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    return total_loss, tokens


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _interruptible():
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step."""
    flag = _StopFlag()

    def request(signum, frame):
        if flag.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        flag.requested = True

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Outside the main thread signals cannot be caught: train on without the handler.
        with contextlib.suppress(ValueError):
            previous[signum] = signal.signal(signum, request)
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _as_python_state(state):
    # torch.load gives lists where random.getstate() had tuples.
    return (state[0], tuple(state[1]), state[2])


def _read_history(path: Path, up_to: int) -> list[dict]:
    """Metrics of the steps before a resume point; later lines (lost work) are dropped."""
    if not path.exists() or up_to == 0:
        path.unlink(missing_ok=True)
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [entry for entry in kept if entry["step"] <= up_to]
    path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def _append_jsonl(path: Path, entry: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def _progress_bar(config: TrainConfig, initial: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=initial, desc="train", unit="step")


def _tensorboard_writer(config: TrainConfig, run_dir: Path):
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'loralab[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    validation = [(e["step"], e["validation_loss"]) for e in history if "validation_loss" in e]
    if train:
        axis.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if validation:
        axis.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


__all__ = ["DataError", "TrainConfig", "TrainResult", "TrainingInterrupted", "train"]
