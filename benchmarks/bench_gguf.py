"""Generation after export: llama.cpp with our GGUF adapter against loralab's engine.

The speed a CPU user gets once an adapter leaves loralab, and the anchor for ``loralab
serve``. One LoRA (PEFT-written, r = 8 on q, k, v and o, random non-zero factors) on the
embedded SmolLM2-135M, exported with ``loralab export --format gguf``; greedy
generation of a fixed 64 new tokens (the end token does not stop a row, so both sides do
the same work) after e2e prompts, one stream and a batch of 8:

- Transformers' ``generate`` (``loralab generate --engine hf``, the path before the
  engine): the unmerged adapter in fp32 PyTorch over a left-padded batch;
- loralab's engine (``loralab.engine.decode_greedy``, what ``loralab generate`` runs): the
  same model and adapter, its own per-layer KV cache, each row at its own positions, the
  fast step over the model's tensors (eager, not compiled), its fp32 products at a few
  rows in slices on every thread (``engine/products.py``); the same with every product
  whole (MKL, which runs a few rows on one thread: the engine before the slices); with
  bf16 base weights (``--engine-weights bf16``, where the CPU has AVX512-BF16 or AMX);
  and with int8 base weights, one scale a row (``--engine-weights int8``);
- llama.cpp (llama-cpp-python's bindings, its own batched decoding: one sequence per
  prompt in one ``llama_decode``) with the adapter GGUF, on the base's F32 export (the
  same arithmetic), on its BF16 export (``loralab merge --format gguf --outtype bf16``:
  the arithmetic of loralab's bf16 weights), on its Q8_0 export (int8 in blocks of 32:
  the anchor for loralab's int8 weights) and on the shipped Q4_1 file (what a user
  runs); and the F32 base without the adapter, for what the adapter costs there and to
  show that it changes the tokens.

Each side runs in its own worker process, the order flipped every round; a worker times
``--reps`` runs after one warm-up, and the table gives the medians over all runs. Both
use this machine's cores (torch's default threads; llama.cpp ``n_threads`` the same).

    python benchmarks/bench_gguf.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import write_adapters  # a PEFT-written adapter
from measure import (
    command_line,
    load_average,
    machine_line,
    median,
    now,
    result_line,
    run_worker,
)

MODEL = "smollm2-135m"
NEW_TOKENS = 64
BATCHES = (1, 8)
HERE = Path(__file__).resolve().parent


def prompts(count: int) -> list[list[int]]:
    from loralab.models.loading import load_model
    from loralab.tasks import get_task

    _, tokenizer = load_model(MODEL)
    examples = get_task("e2e").splits(test_size=count)["test"]
    return [tokenizer(e["prompt"])["input_ids"] for e in examples]


# -- the two sides, each in its own worker process -------------------------------------------


def loralab_runs(adapter: Path, batch: list[list[int]], reps: int) -> dict:
    from loralab.files.adapter_dir import load_adapter
    from loralab.models.loading import load_model

    model, tokenizer = load_model(MODEL)
    load_adapter(model, adapter)  # unmerged, as `loralab generate --adapter` runs it
    tokenizer.padding_side = "left"
    encoded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
    first_rows: list[int] = []

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        first_rows[:] = out[0, encoded["input_ids"].shape[1] :].tolist()
        return seconds

    return _timed(run, reps, len(batch), first_rows)


def engine_runs(adapter: Path, batch: list[list[int]], reps: int, weights: str = "fp32") -> dict:
    from loralab.engine import decode
    from loralab.files.adapter_dir import load_adapter
    from loralab.models.loading import load_model

    model, _ = load_model(MODEL)
    load_adapter(model, adapter)
    first_rows: list[int] = []

    def run() -> float:
        start = time.perf_counter()
        out = decode(model, batch, NEW_TOKENS, weights=weights)  # no stop: all 64 every row
        seconds = time.perf_counter() - start
        first_rows[:] = out[0]
        return seconds

    return _timed(run, reps, len(batch), first_rows)


def llama_runs(base: Path, adapter: Path | None, batch: list[list[int]], reps: int) -> dict:
    import llama_cpp

    threads = torch.get_num_threads()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept referenced
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(
        str(base).encode(), llama_cpp.llama_model_default_params()
    )
    params = llama_cpp.llama_context_default_params()
    prompt_tokens = sum(len(p) for p in batch)
    params.n_seq_max = len(batch)
    params.n_ctx = len(batch) * (max(len(p) for p in batch) + NEW_TOKENS + 8)
    params.n_batch = params.n_ubatch = max(prompt_tokens, len(batch))
    params.n_threads = params.n_threads_batch = threads
    context = llama_cpp.llama_init_from_model(model, params)
    if adapter is not None:
        lora = llama_cpp.llama_adapter_lora_init(model, str(adapter).encode())
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
        scales = (ctypes.c_float * 1)(1.0)
        if lora is None or llama_cpp.llama_set_adapters_lora(context, adapters, 1, scales) != 0:
            raise SystemExit(f"llama.cpp did not take the adapter {adapter}")
    vocabulary = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    tokens = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    first_rows: list[int] = []

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, position, sequence, wants_logits) in enumerate(entries):
            tokens.token[i], tokens.pos[i] = token, position
            tokens.n_seq_id[i], tokens.seq_id[i][0] = 1, sequence
            tokens.logits[i] = wants_logits
        tokens.n_tokens = len(entries)
        if llama_cpp.llama_decode(context, tokens) != 0:
            raise SystemExit("llama_decode failed")

    def greedy(index: int) -> int:
        pointer = llama_cpp.llama_get_logits_ith(context, index)
        row = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), (vocabulary,)
        )
        return int(row.argmax())

    def run() -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
        start = time.perf_counter()
        entries, outputs = [], []
        for sequence, prompt in enumerate(batch):
            entries += [(t, j, sequence, j == len(prompt) - 1) for j, t in enumerate(prompt)]
            outputs.append(len(entries) - 1)
        decode(entries)
        generated = [[greedy(i)] for i in outputs]
        for step in range(1, NEW_TOKENS):
            decode(
                [
                    (row[-1], len(p) + step - 1, s, True)
                    for s, (p, row) in enumerate(zip(batch, generated, strict=True))
                ]
            )
            for s, row in enumerate(generated):
                row.append(greedy(s))
        seconds = time.perf_counter() - start
        first_rows[:] = generated[0]
        return seconds

    result = _timed(run, reps, len(batch), first_rows)
    llama_cpp.llama_batch_free(tokens)
    return result


def _timed(run, reps: int, rows: int, first_rows: list[int]) -> dict:
    run()  # warm-up: allocations, caches, thread pools
    seconds = [run() for _ in range(reps)]
    return {
        "tok_s": [rows * NEW_TOKENS / s for s in seconds],
        "first_row": list(first_rows),
    }


def worker(argv: list[str]) -> None:
    side, batch_size, reps, folder = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    batch = json.loads((folder / "prompts.json").read_text())[:batch_size]
    if side == "loralab":
        result = loralab_runs(folder / "a0", batch, reps)
    elif side in ("engine", "engine-bf16", "engine-int8", "engine-whole"):
        if side == "engine-whole":  # every product whole, as before the slices
            from loralab.engine import products

            products.MAX_ROWS = 0
        formats = {"engine-bf16": "bf16", "engine-int8": "int8"}
        result = engine_runs(folder / "a0", batch, reps, formats.get(side, "fp32"))
    else:
        from loralab.models.embedded import embedded_gguf

        bases = {
            "llama-q4_1": embedded_gguf(MODEL),
            "llama-bf16": folder / "base-bf16.gguf",
            "llama-q8_0": folder / "base-q8_0.gguf",
        }
        base = bases.get(side, folder / "base-f32.gguf")
        adapter = None if side == "llama-f32-alone" else folder / "a0.gguf"
        result = llama_runs(base, adapter, batch, reps)
    result_line(result)


# -- the run ----------------------------------------------------------------------------------


SIDES = {
    "loralab": "Transformers' `generate` (fp32, unmerged; `--engine hf`)",
    "engine": "loralab's engine (fp32, unmerged; eager; `loralab generate`)",
    "engine-whole": "loralab's engine, fp32 products whole (MKL on one thread: before the slices)",
    "engine-bf16": "loralab's engine, bf16 base weights (`--engine-weights bf16`)",
    "engine-int8": "loralab's engine, int8 base weights (`--engine-weights int8`)",
    "llama-f32": "llama.cpp, F32 base + adapter GGUF",
    "llama-bf16": "llama.cpp, BF16 base + adapter GGUF",
    "llama-q8_0": "llama.cpp, Q8_0 base + adapter GGUF",
    "llama-q4_1": "llama.cpp, shipped Q4_1 base + adapter GGUF",
    "llama-f32-alone": "llama.cpp, F32 base alone (no adapter: its cost, and its effect)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument("--write", action="store_true", help="also write results_gguf.md")
    parser.add_argument("--rounds", type=int, default=None, help="(default: 2; quick: 1)")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    rounds, reps = (1, 1) if args.quick else (args.rounds or 2, 3)
    from loralab.engine.weights import choose as choose_weights
    from loralab.files.gguf.adapter import export_adapter_gguf
    from loralab.files.gguf.merged import write_merged_gguf
    from loralab.models.embedded import embedded_gguf
    from loralab.models.loading import load_model

    load_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_adapters(folder, 1)
        model, _ = load_model(MODEL)
        export_adapter_gguf(folder / "a0", model.config, folder / "a0.gguf")
        write_merged_gguf(embedded_gguf(MODEL), folder / "base-f32.gguf", "f32")
        write_merged_gguf(embedded_gguf(MODEL), folder / "base-bf16.gguf", "bf16")
        write_merged_gguf(embedded_gguf(MODEL), folder / "base-q8_0.gguf", "q8_0")
        (folder / "prompts.json").write_text(json.dumps(prompts(max(BATCHES))))
        samples: dict[tuple[str, int], list[float]] = {}
        first: dict[tuple[str, int], list[int]] = {}
        failed: dict[str, str] = {}  # a side whose worker crashed is reported, not retried
        weights, why = choose_weights("auto", torch.device("cpu"))
        if weights != "bf16":  # the engine refuses bf16 here, with this reason
            failed["engine-bf16"] = f"not run: {why}"
        order = [(side, b) for b in BATCHES for side in SIDES]
        for round_index in range(rounds):
            for side, b in order if round_index % 2 == 0 else order[::-1]:
                if side in failed:
                    continue
                label = f"{side} batch {b} (round {round_index + 1})"
                try:
                    result = run_worker(__file__, [side, str(b), str(reps), scratch], label)
                except SystemExit as crash:
                    print(f"    {crash}", file=sys.stderr)
                    failed[side] = str(crash)
                    continue
                samples.setdefault((side, b), []).extend(result["tok_s"])
                first[(side, b)] = result["first_row"]
        lengths = [len(p) for p in json.loads((folder / "prompts.json").read_text())]
    text = _table(samples, first, rounds, reps, load_before, lengths, failed)
    print(text)
    if args.write:
        (HERE / "results_gguf.md").write_text(text)


def _table(
    samples, first, rounds: int, reps: int, load_before: str, lengths: list[int], failed
) -> str:
    def agreeing(a: list[int], b: list[int]) -> int:
        return next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )

    lines = [
        "# Generation after export: llama.cpp with loralab's GGUF adapter",
        "",
        f"`{command_line(__file__)}`, {now()}; {machine_line()}; load average before "
        f"{load_before}, after {load_average()}.",
        "",
        f"SmolLM2-135M, one LoRA (r = 8 on q, k, v, o), greedy, {NEW_TOKENS} new tokens per "
        f"prompt (e2e test prompts of {min(lengths)}–{max(lengths)} tokens), the end token "
        "ignored. Output tokens per second over the whole run (prompt included), medians of "
        f"{rounds} rounds × {reps} runs, range in brackets. *first row agrees* counts the "
        "greedy tokens of the batch's first row that equal loralab's.",
        "",
        "| side | batch | output tok/s | × Transformers | × llama.cpp F32 | × llama.cpp BF16 "
        "| first row agrees |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BATCHES:
        ours = median(samples[("loralab", b)])
        for side, name in SIDES.items():
            if side in failed:
                lines.append(f"| {name} | {b} | {failed[side]} | | | | |")
                continue
            values = samples[(side, b)]
            same = agreeing(first[(side, b)], first[("loralab", b)])
            same = "—" if side == "loralab" else f"{same} / {NEW_TOKENS}"
            ratios = []
            for anchor in ("llama-f32", "llama-bf16"):
                theirs = samples.get((anchor, b))
                ratios.append(f"{median(values) / median(theirs):.2f}" if theirs else "—")
            lines.append(
                f"| {name} | {b} | {median(values):.1f} [{min(values):.1f}–{max(values):.1f}] "
                f"| {median(values) / ours:.2f} | {' | '.join(ratios)} | {same} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
