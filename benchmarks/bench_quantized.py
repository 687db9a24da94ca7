"""LoRA over a quantized frozen base: training speed and peak memory of loralab over the
GGUF's own packed weights (``--quantized-base gguf``) against loralab over the dense fp32
load of the same file, and loralab over a bitsandbytes NF4 base (``--quantized-base nf4``)
against PEFT over the same NF4 base, at equal settings.

Cases:
- SmolLM2-135M from the shipped Q4_1 file (its 210 linear weights Q4_1, the embedding
  Q8_0): loralab packed, loralab dense, loralab over NF4 and PEFT over NF4 (bitsandbytes,
  double quantization, blocksize 64, fp32 compute; PEFT in a plain PyTorch loop), on
  bench_train's settings and batches (e2e, 8 × ≤64 tokens, LoRA r = 8, α = 16, dropout
  0.05 on W_q and W_v, AdamW). The first losses of the two GGUF sides are compared to
  the last bit.
- How the cost grows: random-weight Llamas of SmolLM2-360M's and SmolLM2-1.7B's shapes
  written as Q4_0 GGUF files (embedding Q8_0; SmolLM2's tokenizer), packed against
  dense (the dense side reads a safetensors copy made beforehand, mapped as the embedded
  model's cache is, so that its load does not hold two copies).
- The moonshot: a 7B-shaped model (Llama-2-7B's blocks: hidden 4096, 32 layers,
  intermediate 11008; SmolLM2's 49k vocabulary), packed, a few steps; dense fp32 would
  need its 6.7B weights × 4 bytes, more than this machine's memory, and is not run.

Each run is a process of its own (``--worker``), the sides alternating and the order
flipped every round; medians over rounds. Peak RSS is the process's, loading included.
On CUDA (``--device cuda``) the bases compute in bf16 and memory is
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_quantized.py            # 2 rounds (~17 min on 2 cores)
    python benchmarks/bench_quantized.py --quick    # 1 round, no 1.7B or 7B
    python benchmarks/bench_quantized.py --write    # also writes results_quantized.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import PEFT_TARGETS, train_config, train_loralab, train_peft_loop
from measure import (
    command_line,
    load_average,
    machine_line,
    median,
    now,
    peak_rss_mb,
    result_line,
    run_worker,
)

RESULTS = Path(__file__).with_name("results_quantized.md")
WORK = Path(tempfile.gettempdir()) / "loralab-bench-quantized"
SHAPES = {  # Llama shapes: hidden, layers, intermediate, heads, kv heads
    "smollm2": (576, 30, 1536, 9, 3),
    "360m": (960, 32, 2560, 15, 5),
    "1.7b": (2048, 24, 8192, 32, 32),
    "7b": (4096, 32, 11008, 32, 32),
}
# The packed type of the linear weights, and its bytes per 32 values.
PACKED = {"smollm2": ("Q4_1", 20), "360m": ("Q4_0", 18), "1.7b": ("Q4_0", 18), "7b": ("Q4_0", 18)}
# (warm-up steps, timed steps, batch size) per model; the quick mode runs the first two.
STEPS = {"smollm2": (2, 8, 8), "360m": (1, 4, 4), "1.7b": (1, 2, 2), "7b": (1, 2, 1)}


# -- the models ---------------------------------------------------------------------------


def write_random_gguf(path: Path, shape: tuple[int, ...], seed: int = 0) -> None:
    """A Llama of ``shape`` with random weights as a GGUF file: linear weights Q4_0 (random
    four-bit values, scales of a trained model's size), embedding Q8_0, norms F32, and the
    embedded SmolLM2's metadata (tokenizer, chat template) with the shape's numbers."""
    import gguf

    from loralab.models.embedded import embedded_gguf

    hidden, layers, ffn, heads, kv_heads = shape
    source = gguf.GGUFReader(embedded_gguf("smollm2-135m"))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(str(path), "llama")
    numbers = {
        "llama.block_count": layers,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": hidden // heads,
        "llama.context_length": 2048,
    }
    for key, part in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = numbers.get(key, part.contents())
        sub_type = part.types[1] if part.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, part.types[0], sub_type)
    rng = np.random.default_rng(seed)

    def packed(rows: int, columns: int, kind: str) -> np.ndarray:
        raw = gguf.GGMLQuantizationType[kind]
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[raw]
        blocks = rng.integers(0, 256, (rows * columns // block_values, block_bytes), np.uint8)
        scale = np.full((len(blocks), 1), 0.02 / 8 if kind == "Q4_0" else 0.02 / 127)
        blocks[:, :2] = scale.astype(np.float16).view(np.uint8)
        return blocks.reshape(rows, -1)

    def add(name: str, rows: int, columns: int, kind: str = "Q4_0") -> None:
        raw = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, packed(rows, columns, kind), raw_dtype=raw)

    kv = kv_heads * hidden // heads
    add("token_embd.weight", vocab, hidden, "Q8_0")
    for block in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(hidden, np.float32))
        add(f"blk.{block}.attn_q.weight", hidden, hidden)
        add(f"blk.{block}.attn_k.weight", kv, hidden)
        add(f"blk.{block}.attn_v.weight", kv, hidden)
        add(f"blk.{block}.attn_output.weight", hidden, hidden)
        add(f"blk.{block}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{block}.ffn_up.weight", ffn, hidden)
        add(f"blk.{block}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prepare(name: str) -> dict[str, str]:
    """The GGUF file of model ``name`` and, where the dense side runs, its safetensors copy
    (made once, in a process of its own)."""
    if name == "smollm2":
        return {"packed": "smollm2-135m", "dense": "smollm2-135m"}
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"random-{name}-q4_0.gguf"
    if not path.exists():
        print(f"  writing {path} ...", file=sys.stderr, flush=True)
        write_random_gguf(path.with_suffix(".partial"), SHAPES[name])
        path.with_suffix(".partial").rename(path)
    models = {"packed": str(path)}
    if name != "7b":
        dense = WORK / f"random-{name}-dense"
        if not (dense / "config.json").exists():
            run_worker(__file__, ["convert", str(path), str(dense)], f"converting {name}")
        models["dense"] = str(dense)
    return models


def convert_worker(gguf_path: str, directory: str) -> dict:
    from loralab.models.loading import load_model

    model, tokenizer = load_model(gguf_path)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {}


# -- the runs ----------------------------------------------------------------------------


def train_worker(side: str, model: str, name: str, device: str) -> dict:
    """One run of ``side`` on ``model``: seconds and tokens of each step, the losses, the
    process's peak memory."""
    warmup, steps, batch = STEPS[name]
    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as scratch:
        config = train_config(
            model,
            warmup + steps,
            False,
            Path(scratch) / "run",
            batch_size=batch,
            quantized_base={"packed": "gguf", "nf4": "nf4"}.get(side),
            device=device,
            dtype="bf16" if device == "cuda" else None,
        )
        start = time.perf_counter()
        if side == "peft-nf4":
            seconds, tokens, losses = train_peft_nf4(config)
        else:
            seconds, tokens, losses = train_loralab(config)
        wall = time.perf_counter() - start
    memory = peak_rss_mb()
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 1e6
    timed = slice(warmup, None)
    return {
        "tokens_per_s": sum(tokens[timed]) / sum(seconds[timed]),
        "step_s": median(seconds[timed]),
        "peak_mb": memory,
        "losses": losses[:3],
        "wall_s": wall,
    }


def train_peft_nf4(config) -> tuple[list[float], list[int], list[float]]:
    """PEFT over a bitsandbytes NF4 base (QLoRA's settings, fp32 compute on a CPU), in a
    plain loop over the same batches as loralab's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from loralab.models.embedded import embedded_model_dir

    torch.manual_seed(config.seed)
    directory = embedded_model_dir(config.model)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if config.device == "cuda" else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, device_map=config.device or "cpu"
    )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=PEFT_TARGETS,
        task_type="CAUSAL_LM",
    )
    return train_peft_loop(config, model_and_tokenizer=(get_peft_model(model, lora), tokenizer))


GENERATE = (8, 32)  # prompts, new tokens each (greedy, one batch)


def generate_worker(side: str, device: str) -> dict:
    """Greedy decoding through the base (what eval, generate and serve run): every new
    token unpacks every packed weight again, so decoding pays the unpacking per token."""
    from loralab.generate import generate
    from loralab.models.loading import load_model
    from loralab.tasks import get_task

    model, tokenizer = load_model(
        "smollm2-135m", quantized_base="gguf" if side == "packed" else None
    )
    model.to(device)
    prompts, new = GENERATE
    test = get_task("e2e").splits(seed=0, train_size=0, test_size=prompts)["test"]
    texts = [example["prompt"] for example in test]
    generate(model, tokenizer, texts[:1], 4)  # warm-up
    start = time.perf_counter()
    outputs = generate(model, tokenizer, texts, new, batch_size=prompts, stop_at_newline=False)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": prompts * new / seconds, "outputs": outputs}


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


# -- the driver ---------------------------------------------------------------------------


def driver(quick: bool, write: bool, rounds: int, device: str) -> None:
    names = ["smollm2", "360m"] if quick else ["smollm2", "360m", "1.7b", "7b"]
    header = {"date": now(), "machine": machine_line(), "load_before": load_average()}
    results: dict[str, dict[str, list[dict]]] = {}
    for name in names:
        models = prepare(name)
        sides = [s for s in ("packed", "dense") if s in models]
        if name == "smollm2" and has_bitsandbytes():
            sides += ["nf4", "peft-nf4"]
        runs = results.setdefault(name, {side: [] for side in sides})
        for round_index in range(1 if name == "7b" else rounds):
            order = sides if round_index % 2 == 0 else sides[::-1]
            for side in order:
                model = models.get(side, models["dense"] if "nf4" in side else None)
                arguments = ["train", side, model, name, device]
                runs[side].append(run_worker(__file__, arguments, f"{name}, {side}"))
        if name == "smollm2":
            for round_index in range(rounds):
                for side in ("packed", "dense") if round_index % 2 == 0 else ("dense", "packed"):
                    label = f"{name}, generating, {side}"
                    generated = run_worker(__file__, ["generate", side, device], label)
                    results.setdefault("generate", {}).setdefault(side, []).append(generated)
    header["load_after"] = load_average()
    report = render(header, results, quick, device)
    print(report)
    if write:
        RESULTS.write_text(report)


def render(header: dict, results: dict, quick: bool, device: str) -> str:
    memory = "peak GPU memory (MB)" if device == "cuda" else "peak RSS (MB)"
    lines = [
        "# LoRA over a quantized base: packed GGUF weights against the dense load",
        "",
        f"- Command: `{command_line(__file__)}`; {header['date']}",
        f"- Machine: {header['machine']}; load average {header['load_before']} before, "
        f"{header['load_after']} after",
        "- Settings: bench_train's (e2e, ≤64 tokens, LoRA r = 8, α = 16, dropout 0.05 on "
        "W_q, W_v, AdamW 2e-4, clipping 1.0), batch and steps per model below; each run a "
        "process of its own, the sides alternating; medians over rounds.",
        "",
        f"| model | batch × steps | side | tokens/s | step (s) | {memory} | first losses |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    generated = results.pop("generate", None)
    for name, runs in results.items():
        warmup, steps, batch = STEPS[name]
        for side, measured in runs.items():
            losses = ", ".join(f"{x:.6f}" for x in measured[0]["losses"])
            lines.append(
                f"| {name} | {batch} × {steps} (after {warmup}) | {side} | "
                f"{median([r['tokens_per_s'] for r in measured]):.1f} | "
                f"{median([r['step_s'] for r in measured]):.2f} | "
                f"{median([r['peak_mb'] for r in measured]):,.0f} | {losses} |"
            )
    if generated is not None:
        speeds = {s: median([r["tokens_per_s"] for r in runs]) for s, runs in generated.items()}
        same = all(
            p["outputs"] == d["outputs"]
            for p, d in zip(generated["packed"], generated["dense"], strict=True)
        )
        prompts, new = GENERATE
        lines += [
            "",
            f"Greedy decoding on SmolLM2, {prompts} e2e prompts × {new} new tokens in one batch: "
            f"packed {speeds['packed']:.1f} tokens/s, dense {speeds['dense']:.1f} "
            f"({speeds['packed'] / speeds['dense']:.2f}×); the texts "
            f"{'are the same' if same else 'DIFFER'}. Every decoding step unpacks every weight "
            "again, a cost a training step spreads over its whole batch.",
        ]
    lines += ["", "## Packed against dense", ""]
    for name, runs in results.items():
        if "dense" not in runs:
            continue
        packed, dense = runs["packed"], runs["dense"]
        pairs = list(zip(packed, dense, strict=True))  # one of each per round
        speed = [p["tokens_per_s"] / d["tokens_per_s"] for p, d in pairs]
        peak = [p["peak_mb"] / d["peak_mb"] for p, d in pairs]
        same = all(p["losses"] == d["losses"] for p, d in pairs)
        values = linear_values(SHAPES[name])
        kind, per_block = PACKED[name]
        dense_peak = median([d["peak_mb"] for d in dense])
        floor = dense_peak - values * (4 - per_block / 32) / 1e6
        lines.append(
            f"- {name}: tokens/s {median(speed):.2f}× dense's (goal ≥ 0.85), peak memory "
            f"{median(peak):.2f}× (goal ≤ 0.6); first losses "
            f"{'bit for bit the same' if same else 'DIFFERENT'}. The linear weights are "
            f"{values * 4 / 1e6:,.0f} MB in fp32 and {values * per_block / 32 / 1e6:,.0f} MB "
            f"in {kind}: were nothing but them to shrink, the packed peak would be "
            f"{floor / dense_peak:.2f}× the dense one."
        )
    nf4 = results.get("smollm2", {})
    if "nf4" in nf4 and "peft-nf4" in nf4:
        pairs = list(zip(nf4["nf4"], nf4["peft-nf4"], strict=True))
        speed = median([ours["tokens_per_s"] / theirs["tokens_per_s"] for ours, theirs in pairs])
        peak = median([ours["peak_mb"] / theirs["peak_mb"] for ours, theirs in pairs])
        gap = max(abs(ours["losses"][0] - theirs["losses"][0]) for ours, theirs in pairs)
        lines += [
            "",
            "## loralab against PEFT over the same bitsandbytes NF4 base",
            "",
            f"- smollm2: tokens/s {speed:.2f}× PEFT's, peak memory {peak:.2f}×. Both run "
            "bitsandbytes' own 4-bit product. The first losses (B = 0: the base's own) "
            f"differ by {gap:.1e} (loralab's chunked loss sums in another order than the "
            "plain loop's); later ones move apart with each library's own random A and "
            "dropout masks.",
        ]
    lines.append("")
    return "\n".join(lines)


def linear_values(shape: tuple[int, ...]) -> int:
    """The numbers in a Llama's linear weights (the blocks' seven; the head is tied)."""
    hidden, layers, ffn, heads, kv_heads = shape
    kv = kv_heads * hidden // heads
    return layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * ffn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, no 1.7B or 7B")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 2; quick 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        workers = {"convert": convert_worker, "train": train_worker, "generate": generate_worker}
        result_line(workers[kind](*rest))
        return
    rounds = args.rounds or (1 if args.quick else 2)
    driver(args.quick, args.write, rounds, args.device)


if __name__ == "__main__":
    main()
