"""The training loop: LoRA on a built-in task or a user's data file.

Every setting is a field of ``TrainConfig``; the command line and YAML files map onto it.
A run directory holds the resolved config, metrics (JSONL), a loss curve (PNG), the
final adapter and a checkpoint. A checkpoint has everything a run needs to continue bit
for bit: adapter, optimizer, scheduler, RNG state and step (the data order is a pure
function of the seed and the step), and it is written atomically, so a run killed at any
moment — SIGKILL included — resumes from the last complete one.

Started by ``torchrun`` it trains on every process with DDP, or FSDP2 with ``fsdp``
(``distributed.py``: the batch semantics, the loss normalisation, which rank writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..data.batches import batch_stream, collate
from ..data.encoding import counted
from ..data.packing import fills
from ..data.pairs import EncodedCompletion, EncodedPair, pair_counted
from ..data.records import DataError
from ..files.output_dirs import check_output_dir
from ..lora.config import ConfigError
from ..lora.inject import ParameterReport, trainable_parameters
from ..lora.state import model_state
from ..methods import Method
from ..methods.method_files import load_method, save_method
from ..methods.prefix import prompt_tokens
from ..models.devices import base_dtype, place
from .checkpoint import CHECKPOINT, check_resumable, find_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import (
    World,
    barrier,
    from_main,
    full_optimizer_state,
    full_trainable_parameters,
    gather_objects,
    gradient_sync,
    join,
    leave,
    peers_checked,
    rng_state,
    rows_of_rank,
    set_rng_state,
    shard_fsdp,
    shard_optimizer_state,
    shared_directory,
    sum_over_ranks,
    to_device,
    world_from_environment,
    wrap_ddp,
)
from .examples import Datasets, Examples, encode_examples, load_examples, with_data_copy
from .lean_mlp import lean_mlp
from .loss import causal_lm_loss
from .malloc_threshold import map_large_blocks
from .objectives.grpo import nan_std
from .objectives.grpo_step import (
    Generate,
    Sampling,
    engine_rollouts,
    grpo_micro_loss,
    rollout_batch,
    sample,
    stop_ids,
)
from .objectives.kto import kto_loss
from .objectives.rewards import RewardFunction, load_reward
from .objectives.rollout_server import RolloutServer, RolloutServerError, adapter_name
from .objectives.step import collate_pairs, load_reference_adapter, preference_loss
from .optimizer import build_optimizer, parameter_groups
from .packed_attention import check_packed_attention
from .run_log import RunLog, check_tensorboard, read_history

RANK_SEED_STRIDE = 1_000_003  # rank k draws its dropout masks from seed + k · stride


# -- the pieces of a run ------------------------------------------------------------------------


def describe_start(config: TrainConfig, model: nn.Module, datasets: Datasets, world, trainable):
    """What a run is about to do, in four lines: the model where it runs, the data kept
    and the steps it makes, the share of its tokens the loss counts (and what packing
    does to it), the parameters that train."""
    examples = datasets.examples
    dtype = next(model.parameters()).dtype
    autocast = ", bf16 autocast" if config.bf16 else ""
    kept, given = len(datasets.train), len(examples.train)
    dropped = f" ({given - kept} dropped: beyond --max-length)" if kept < given else ""
    tokens = sum(len(item) for item in datasets.train)
    per_step = config.batch_size * config.batches_per_step
    per_epoch = config.steps_per_epoch(len(datasets.rows))
    unit = "rows" if config.packing else "examples"
    quantized = model_state(model).base_quantization
    packed = "" if quantized is None else f"; {quantized['summary']}"
    base = f"; frozen base {trainable.frozen_bytes / 1e6:,.0f} MB{packed}"
    return (
        f"model {config.model} on {world.device}, {str(dtype).removeprefix('torch.')}"
        f"{autocast}{base}\n"
        f"data: {kept} training examples{dropped}, {len(datasets.validation)} validation; "
        f"{tokens:,} tokens; {per_epoch} steps per epoch of {per_step} {unit}; "
        f"{config.max_steps} steps ≈ {config.max_steps / per_epoch:.1f} epochs\n"
        f"{describe_fill(config, datasets)}\n"
        f"trainable: {trainable.trainable:,} of {trainable.total:,} parameters "
        f"({100 * trainable.share:.2f}%)"
    )


def describe_fill(config: TrainConfig, datasets: Datasets) -> str:
    """The share of the tokens a step computes that the loss counts, over one epoch's
    batches, with packing and without (what packing gains on this data)."""
    if config.model_kind != "causal-lm":
        return "fill: a classifier's loss counts one label an example"
    if config.grpo:
        return (
            f"objective grpo: {len(datasets.train)} prompts, {config.num_generations} "
            f"completions each of up to {config.max_new_tokens} tokens a step's prompt, "
            f"rewarded by {config.reward or f'the {config.task} task'}"
        )
    if config.objective != "sft":
        learnt = sum(map(_learnt, datasets.train))
        computed = sum(len(item) for item in datasets.train)
        unit = "completions" if config.objective == "kto" else "pairs"
        return (
            f"objective {config.objective}: {len(datasets.train)} {unit}, "
            f"{100 * learnt / max(computed, 1):.1f}% of their tokens are the replies compared"
        )
    plain, packed = fills(datasets.train, config.max_length, config.batch_size, config.seed)
    if not config.packing:
        return (
            f"fill: {100 * plain:.1f}% of the tokens computed carry loss "
            f"({100 * packed:.1f}% with --packing)"
        )
    return (
        f"packing: {len(datasets.train)} examples in {len(datasets.rows)} rows of up to "
        f"{config.max_length} tokens; fill {100 * packed:.1f}% of the tokens computed carry "
        f"loss ({100 * plain:.1f}% without packing)"
    )


def _lengths(items: list) -> list[int]:
    return [len(item) for item in items]


def prepare_model(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Apply the run's method (LoRA by default) with its settings; a classifier's new head
    always trains in full."""
    method = config.method_object
    settings = config.method_settings()
    lora = config.lora_config() if method.uses_lora else None
    method.check(model, settings, lora, config.max_length)
    torch.manual_seed(config.seed)  # the method's init is part of what the seed fixes
    method.apply(model, settings, lora)
    return model


def batch_loss(
    runner: nn.Module, model: nn.Module, batch: dict, config: TrainConfig, world: World
) -> torch.Tensor:
    """The batch's mean loss, with the head and loss on counted positions where they can be
    (not under FSDP, whose output head is sharded outside the forward)."""
    batch = {**batch, **without_cache(model)}
    if config.chunked_loss and not (world.active and config.fsdp):
        return causal_lm_loss(runner, model, batch)
    return runner(**batch).loss


def without_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for a model that would otherwise build a KV cache in every
    training forward: nothing reads it, and on SmolLM2 (8 × 64 tokens) a step took 1.2×
    as long with it (as the Transformers Trainer knows: it turns the cache off)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return {}
    parameters = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in parameters else {}


@torch.no_grad()
def validation_loss(
    model: nn.Module, data: list, batch_size: int, pad_id: int, world: World | None = None
) -> float:
    """Mean loss per counted token (causal LM) or per example (classifier).

    Under torchrun each rank scores its rows of every batch and the sums are added up."""
    world = world or World()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        items, share = rows_of_rank(world, data[start : start + batch_size])
        batch = to_device(collate(items, pad_id), world.device)
        loss = model(**batch, **without_cache(model)).loss.item()
        labels = batch["labels"]
        weight = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.numel()
        weight = weight if share else 0  # a rank left without rows ran a stand-in row
        total += loss * weight
        count += weight
    total, count = sum_over_ranks(world, [total, count])
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def objective_validation_loss(
    model: nn.Module, data: list, pad_id: int, config: TrainConfig, world: World
) -> float:
    """A preference objective's loss on the validation pairs (or KTO's examples), the mean
    over them, each batch's loss weighted by its size."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(data), config.batch_size):
        items = data[start : start + config.batch_size]
        loss, _ = _micro_loss(model, model, items, pad_id, config, world)
        total += loss.item() * len(items)
    model.train(was_training)
    return total / max(len(data), 1)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass, non-reentrant: a frozen base needs no
    inputs that require grad, and DDP and FSDP see each parameter's gradient once."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient_checkpointing: {type(model).__name__} does not support it; "
            "Transformers models with transformer blocks do"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # Transformers ≥ 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    """The trained model (with ``fsdp``, still sharded: its parameters are DTensors)."""
    tokenizer: Any = None
    datasets: Datasets | None = None
    rank: int = 0
    """This process's rank under torchrun; only rank 0 wrote the files."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run; a checkpoint was written first."""


def train(config: TrainConfig, model=None, tokenizer=None, data: Any = None) -> TrainResult:
    """Run training as ``config`` says. ``model``/``tokenizer`` skip loading (library use);
    ``data`` is the training data in memory instead of ``config.data``: a
    ``datasets.Dataset``, a ``DatasetDict`` (its ``data_split`` trains, its validation
    split validates) or a sequence of records. The run keeps a JSONL copy of the records
    it used, which its ``config.yaml`` names, so that it resumes from the files alone.

    Started by torchrun, every rank runs this: the world is checked before any process
    waits on another, and a process group this call created is left at the end."""
    world = world_from_environment(config.batch_size, config.fsdp, config.device)
    if config.bf16 and world.device.type == "cpu" and not cpu_has_bf16_kernels():
        warnings.warn(
            "--bf16 on a CPU without bf16 matrix instructions (AVX512-BF16 or AMX): the "
            "products are emulated, and a SmolLM2 step took 20-30x as long as in fp32 on "
            "such a CPU; leave --bf16 off here",
            stacklevel=2,
        )
    if data is not None and config.data is not None:
        raise ConfigError(
            f"the data is given twice: config.data ({config.data}) and train(data=...); give one"
        )
    if world.active and config.objective != "sft":
        raise ConfigError(
            f"objective={config.objective!r} trains in one process; torchrun runs "
            "supervised fine-tuning (objective sft) only, for now"
        )
    join(world)
    last_complete = f"the last complete checkpoint stays in {Path(config.output_dir) / CHECKPOINT}"
    try:
        with peers_checked(world, last_complete), contextlib.ExitStack() as cleanup:
            return _train(config, model, tokenizer, world, cleanup, data)
    finally:
        leave(world)


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has native bf16 matrix products on this CPU (True when unknown)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: do not guess
        return True


@dataclass
class _Run:
    """Everything one rank's run holds between its steps."""

    config: TrainConfig  # with max_steps counted where epochs gave the length
    given: TrainConfig  # as given: what config.yaml and the checkpoints record
    world: World
    run_dir: Path
    model: nn.Module
    tokenizer: Any
    method: Method
    datasets: Datasets
    runner: nn.Module  # what runs forward: the model, or DDP's wrapper
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: Iterator[list[int]]
    log: RunLog
    step: int
    pad_id: int
    trainable: ParameterReport
    reward: RewardFunction | None = None  # GRPO's, with how it samples
    sampling: Sampling | None = None
    generate: Generate = engine_rollouts  # or a rollout server
    reward_failures: set[str] = dataclasses.field(default_factory=set)  # said once each


def _train(
    config: TrainConfig, model, tokenizer, world: World, cleanup: contextlib.ExitStack, data
) -> TrainResult:
    """The run on this rank: set up, then steps (each followed by the evaluation and the
    checkpoint that fall due), then the finished adapter. ``cleanup`` keeps what the run
    needs until it ends (a copy of the checkpoint that rank 0 sent)."""
    run = _set_up(config, model, tokenizer, world, cleanup, data)
    config = run.config  # with its steps counted, where epochs gave them
    started = time.perf_counter()
    # Under a launcher a repeated signal is the launcher tearing down, not a user in a
    # hurry: the step still finishes, and the launcher's SIGKILL is the hard stop.
    at_once = (
        f"stopped at once by a second signal, in step {{step}}; the last complete checkpoint, "
        f"if any, is in {run.run_dir / CHECKPOINT} (continue with: loralab train --resume "
        f"{run.run_dir})"
    )
    with _interruptible(not world.active, world.is_main, at_once, lambda: run.step + 1) as stop:
        while run.step < config.max_steps:
            try:
                stopping = _train_step(run, stop)
            except RolloutServerError as error:  # before the step changed anything
                raise RolloutServerError(f"{error}; {_saved_for_resume(run)}") from None
            if not stopping or run.step == config.max_steps:  # a stop does not wait for it
                _evaluate_if_due(run)
            # A signal lets the step in flight finish, so the state saved is exactly the
            # one an uninterrupted run has between two steps.
            due_save = config.save_every and run.step % config.save_every == 0
            if (due_save or stopping) and run.step < config.max_steps:
                _save_checkpoint(run)
            if stopping and run.step < config.max_steps:
                run.log.close()
                raise TrainingInterrupted(
                    f"interrupted at step {run.step} of {config.max_steps}; a checkpoint is "
                    f"in {run.run_dir / CHECKPOINT}; continue with: loralab train --resume "
                    f"{run.run_dir}"
                )
    return _finish(run, started)


def _saved_for_resume(run: _Run) -> str:
    """A checkpoint of the steps done (where there are any), and how to continue."""
    if run.step == 0:
        return "no step was taken"
    _save_checkpoint(run)
    return (
        f"a checkpoint of step {run.step} is in {run.run_dir / CHECKPOINT}; continue with: "
        f"loralab train --resume {run.run_dir}"
    )


def _set_up(
    config: TrainConfig, model, tokenizer, world: World, cleanup: contextlib.ExitStack, data
) -> _Run:
    """Everything checked first (paths, the checkpoint to resume, TensorBoard, the data),
    then the model with the method applied (or the checkpoint's adapter), the optimizer,
    and the data stream at the run's position."""
    run_dir = Path(config.output_dir)
    if world.is_main:  # only rank 0 writes there
        check_output_dir(run_dir, "output_dir")
    checkpoint = saved = None
    if config.resume:
        found = from_main(world, lambda: _resumable_checkpoint(run_dir, config))
        # Only rank 0 reads the run directory; it sends the checkpoint to the others.
        checkpoint = cleanup.enter_context(shared_directory(world, found))
        saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    check_tensorboard(config.tensorboard)
    examples = load_examples(config, data)  # bad data fails before the model is loaded
    reward = _grpo_reward(config) if config.grpo else None  # so does a bad reward
    server = _rollout_server(config, run_dir)  # and a server that does not answer
    model, tokenizer = _adapted_model(config, model, tokenizer, examples, checkpoint, world)
    if server is not None:
        server.vocab_size = model.get_input_embeddings().num_embeddings
        cleanup.callback(server.close)
    # After the method: a prefix method's special tokens are part of every example.
    datasets = encode_examples(config, examples, tokenizer, prompt_tokens(model))
    if world.is_main:  # the settings as given: a resume counts the same epochs again
        run_dir.mkdir(parents=True, exist_ok=True)
        if data is not None:  # the files name the records, as they would have been given
            config = with_data_copy(config, run_dir, examples)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    given, config = config, config.with_steps(len(datasets.rows))
    trainable = trainable_parameters(model)
    if config.return_freed_memory:
        map_large_blocks()
    if config.lean_mlp:
        cleanup.enter_context(lean_mlp(model))  # the model's own forward again at the end
    if config.packing:
        check_packed_attention(model, without_cache(model))
    sampling = _grpo_sampling(config, tokenizer) if config.grpo else None
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    runner = _distribute(model, config, world)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, step = _optimizer_at(
        config, world, parameter_groups(model, config, parameters), saved
    )
    if world.is_main and config.progress:  # before the progress bar: what will run
        start = describe_start(config, model, datasets, world, trainable)
        print("\n".join(f"loralab train: {line}" for line in start.splitlines()), file=sys.stderr)
    log = RunLog(
        run_dir,
        from_main(world, lambda: read_history(run_dir, up_to=step)),
        step,
        config.max_steps,
        writes=world.is_main,
        tensorboard=config.tensorboard,
        progress=config.progress,
    )
    lengths = _lengths(datasets.rows)
    consumed = step * config.batches_per_step  # the data order is fixed by the seed
    runner.train()
    return _Run(
        config=config,
        given=given,
        world=world,
        run_dir=run_dir,
        model=model,
        tokenizer=tokenizer,
        method=given.method_object,  # the one applied to the model
        datasets=datasets,
        runner=runner,
        parameters=parameters,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=batch_stream(lengths, config.batch_size, config.seed, start=consumed),
        log=log,
        step=step,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        trainable=trainable,
        reward=reward,
        sampling=sampling,
        generate=server or engine_rollouts,
    )


def _grpo_reward(config: TrainConfig) -> RewardFunction:
    """GRPO's reward: the task's, or the user's function (loaded before the model)."""
    return load_reward(config.reward, config.task if config.data is None else None)[1]


def _rollout_server(config: TrainConfig, run_dir: Path) -> RolloutServer | None:
    """GRPO's rollout server, if the run has one, answering (before the model loads)."""
    if not config.grpo or config.rollout_server is None:
        return None
    directory = Path(config.rollout_dir or run_dir / "rollout-adapter")
    server = RolloutServer(config.rollout_server, directory, adapter_name(run_dir))
    server.check()
    return server


def _check_engine_runs(model: nn.Module) -> None:
    """GRPO samples through the engine: a model it cannot run is refused before the
    method touches it."""
    from ..engine import supported_reason

    reason = supported_reason(model)
    if reason is not None:
        raise ConfigError(f"objective grpo samples through loralab's engine: {reason}")


def _grpo_sampling(config: TrainConfig, tokenizer) -> Sampling:
    """How GRPO samples: G completions a prompt, ending at the end of sequence (and at a
    newline for the built-in tasks, which answer in one line)."""
    one_line = config.data is None
    return Sampling(
        group_size=config.num_generations,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        stop_ids=stop_ids(tokenizer, one_line),
    )


def _adapted_model(
    config: TrainConfig, model, tokenizer, examples: Examples, checkpoint, world: World
):
    """The model (loaded unless given) with the run's method applied, or with the
    checkpoint's adapter when resuming."""
    if model is None:
        from ..models.loading import load_model

        labels = {"num_labels": len(examples.label_names)} if examples.label_names else {}
        # A classifier's new head is drawn while the model loads: the seed fixes it too
        # (PyTorch seeds itself at random in every new process).
        torch.manual_seed(config.seed)
        dtype = base_dtype(config.dtype, "dtype")
        model, tokenizer = load_model(
            config.model,
            kind=config.model_kind,
            dtype=dtype,
            quantized_base=config.quantized_base,
            device=world.device,  # where bitsandbytes quantizes
            **labels,
        )
    if config.grpo and config.rollout_server is None:
        _check_engine_runs(model)
    if checkpoint is not None:
        load_method(model, checkpoint / "adapter")
    elif config.start_adapter is not None:
        _load_start_adapter(config, model)
    else:
        prepare_model(config, model)
    referred = config.uses_reference and config.reference == "start"
    if referred and config.start_adapter is not None:  # the adapter as it started
        load_reference_adapter(model, config.start_adapter)
    return model, tokenizer


def _load_start_adapter(config: TrainConfig, model: nn.Module) -> None:
    """The trained adapter the run continues (its method must be the run's)."""
    from ..methods.method_files import read_method_description

    description = read_method_description(Path(config.start_adapter))
    if description["method"] != config.method:
        raise ConfigError(
            f"start_adapter {config.start_adapter} holds a {description['method']!r} adapter; "
            f"this run's method is {config.method!r}: give --method {description['method']}"
        )
    load_method(model, config.start_adapter)


def _optimizer_at(config: TrainConfig, world: World, parameters: list, saved: dict | None):
    """AdamW and the schedule, at step 0 or where the checkpoint ``saved`` left them (with
    the random number generators where they were)."""
    optimizer, scheduler = build_optimizer(config, parameters)
    if saved is None:
        torch.manual_seed(config.seed + RANK_SEED_STRIDE * world.rank)
        random.seed(config.seed)
        return optimizer, scheduler, 0
    optimizer_state = saved["optimizer"]
    if world.active and config.fsdp:
        optimizer_state = shard_optimizer_state(optimizer_state, parameters)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])
    step = saved["step"]
    _restore_rng(saved, config, world, step)
    random.setstate(_as_python_state(saved["rng_python"]))
    return optimizer, scheduler, step


def _train_step(run: _Run, stop: _StopFlag) -> bool:
    """One optimizer step, the method's after-step hook, and its log entry; whether any
    rank was asked to stop (so that all stop after the same step)."""
    config, world = run.config, run.world
    started = time.perf_counter()
    if config.grpo:
        loss_value, tokens, learnt, metrics = _grpo_optimizer_step(run)
    else:
        loss_value, tokens, learnt, metrics = _optimizer_step(
            run.model,
            run.optimizer,
            run.parameters,
            run.stream,
            run.datasets.rows,
            run.pad_id,
            config,
            run.method,
            world=world,
            runner=run.runner,
        )
    # One collective a step: the loss of the whole batch, and the stop requests.
    loss_value, stopping = sum_over_ranks(world, [loss_value, stop.requested])
    run.scheduler.step()
    run.step += 1
    if run.method.after_optimizer_step is not None:
        run.method.after_optimizer_step(run.model, run.step, config.max_steps)
    seconds = time.perf_counter() - started
    entry = {
        "step": run.step,
        "loss": loss_value,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": tokens / seconds,
        "loss_tokens_per_s": learnt / seconds,  # the tokens the loss counts
        "seconds": seconds,
        **metrics,  # a preference objective's rewards and log-probabilities
    }
    run.log.step(entry, run.step % config.log_every == 0 or run.step == config.max_steps)
    return bool(stopping)


def _evaluate_if_due(run: _Run) -> None:
    """The validation loss every ``eval_every`` steps and after the last one."""
    config = run.config
    due = config.eval_every and run.step % config.eval_every == 0
    if not run.datasets.validation or not (due or run.step == config.max_steps):
        return
    if config.grpo:  # its log has each step's reward instead
        return
    if config.objective == "sft":
        value = validation_loss(
            run.model, run.datasets.validation, config.batch_size, run.pad_id, run.world
        )
    else:
        value = objective_validation_loss(
            run.model, run.datasets.validation, run.pad_id, config, run.world
        )
    if run.world.active and config.fsdp:  # after a forward with no backward,
        run.model.reshard()  # FSDP keeps the root (embeddings, head) gathered
    run.log.validation(run.step, value)


def _finish(run: _Run, started: float) -> TrainResult:
    """The adapter, the method's report and the loss curve (rank 0), and the result;
    ``started`` is when the steps began (the time reported includes the saving)."""
    run.log.close()
    adapter_dir = run.run_dir / "adapter"
    with _whole_trainable_parameters(run.model, run.config, run.world):
        if run.world.is_main:
            from ..models.embedded import hub_id

            # the base's Hub id, which PEFT and vLLM resolve; config.yaml keeps the alias
            base = hub_id(run.config.model)
            save_method(run.model, adapter_dir, base_model_name_or_path=base)
            if run.method.write_report is not None:
                run.method.write_report(run.model, run.run_dir)
            run.log.plot(run.run_dir / "loss.png")
    barrier(run.world)  # the others return once the adapter is complete
    run.model.eval()
    return TrainResult(
        run_dir=run.run_dir,
        adapter_dir=adapter_dir,
        steps=run.step,
        losses=run.log.losses,
        validation=run.log.validation_losses,
        seconds=time.perf_counter() - started,
        trainable=run.trainable.trainable,
        total=run.trainable.total,
        model=run.model,
        tokenizer=run.tokenizer,
        datasets=run.datasets,
        rank=run.world.rank,
    )


def _resumable_checkpoint(run_dir: Path, config: TrainConfig) -> Path:
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    check_resumable(saved["config"], config, checkpoint)
    return checkpoint


def _distribute(model: nn.Module, config: TrainConfig, world: World) -> nn.Module:
    """The model each rank runs forward: itself alone, DDP's wrapper, or sharded by FSDP."""
    place(model, world.device)
    if not world.active:
        return model
    return shard_fsdp(model, world) if config.fsdp else wrap_ddp(model, world)


def _whole_trainable_parameters(model: nn.Module, config: TrainConfig, world: World):
    """With FSDP, the trained parameters gathered whole for saving (every rank enters)."""
    if world.active and config.fsdp:
        return full_trainable_parameters(model)
    return contextlib.nullcontext()


def _save_checkpoint(run: _Run) -> None:
    """Rank 0 writes (atomically, ``checkpoint.py``) what every rank's state gathers to;
    the others wait until it is complete. A rank that fails leaves the last one intact."""
    args = (run.run_dir, run.model, run.optimizer, run.scheduler, run.step, run.given)
    if not run.world.active:
        save_checkpoint(*args)
        return
    optimizer_state = full_optimizer_state(run.optimizer)  # FSDP: gathered on every rank
    generators = gather_objects(run.world, rng_state(run.world))  # each rank's dropout
    with _whole_trainable_parameters(run.model, run.config, run.world):
        if run.world.is_main:
            save_checkpoint(*args, optimizer_state=optimizer_state, extra={"rng_ranks": generators})
    barrier(run.world)


def _restore_rng(saved: dict, config: TrainConfig, world: World, step: int) -> None:
    ranks = saved.get("rng_ranks")
    if world.active and ranks and len(ranks) == world.size:
        set_rng_state(world, ranks[world.rank])
        return
    torch.set_rng_state(saved["rng_torch"])
    if world.rank:  # resumed at another world size: a fresh dropout stream for this rank
        torch.manual_seed(config.seed + RANK_SEED_STRIDE * world.rank + step)


def _optimizer_step(
    model, optimizer, parameters, stream, data, pad_id, config, method=None, world=None, runner=None
) -> tuple[float, int, int, dict[str, float]]:
    """Forward and backward over the micro-batches of one step, then the update; the
    loss, the tokens of the batch, the tokens its loss counts, and a preference
    objective's metrics (means over the micro-batches).

    The reported loss is the task's; a method's regulariser (AdaLoRA) is added to what is
    differentiated, not to what is logged. Under torchrun each rank runs its rows of every
    micro-batch through ``runner`` (DDP's wrapper), weighted by its share of the counted
    tokens, so the averaged gradient is the single-process one (``distributed.py``)."""
    world = world or World()
    runner = runner or model
    regularizer = method.regularizer if method is not None else None
    optimizer.zero_grad(set_to_none=True)
    total_loss, tokens, learnt, metrics, reports = 0.0, 0, 0, {}, {}
    for index in range(config.gradient_accumulation):
        items = [data[i] for i in next(stream)]
        rows, share = rows_of_rank(world, items)
        last = index == config.gradient_accumulation - 1
        with gradient_sync(world, runner, last):
            with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss, measured = _micro_loss(runner, model, rows, pad_id, config, world)
                loss = loss / config.gradient_accumulation
            for key, value in measured.items():  # KTO's: only where a batch has that kind
                metrics[key] = metrics.get(key, 0.0) + value
                reports[key] = reports.get(key, 0) + 1
            extra = regularizer(model) if regularizer else None
            # DDP and FSDP average over ranks: W · share makes that average the batch's mean.
            differentiated = loss * (world.size * share) if world.active else loss
            if extra is not None:
                differentiated = differentiated + extra / config.gradient_accumulation
            differentiated.backward()
        total_loss += loss.item() * share
        tokens += sum(len(item) for item in items)  # the whole batch's, not the rank's
        learnt += sum(map(_learnt, items))
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    return total_loss, tokens, learnt, {k: v / reports[k] for k, v in metrics.items()}


def _micro_loss(
    runner, model: nn.Module, rows: list, pad_id: int, config: TrainConfig, world: World
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's loss as the run's objective defines it, and its metrics."""
    if config.objective == "kto":
        return kto_loss(
            runner,
            model,
            rows,
            pad_id,
            config.kto_settings(),
            config.max_length,
            world.device,
            without_cache(model),
        )
    objective = config.objective_object
    if objective is None:  # supervised fine-tuning
        batch = to_device(collate(rows, pad_id), world.device)
        return batch_loss(runner, model, batch, config, world), {}
    batch = to_device(collate_pairs(rows, pad_id), world.device)
    settings = config.preference_settings()
    return preference_loss(runner, model, batch, objective, settings, without_cache(model))


def _learnt(item) -> int:
    """The tokens the loss reads in one item: an example's counted ones, both replies of
    a pair, a KTO example's completion."""
    if isinstance(item, EncodedPair):
        return pair_counted(item)
    if isinstance(item, EncodedCompletion):
        return len(item.completion)
    return counted(item)


def _grpo_optimizer_step(run: _Run) -> tuple[float, int, int, dict[str, float]]:
    """Sample the step's completions, then one update on their clipped surrogate, the
    completions split into ``gradient_accumulation`` micro-batches (``grpo_step.py``)."""
    config, model = run.config, run.model
    prompts = [run.datasets.rows[i] for i in next(run.stream)]
    rollouts = sample(
        model,
        run.tokenizer,
        prompts,
        run.sampling,
        config.seed,
        run.step,
        run.reward,
        config.scale_rewards,
        run.reward_failures,
        run.generate,
    )
    settings = config.grpo_settings()
    count = len(rollouts.completions)
    parts = min(config.gradient_accumulation, count)
    chunks = [list(range(count))[i::parts] for i in range(parts)]
    run.optimizer.zero_grad(set_to_none=True)
    total, measured = 0.0, {}
    for chunk in chunks:
        batch = to_device(rollout_batch(rollouts, chunk, run.pad_id), run.world.device)
        advantages = rollouts.advantages[chunk].to(run.world.device)
        with torch.autocast(run.world.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, figures = grpo_micro_loss(
                run.runner,
                model,
                batch,
                advantages,
                settings,
                rollouts.sampled_tokens,
                without_cache(model),
                config.temperature,
            )
        if settings.loss_type != "dapo":  # dapo divides by the whole step's tokens already
            loss = loss * (len(chunk) / count)  # a chunk's mean, weighted by its rows
        loss.backward()
        total += loss.item()
        for key, value in figures.items():
            measured[key] = measured.get(key, 0.0) + value * (len(chunk) / count)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.parameters, config.max_grad_norm)
    run.optimizer.step()
    rewards = rollouts.rewards
    groups = rewards.view(-1, config.num_generations)
    metrics = {
        "reward": float(torch.nanmean(rewards)),
        "reward_std": float(nan_std(rewards)),
        "rewards/skipped": int(rewards.isnan().sum()),
        "frac_reward_zero_std": float((nan_std(groups, dim=1).nan_to_num(0.0) == 0).float().mean()),
        "completion_length": rollouts.sampled_tokens / count,
        "rollout_tokens_per_s": rollouts.sampled_tokens / rollouts.seconds,
        "rollout_seconds": rollouts.seconds,
        **measured,
    }
    if isinstance(run.generate, RolloutServer):  # of rollout_seconds: writing and loading
        metrics["rollout_sync_seconds"] = run.generate.sync_seconds
    tokens = sum(len(p) for p in rollouts.prompts) + rollouts.sampled_tokens
    return total, tokens, rollouts.sampled_tokens, metrics


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _interruptible(
    escalate: bool = True,
    announce: bool = True,
    at_once: str = "stopped at once, in step {step}",
    step: Callable[[], int] = lambda: 0,
):
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step, said at
    once; with ``escalate``, a second one stops at once, in one line (``at_once``)."""
    flag = _StopFlag()

    def request(signum, frame):
        if flag.requested and escalate:  # a second Ctrl-C: stop at once
            raise TrainingInterrupted(at_once.replace("{step}", str(step())))
        flag.requested = True
        if announce:
            again = "; Ctrl-C again stops at once" if escalate else ""
            print(
                f"\nloralab: {signal.Signals(signum).name}: stopping after this step, with a "
                f"checkpoint{again}",
                file=sys.stderr,
                flush=True,
            )

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


__all__ = ["DataError", "TrainConfig", "TrainResult", "TrainingInterrupted", "train"]
