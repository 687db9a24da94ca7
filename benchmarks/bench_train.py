"""Training speed and memory, and inference and adapter-management times: loralab against
PEFT (a ``PeftModel`` in a plain PyTorch loop, and in the Transformers ``Trainer``).

Equal settings on every side: the same model (loaded by ``loralab.models.loading.load_model``),
the same examples in the same batches with the same padding (loralab's ``e2e`` task,
``max_length`` 64, batches of 8 grouped by length, drawn by loralab's seeded stream and
collated by ``loralab.data.records.collate`` for every side), fp32, LoRA r = 8, α = 16 on W_q and
W_v with dropout 0.05, AdamW (lr 2e-4, weight decay 0.01, constant), gradient clipping at
1.0, and the same gradient-checkpointing choice. loralab trains through ``loralab.training.loop``
(what ``loralab train`` runs), and its per-step times are read from the run's
``metrics.jsonl``; the PEFT loop times the same four calls around each step
(forward, backward, clip, ``optimizer.step``), and the Trainer its own steps through a
callback. Tokens per second count the batch's real (unpadded) tokens on every side.

Besides the equal-settings cases: loralab as it was before its memory changes (the gated
MLP that keeps two tensors, glibc's mmap threshold; ``TrainConfig.lean_mlp`` and
``return_freed_memory`` off), so that a change is judged against it in the same run, and
with ``return_freed_memory`` on its own; full fine-tuning against LoRA, on SmolLM2 and on
a 360M-parameter Llama (SmolLM2-360M's shape, random weights); ``torch.profiler`` over a
few steps of each side, which says what share of a step the frozen base's matrix products
take (the work no library can skip) and which operators make the rest; and the memory
floor, what a step must hold whatever the library or the allocator does: the model with
every weight read, and the activations each side keeps for the backward pass.

Every measurement runs in a process of its own (this script with ``--worker``), the sides
alternating and the order flipped every round; the figures are medians over rounds (and,
inside a process, over the timed steps after warm-up). Peak memory is the process's peak
RSS, model loading included (the same on every side).

    python benchmarks/bench_train.py            # 3 rounds (~51 min on 2 cores)
    python benchmarks/bench_train.py --quick    # 1 round, fewer steps (~11 min)
    python benchmarks/bench_train.py --write    # also writes benchmarks/RESULTS.md
    python benchmarks/bench_train.py --packing  # packing against none and TRL's (bench_packing.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import (
    command_line,
    interleaved,
    load_average,
    machine_line,
    median,
    now,
    peak_rss_mb,
    result_line,
    run_worker,
    status_mb,
    timed,
)

MODEL = "smollm2-135m"
RESULTS = Path(__file__).with_name("RESULTS.md")
TRAIN_SETTINGS = {
    "task": "e2e",
    "train_size": 512,
    "validation_size": 0,
    "max_length": 64,
    "batch_size": 8,
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q", "v"],
    "learning_rate": 2e-4,
    "weight_decay": 0.01,
    "schedule": "constant",
    "warmup_steps": 0,
    "max_grad_norm": 1.0,
    "seed": 0,
    "eval_every": 0,
    "save_every": 0,
    "progress": False,
}
PEFT_TARGETS = ["q_proj", "v_proj"]  # what "q" and "v" resolve to on a Llama
INFER_SHAPES = ((1, 128), (16, 128))
TRAIN_SIDES = ("loralab", "peft", "peft-trainer")
SIDES = ("loralab", "peft")

# The training cases: the model, gradient checkpointing, (warm-up steps, timed steps) for
# the full run and --quick, the sides that run it, loralab settings that differ from
# TRAIN_SETTINGS, and the case whose PEFT figures a loralab-only case is divided by.
BEFORE_19 = {"lean_mlp": False, "return_freed_memory": False}  # loralab as it was before
FULL = {"method": "full"}
TRAIN_CASES = {
    "smollm2": {"model": MODEL, "steps": ((2, 8), (1, 3)), "sides": TRAIN_SIDES},
    "smollm2, loralab as before (no lean MLP, glibc's own mmap threshold)": {
        "model": MODEL,
        "steps": ((2, 8), (1, 3)),
        "sides": ("loralab",),
        "loralab": BEFORE_19,
        "against": "smollm2",
    },
    "smollm2, loralab returning freed memory (--return-freed-memory)": {
        "model": MODEL,
        "steps": ((2, 8), (1, 3)),
        "sides": ("loralab",),
        "loralab": {"return_freed_memory": True},
        "against": "smollm2",
    },
    "smollm2, loralab without the chunked loss": {
        "model": MODEL,
        "steps": ((2, 8), (1, 3)),
        "sides": ("loralab",),
        "loralab": {"chunked_loss": False},
        "against": "smollm2",
    },
    "smollm2, gradient checkpointing": {
        "model": MODEL,
        "checkpointing": True,
        "steps": ((2, 8), (1, 3)),
        "sides": SIDES,
    },
    "smollm2, loralab as before, gradient checkpointing": {
        "model": MODEL,
        "checkpointing": True,
        "steps": ((2, 8), (1, 3)),
        "sides": ("loralab",),
        "loralab": BEFORE_19,
        "against": "smollm2, gradient checkpointing",
    },
    "smollm2, full fine-tuning": {
        "model": MODEL,
        "steps": ((2, 6), (1, 2)),
        "sides": ("loralab",),
        "loralab": FULL,
        "against": "smollm2",
    },
    "360M Llama": {"model": "llama-360m", "steps": ((1, 4), (1, 2)), "sides": SIDES},
    "360M Llama, full fine-tuning": {
        "model": "llama-360m",
        "steps": ((1, 4), (1, 2)),
        "sides": ("loralab",),
        "loralab": FULL,
        "against": "360M Llama",
    },
    "tiny Llama": {"model": "tiny", "steps": ((5, 40), (5, 20)), "sides": TRAIN_SIDES},
}
# Written by the driver with random weights (``write_random_llama``): the shapes matter for
# speed and memory, not the values. "llama-360m" is SmolLM2-360M's shape (32 blocks of
# width 960, 15 heads over 5 key-value heads, 362M parameters).
LOCAL_MODELS = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
    "llama-360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
}


# -- the random Llamas and the adapter files, written once by the driver ----------------------


def write_random_llama(directory: Path, shape: dict) -> None:
    """A Llama of ``shape`` with random weights and SmolLM2's tokenizer (so it reads the
    same e2e batches)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.models.loading import load_model

    _, tokenizer = load_model(MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_adapters(directory: Path) -> None:
    """Two PEFT adapters (``a0``, ``a1``) on W_q, W_v with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    from loralab.models.loading import load_model

    base, _ = load_model(MODEL)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=PEFT_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    factors = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    generator = torch.Generator().manual_seed(0)
    for name in ("a0", "a1"):
        with torch.no_grad():
            for parameter in factors:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(directory / name)


# -- training ---------------------------------------------------------------------------------


def train_config(model: str, steps: int, checkpointing: bool, output_dir: Path, **extra):
    from loralab.training.config import TrainConfig

    return TrainConfig(
        model=model,
        output_dir=str(output_dir),
        max_steps=steps,
        gradient_checkpointing=checkpointing,
        **{**TRAIN_SETTINGS, **extra},
    )


def batches(config, tokenizer):
    """The run's batches, exactly as ``loralab.training.loop`` draws and pads them."""
    from loralab.data.batches import batch_stream, collate
    from loralab.training.examples import encode_examples, load_examples

    data = encode_examples(config, load_examples(config), tokenizer).train
    stream = batch_stream([len(item) for item in data], config.batch_size, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _ in range(config.max_steps):
        items = [data[i] for i in next(stream)]
        yield collate(items, pad_id), sum(len(item) for item in items)


def train_loralab(config) -> tuple[list[float], list[int], list[float]]:
    from loralab.training.loop import train

    train(config)
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    entries = [e for e in map(json.loads, lines) if "loss" in e]
    tokens = [round(e["tokens_per_s"] * e["seconds"]) for e in entries]
    return [e["seconds"] for e in entries], tokens, [e["loss"] for e in entries]


def train_loralab_stepwise(config, after_step, model=None, tokenizer=None) -> None:
    """``loralab.training.loop`` with ``after_step(seconds)`` called after each of its steps (the
    loop's own step, wrapped from outside, as the PEFT loop's ``after_step``)."""
    import loralab.training.loop as loralab_train

    step = loralab_train._train_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        stopping = step(*args, **kwargs)
        after_step(time.perf_counter() - start)
        return stopping

    loralab_train._train_step = timed_step
    try:
        loralab_train.train(config, model, tokenizer)
    finally:
        loralab_train._train_step = step


def peft_model_for(config):
    from peft import LoraConfig, get_peft_model

    from loralab.models.loading import load_model

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=PEFT_TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return model, tokenizer


def train_peft_loop(
    config, after_step=None, model_and_tokenizer=None
) -> tuple[list[float], list[int], list[float]]:
    """A ``PeftModel`` (``peft_model_for``'s, or the one given) trained in a plain loop."""
    model, tokenizer = model_and_tokenizer or peft_model_for(config)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    seconds, tokens, losses = [], [], []
    for batch, count in batches(config, tokenizer):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # No KV cache, as in loralab's loop and the Trainer (TrainingArguments.use_cache
        # defaults to False): a training forward has no use for one.
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        tokens.append(count)
        losses.append(loss.item())
        if after_step is not None:
            after_step(seconds[-1])
    return seconds, tokens, losses


def train_peft_trainer(config) -> tuple[list[float], list[int], list[float]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = peft_model_for(config)
    prepared = list(batches(config, tokenizer))

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([batch for batch, _ in prepared])

    seconds: list[float] = []
    losses: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    arguments = TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=1,  # one item of Batches is a whole collated batch
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=config.seed,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        callbacks=[StepTimes()],
    )
    trainer.train()
    return seconds, [count for _, count in prepared], losses


def train_worker(side: str, case: str, model: str, quick: bool) -> dict:
    settings = TRAIN_CASES[case]
    warmup, steps = settings["steps"][quick]
    checkpointing = settings.get("checkpointing", False)
    extra = settings.get("loralab", {}) if side == "loralab" else {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        run_dir = Path(scratch) / "run"
        config = train_config(model, warmup + steps, checkpointing, run_dir, **extra)
        run = {"loralab": train_loralab, "peft": train_peft_loop}.get(side, train_peft_trainer)
        seconds, tokens, losses = run(config)
    timed_seconds, timed_tokens = seconds[warmup:], tokens[warmup : len(seconds)]
    return {
        "tokens_per_s": sum(timed_tokens) / sum(timed_seconds),
        "step_seconds": median(timed_seconds),
        "peak_rss_mb": peak_rss_mb(),
        "first_loss": losses[0] if losses else None,
        "threads": torch.get_num_threads(),
    }


# -- where a step's time goes ------------------------------------------------------------------

PROFILE_STEPS = ((2, 3), (1, 1))  # (warm-up, profiled) steps, full run and --quick
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm")
LARGEST_OTHERS = 8  # the operators of "everything else" that the table lists


def time_category(name: str, shapes: list) -> str:
    """Which part of a step an operator's own time belongs to. A matrix product is the
    base's (the forward through a frozen weight, or its input-gradient) unless one of its
    dimensions is the LoRA rank: LoRA's own products all have one."""
    if name in MATRIX_PRODUCTS:
        dims = [d for shape in shapes if shape for d in shape]
        return "LoRA products" if TRAIN_SETTINGS["r"] in dims else "base products"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name == "aten::bernoulli_":
        return "dropout draws"
    return "everything else"


def profile_worker(side: str, quick: bool) -> dict:
    """One side's training steps under ``torch.profiler``: each category's share of the
    profiled steps' wall time (its operators' own CPU time on the training thread; the
    rest of the wall time is "everything else")."""
    from torch.profiler import ProfilerActivity, profile, schedule

    warmup, active = PROFILE_STEPS[quick]
    walls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        config = train_config(MODEL, warmup + active, False, Path(scratch) / "run")
        plan = schedule(wait=0, warmup=warmup, active=active, repeat=1)
        with profile(
            activities=[ProfilerActivity.CPU], record_shapes=True, schedule=plan, acc_events=True
        ) as prof:

            def after_step(seconds: float) -> None:
                walls.append(seconds)
                prof.step()

            if side == "loralab":
                train_loralab_stepwise(config, after_step)
            else:
                train_peft_loop(config, after_step)
        seconds: dict[str, float] = {}
        others: dict[str, float] = {}  # "everything else" by operator
        for event in prof.events():
            category = time_category(event.name, event.input_shapes)
            own = event.self_cpu_time_total / 1e6
            if category != "everything else":
                seconds[category] = seconds.get(category, 0.0) + own
            elif event.name.startswith("aten::"):
                others[event.name] = others.get(event.name, 0.0) + own
    wall = sum(walls[warmup:]) / active
    shares = {category: total / active / wall for category, total in seconds.items()}
    shares["everything else"] = 1 - sum(shares.values())  # Python, elementwise ops, AdamW …
    largest = sorted(others.items(), key=lambda item: -item[1])[:LARGEST_OTHERS]
    return {
        "step_seconds": wall,
        "shares": shares,
        "largest_others": {name: total / active / wall for name, total in largest},
        "aten_others": sum(others.values()) / active / wall,  # the rest: Python, autograd
    }


# -- the memory no library can go below ------------------------------------------------------


def memory_worker(side: str, quick: bool) -> dict:
    """What a step must hold whatever the library: the model in memory with every weight
    read once (a forward without gradients on the longest batch, before any training: the
    same on every side), and the activations each side keeps for the backward pass, the
    most over the run's steps (distinct storages, the weights' own left out)."""
    from loralab.models.loading import load_model

    warmup, steps = TRAIN_CASES["smollm2"]["steps"][quick]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        config = train_config(MODEL, warmup + steps, False, Path(scratch) / "run")
        model, tokenizer = load_model(MODEL)
        longest, _ = max(batches(config, tokenizer), key=lambda b: b[0]["input_ids"].shape[1])
        with torch.no_grad():
            model(input_ids=longest["input_ids"], attention_mask=longest["attention_mask"])
        weights_read = status_mb("VmRSS")
        if weights_read is None:
            raise SystemExit("the memory floor reads VmRSS from /proc/self/status (Linux)")
        if side == "peft":
            del model  # the PEFT loop loads its own copy
        kept: dict[int, int] = {}  # storage -> bytes, this step
        most = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            root = tensor if tensor._base is None else tensor._base  # a weight's transpose
            if not isinstance(root, torch.nn.Parameter):
                storage = tensor.untyped_storage()
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        def after_step(_seconds: float) -> None:
            most[0] = max(most[0], sum(kept.values()))
            kept.clear()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            if side == "loralab":
                train_loralab_stepwise(config, after_step, model, tokenizer)
            else:
                train_peft_loop(config, after_step)
    return {"weights_read_mb": weights_read, "saved_mb": most[0] / 1e6}


# -- inference and adapter management ---------------------------------------------------------


def adapted(side: str, base, directory: Path, name: str = "a0"):
    """``base`` with the adapter in ``directory`` (PEFT's model wraps it; loralab's is it)."""
    if side == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory, adapter_name=name)
    from loralab import load_adapter

    return load_adapter(base, directory, adapter_name=name)


def merged_copy(side: str, bare, directory: Path):
    model = adapted(side, copy.deepcopy(bare), directory)
    if side == "peft":
        return model.merge_and_unload()
    from loralab import merge_and_unload

    return merge_and_unload(model)


def infer_worker(side: str, adapters: Path, quick: bool) -> dict:
    """Forward latency of the bare base, the unmerged adapter and the merged model,
    interleaved in one process (fp32, eval, no_grad, every position's logits)."""
    from loralab.models.loading import load_model

    bare, _ = load_model(MODEL)
    bare.eval()
    merged = merged_copy(side, bare, adapters / "a0").eval()
    unmerged = adapted(side, copy.deepcopy(bare), adapters / "a0").eval()
    results = {}
    with torch.no_grad():
        for batch, length in INFER_SHAPES:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(100, 40000, (batch, length), generator=generator)
            cases = {
                label: (lambda m=model, x=ids: timed(lambda: m(x)))
                for label, model in (("bare", bare), ("unmerged", unmerged), ("merged", merged))
            }
            warmup, reps = (1, 3) if quick else (2, 16 if batch == 1 else 4)
            results[f"{batch}x{length}"] = interleaved(cases, warmup, reps)
        ids = torch.randint(100, 40000, (2, 16), generator=torch.Generator().manual_seed(1))
        logits = unmerged(ids).logits
    torch.save(logits, adapters / f"logits-{side}.pt")
    return results


def manage_worker(side: str, adapters: Path, quick: bool) -> dict:
    """Save, load, merge and switch an adapter (milliseconds, medians in the driver)."""
    from loralab.models.loading import load_model

    bare, _ = load_model(MODEL)
    model = adapted(side, copy.deepcopy(bare), adapters / "a0")
    if side == "peft":
        model.load_adapter(adapters / "a1", adapter_name="a1")
    else:
        adapted(side, model, adapters / "a1", name="a1")
    reps = 3 if quick else 10
    samples: dict[str, list[float]] = {"save": [], "load": [], "merge": [], "switch": []}
    with tempfile.TemporaryDirectory(prefix="bench-manage-") as scratch:
        for index in range(reps + 1):  # the first round warms up
            target = Path(scratch) / f"saved{index}"
            fresh = copy.deepcopy(bare)
            times = {
                "save": lambda t=target: save(side, model, t),
                "load": lambda f=fresh: adapted(side, f, adapters / "a0"),
                "merge": lambda: merge(side, model),
                "switch": lambda i=index: switch(side, model, f"a{i % 2}"),
            }
            for label, fn in times.items():
                ms = timed(fn)
                if label == "merge":
                    unmerge(side, model)
                if index:
                    samples[label].append(ms)
    return samples


def save(side: str, model, directory: Path) -> None:
    if side == "peft":
        model.save_pretrained(directory, selected_adapters=["a0"])
    else:
        from loralab import save_adapter

        save_adapter(model, directory, adapter_name="a0")


def merge(side: str, model) -> None:
    if side == "peft":
        model.merge_adapter()
    else:
        from loralab import merge_adapter

        merge_adapter(model)


def unmerge(side: str, model) -> None:
    if side == "peft":
        model.unmerge_adapter()
    else:
        from loralab import unmerge_adapter

        unmerge_adapter(model)


def switch(side: str, model, name: str) -> None:
    if side == "peft":
        model.set_adapter(name)
    else:
        from loralab import set_active_adapter

        set_active_adapter(model, name)


def worker(arguments: list[str]) -> None:
    kind, side, *rest = arguments
    quick = "--quick" in rest
    if kind == "train":
        case, model = rest[0], rest[1]
        result_line(train_worker(side, case, model, quick))
    elif kind == "profile":
        result_line(profile_worker(side, quick))
    elif kind == "memory":
        result_line(memory_worker(side, quick))
    elif kind == "infer":
        result_line(infer_worker(side, Path(rest[0]), quick))
    else:
        result_line(manage_worker(side, Path(rest[0]), quick))


# -- the driver -------------------------------------------------------------------------------


def driver(quick: bool, write: bool, rounds: int) -> None:
    start = time.perf_counter()
    load_before = load_average()
    train: dict[tuple[str, str], list[dict]] = {}
    other: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        scratch = Path(scratch)
        print("writing the tiny and 360M Llamas and two PEFT adapters ...", file=sys.stderr)
        for name, shape in LOCAL_MODELS.items():
            write_random_llama(scratch / name, shape)
        write_adapters(scratch / "adapters")
        flag = ["--quick"] if quick else []
        for index in range(rounds):
            flip = index % 2 == 1
            for case, settings in TRAIN_CASES.items():
                model = settings["model"]
                model = str(scratch / model) if model in LOCAL_MODELS else model
                sides = settings["sides"]
                for side in sides[::-1] if flip else sides:
                    label = f"round {index + 1}: train {case}, {side}"
                    result = run_worker(__file__, ["train", side, case, model, *flag], label)
                    train.setdefault((case, side), []).append(result)
            for kind in ("profile", "memory", "infer", "manage"):
                for side in SIDES[::-1] if flip else SIDES:
                    where = [] if kind in ("profile", "memory") else [str(scratch / "adapters")]
                    arguments = [kind, side, *where, *flag]
                    result = run_worker(__file__, arguments, f"round {index + 1}: {kind}, {side}")
                    other.setdefault((kind, side), []).append(result)
        logits = {s: torch.load(scratch / "adapters" / f"logits-{s}.pt") for s in SIDES}
    max_diff = float((logits["loralab"] - logits["peft"]).abs().max())
    if max_diff > 1e-4:
        raise SystemExit(f"the two sides disagree: max |Δlogits| = {max_diff:.3g} > 1e-4")
    header = {
        "command": command_line(__file__),
        "date": now(),
        "took": f"{(time.perf_counter() - start) / 60:.1f} min",
        "machine": machine_line(),
        "load": f"{load_before} before, {load_average()} after",
        "max_diff": max_diff,
        "rounds": rounds,
    }
    report = render(header, train, other, quick)
    print(report)
    if write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"written to {RESULTS}", file=sys.stderr)


# -- the table --------------------------------------------------------------------------------


def with_range(ratios: list[float]) -> str:
    """The median of the rounds' ratios, and their range when there are several."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"


def render(header: dict, train: dict, other: dict, quick: bool) -> str:
    def of(case: str, side: str, key: str) -> float:
        return median([run[key] for run in train[(case, side)]])

    def paired(case: str, against: str, side: str, key: str) -> list[float]:
        # Each round's loralab / PEFT: the two ran minutes apart, so a drift in the shared
        # machine's speed over the run cancels in the ratio, unlike in a ratio of medians.
        return [
            ours[key] / theirs[key]
            for ours, theirs in zip(train[(case, "loralab")], train[(against, side)], strict=True)
        ]

    rows, ratios = [], {}
    for case, settings in TRAIN_CASES.items():
        warmup, steps = settings["steps"][quick]
        name = f"train {case} ({steps} steps after {warmup})"
        against = settings.get("against", case)  # whose PEFT figures the ratios use
        for key, unit, better in (
            ("tokens_per_s", "tok/s", "higher"),
            ("step_seconds", "s/step", "lower"),
            ("peak_rss_mb", "MB peak RSS", "lower"),
        ):
            values = {s: of(case, s, key) for s in TRAIN_SIDES if (case, s) in train}
            to_peft = paired(case, against, "peft", key)
            to_trainer = (
                paired(case, against, "peft-trainer", key)
                if (against, "peft-trainer") in train
                else None
            )
            ratios[(case, key)] = median(to_peft)
            digits = 2 if key == "step_seconds" else 0
            shown = {s: f"{v:,.{digits}f}" for s, v in values.items()}
            rows.append(
                (
                    f"{name}: {unit}",
                    shown["loralab"],
                    shown.get("peft", ""),
                    shown.get("peft-trainer", ""),
                    with_range(to_peft),
                    "" if to_trainer is None else with_range(to_trainer),
                    better,
                )
            )
        losses = {
            s: median([r["first_loss"] for r in train[(case, s)]])
            for s in TRAIN_SIDES
            if (case, s) in train
        }
        rows.append(
            (
                f"{name}: loss of the first step",
                *(f"{losses[s]:.6f}" if (case, s) in train else "" for s in TRAIN_SIDES),
                "",
                "",
                "equal",
            )
        )

    def per_round(kind: str, side: str, case: str, label: str | None = None) -> list[float]:
        runs = other[(kind, side)]
        return [median(run[case] if label is None else run[case][label]) for run in runs]

    def ms(kind: str, side: str, case: str, label: str | None = None) -> float:
        return median(per_round(kind, side, case, label))

    def to_peft(kind: str, case: str, label: str | None = None) -> str:
        ours, theirs = (per_round(kind, side, case, label) for side in SIDES)
        return with_range([a / b for a, b in zip(ours, theirs, strict=True)])

    overhead = {}
    for batch, length in INFER_SHAPES:
        shape = f"{batch}x{length}"
        for label in ("bare", "merged", "unmerged"):
            ll, pf = ms("infer", "loralab", shape, label), ms("infer", "peft", shape, label)
            rows.append((f"forward {batch}×{length}: {label}", f"{ll:.1f} ms", f"{pf:.1f} ms",
                         "", to_peft("infer", shape, label), "", "lower"))  # fmt: skip
        for side in SIDES:
            # Each repetition ran the two forwards back to back in one process, so its
            # ratio is free of the machine's drift, which moved a forward by ±15% between
            # processes here; the median is over every repetition of every round.
            overhead[(side, shape)] = median(
                [
                    u / m
                    for run in other[("infer", side)]
                    for u, m in zip(run[shape]["unmerged"], run[shape]["merged"], strict=True)
                ]
            )
        rows.append((f"forward {batch}×{length}: unmerged / merged",
                     f"{overhead[('loralab', shape)]:.3f}", f"{overhead[('peft', shape)]:.3f}",
                     "", "", "", "lower"))  # fmt: skip
    for label, what in (
        ("save", "save an adapter"),
        ("load", "load an adapter onto a base"),
        ("merge", "merge into the base weights"),
        ("switch", "switch the active adapter"),
    ):
        ll, pf = ms("manage", "loralab", label), ms("manage", "peft", label)
        rows.append((what, f"{ll:.1f} ms", f"{pf:.1f} ms", "", to_peft("manage", label), "",
                     "lower"))  # fmt: skip

    def check(ok: bool) -> str:
        return "[x]" if ok else "[ ]"

    def ratios_of(case: str) -> list[float]:
        return paired(case, case, "peft", "peak_rss_mb")

    memory = ratios[("smollm2", "peak_rss_mb")]
    saving = "smollm2, gradient checkpointing"

    def against_before(case: str, before: str, key: str) -> list[float]:
        return [
            now_[key] / then[key]
            for now_, then in zip(train[(case, "loralab")], train[(before, "loralab")], strict=True)
        ]

    before = "smollm2, loralab as before (no lean MLP, glibc's own mmap threshold)"
    before_saving = "smollm2, loralab as before, gradient checkpointing"
    speed_now = against_before("smollm2", before, "tokens_per_s")
    speed_now_saving = against_before(saving, before_saving, "tokens_per_s")
    memory_now = against_before("smollm2", before, "peak_rss_mb")
    recommended = (  # loralab's choice when memory counts, against PEFT's defaults
        median(paired(saving, "smollm2", "peft", "tokens_per_s")),
        median(paired(saving, "smollm2", "peft", "peak_rss_mb")),
    )
    batch1 = overhead[("loralab", f"{INFER_SHAPES[0][0]}x{INFER_SHAPES[0][1]}")]
    profiles = {side: other[("profile", side)] for side in SIDES}
    categories = list(profiles["loralab"][0]["shares"])
    share = {
        (side, c): median([run["shares"][c] for run in profiles[side]])
        for side in SIDES
        for c in categories
    }
    profile_rows = [
        f"| {c} | {share[('loralab', c)]:.2f} | {share[('peft', c)]:.2f} |" for c in categories
    ]
    profile_rows.append(
        "| profiled step (s) | "
        + " | ".join(f"{median([r['step_seconds'] for r in profiles[s]]):.2f}" for s in SIDES)
        + " |"
    )
    base_share = share[("loralab", "base products")]
    held = {
        (side, key): median([run[key] for run in other[("memory", side)]])
        for side in SIDES
        for key in ("weights_read_mb", "saved_mb")
    }
    floor = held[("loralab", "weights_read_mb")] + held[("loralab", "saved_mb")]
    peft_peak = of("smollm2", "peft", "peak_rss_mb")
    peft_saving_peak = of(saving, "peft", "peak_rss_mb")
    weights_alone = held[("loralab", "weights_read_mb")] / peft_saving_peak
    fine_tuning_rows = []
    for model_case, ft_case in (
        ("smollm2", "smollm2, full fine-tuning"),
        ("360M Llama", "360M Llama, full fine-tuning"),
    ):
        lora_tps, lora_rss = (
            of(model_case, "loralab", "tokens_per_s"),
            of(model_case, "loralab", "peak_rss_mb"),
        )
        ft_tps, ft_rss = (
            of(ft_case, "loralab", "tokens_per_s"),
            of(ft_case, "loralab", "peak_rss_mb"),
        )
        peft_rss = of(model_case, "peft", "peak_rss_mb")
        fine_tuning_rows.append(
            f"| {model_case} | {ft_tps:,.0f} | {lora_tps:,.0f} | {ft_tps / lora_tps:.2f} | "
            f"{ft_rss:,.0f} | {lora_rss:,.0f} | {peft_rss:,.0f} | {ft_rss / lora_rss:.2f} |"
        )
    lines = [
        "# Training speed and memory: loralab vs PEFT",
        "",
        f"- Command: `{header['command']}`",
        f"- Date: {header['date']}; the run took {header['took']}",
        f"- Machine: {header['machine']}",
        f"- Load average (1, 5, 15 min): {header['load']}",
        "- Set-up: the same model, e2e batches (8 rows, max_length 64, grouped by length, "
        "right-padded), fp32, LoRA r=8, α=16 on W_q, W_v, dropout 0.05, AdamW lr 2e-4, "
        "clipping 1.0, no KV cache in the training forward, on every side; unmerged "
        "logits of loralab and PEFT on the same adapter file agree to "
        f"{header['max_diff']:.1e}. The 360M Llama is SmolLM2-360M's shape with random "
        "weights; full fine-tuning trains every parameter at the same settings.",
        f"- Method: every measurement in its own process, the sides alternating, "
        f"{header['rounds']} round(s); medians over rounds of each process's median step. "
        "Peak RSS includes loading the model. Ratios are loralab / PEFT (plain loop) and "
        "loralab / PEFT in the Trainer, taken in each round (the two runs minutes apart) and "
        "shown as the median [lowest–highest] over rounds; a loralab-only case is divided "
        "by the PEFT figures of the case it varies. Unmerged / merged is the median, "
        "over every repetition, of two forwards run back to back in one process.",
        "",
        "| Case | loralab | PEFT loop | PEFT Trainer | loralab/PEFT | loralab/Trainer | better |",
        "|---|---:|---:|---:|---:|---:|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        "Goals (equal settings, SmolLM2-135M):",
        "",
        f"- {check(memory <= 0.6)} peak memory at most 0.6× PEFT's: "
        f"{with_range(ratios_of('smollm2'))}× without gradient checkpointing, "
        f"{with_range(ratios_of(saving))}× with it on both sides (the floor below: "
        f"{floor / peft_peak:.2f}× and {weights_alone:.2f}×)",
        f"- {check(median(speed_now) >= 1.0)} with throughput no lower than loralab's before "
        f"these changes, in the same run: {with_range(speed_now)}× (with gradient "
        f"checkpointing {with_range(speed_now_saving)}×), at {with_range(memory_now)}× its "
        "peak memory",
        f"- {check(base_share >= 0.85)} the base's matrix products at least 0.85 of a step: "
        f"{base_share:.2f} (PEFT's step: {share[('peft', 'base products')]:.2f})",
        f"- {check(batch1 <= 1.05)} unmerged inference at most 5% slower than merged at "
        f"batch 1: {batch1:.3f}×",
        "",
        "Not at equal settings (a labelled comparison, not a goal): loralab with "
        "`--gradient-checkpointing`, its choice when memory counts, against PEFT's loop "
        f"without it: {recommended[0]:.2f}× the throughput at {recommended[1]:.2f}× the "
        "peak memory.",
        "",
        "## Where a step's time goes",
        "",
        f"`torch.profiler` over {PROFILE_STEPS[quick][1]} SmolLM2 step(s) after "
        f"{PROFILE_STEPS[quick][0]} (no checkpointing), each side in its own process: the "
        "share of the profiled steps' wall time spent in each kind of operator (its own CPU "
        "time on the training thread). The base's products are the matrix products through "
        "frozen weights, forward and input-gradient (the output head included): work no "
        "library can skip. LoRA's are those with a dimension of the rank r = 8.",
        "",
        "| share of a step | loralab | PEFT loop |",
        "|---|---:|---:|",
        *profile_rows,
        "",
        *largest_others_lines(profiles),
        "## The memory floor",
        "",
        "What a step holds whatever the allocator does, measured in a process of its own for "
        "each side: SmolLM2 in memory with every weight read once (one forward without "
        "gradients on the longest batch, before any training; the weights are fp32, mapped "
        "from the file, and count in RSS once read), and the activations kept for the backward "
        "pass, the most over a run's steps (saved tensors, distinct storages, the weights' "
        "own left out).",
        "",
        "| MB | loralab | PEFT loop |",
        "|---|---:|---:|",
        f"| the model in memory, every weight read | {held[('loralab', 'weights_read_mb')]:,.0f} | "
        f"{held[('peft', 'weights_read_mb')]:,.0f} |",
        f"| kept for the backward pass, most in a step | {held[('loralab', 'saved_mb')]:,.0f} | "
        f"{held[('peft', 'saved_mb')]:,.0f} |",
        f"| the two together | {floor:,.0f} | "
        f"{held[('peft', 'weights_read_mb')] + held[('peft', 'saved_mb')]:,.0f} |",
        f"| peak RSS of the training run | {of('smollm2', 'loralab', 'peak_rss_mb'):,.0f} | "
        f"{peft_peak:,.0f} |",
        "",
        f"loralab's floor is {floor:,.0f} MB, {floor / peft_peak:.2f}× PEFT's peak of "
        f"{peft_peak:,.0f} MB, against the goal's {0.6 * peft_peak:,.0f} MB; with gradient "
        f"checkpointing on both sides the model alone is {weights_alone:.2f}× PEFT's peak of "
        f"{peft_saving_peak:,.0f} MB. Above the floor, loralab's run holds "
        f"{of('smollm2', 'loralab', 'peak_rss_mb') - floor:,.0f} MB more at its peak: the "
        "loss's chunk of logits, freed blocks that glibc keeps in the heap, and the runtime's "
        "own buffers.",
        "",
        "## Full fine-tuning against LoRA",
        "",
        "loralab at the same settings, every parameter trained (AdamW's two moments for "
        "each) against LoRA r = 8 on W_q, W_v. The paper reports 3× less training memory "
        "for LoRA on GPT-3 175B, where the weights dwarf everything else.",
        "",
        "| model | FT tok/s | LoRA tok/s | FT/LoRA | FT peak RSS (MB) | LoRA peak RSS (MB) | "
        "PEFT LoRA peak RSS (MB) | FT/LoRA memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *fine_tuning_rows,
    ]
    return "\n".join(lines) + "\n"


def largest_others_lines(profiles: dict[str, list[dict]]) -> list[str]:
    """The ATen operators that make most of each side's "everything else" (medians over
    rounds of their share of a step)."""
    shares: dict[tuple[str, str], list[float]] = {}
    for side, runs in profiles.items():
        for run in runs:
            for name, share in run.get("largest_others", {}).items():
                shares.setdefault((side, name), []).append(share)
    names = sorted(
        {name for side, name in shares},
        key=lambda name: -median(shares.get(("loralab", name), [0.0])),
    )
    if not names:
        return []
    cell = {key: f"{median(values):.3f}" for key, values in shares.items()}
    aten = {side: median([run.get("aten_others", 0.0) for run in profiles[side]]) for side in SIDES}
    return [
        'The largest operators of "everything else" (own CPU time as a share of a step; '
        "blank: not among a side's largest). All its ATen operators together take "
        f"{aten['loralab']:.2f} of loralab's step and {aten['peft']:.2f} of PEFT's; the rest "
        'of "everything else" is time outside them: Python, the autograd engine, the '
        "profiler's own cost.",
        "",
        "| operator | loralab | PEFT loop |",
        "|---|---:|---:|",
        *(
            f"| `{name}` | {cell.get(('loralab', name), '')} | {cell.get(('peft', name), '')} |"
            for name in names
        ),
        "",
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    if "--packing" in sys.argv[1:]:  # the packing case: bench_packing.py, its own processes
        import bench_packing

        bench_packing.main([a for a in sys.argv[1:] if a != "--packing"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer steps")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    args = parser.parse_args()
    driver(args.quick, args.write, args.rounds or (1 if args.quick else 3))


if __name__ == "__main__":
    main()
