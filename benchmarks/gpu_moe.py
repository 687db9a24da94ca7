"""LoRA on a mixture of experts on a GPU (issue 34): a training step's time and peak GPU
memory with every expert's stacked weights adapted (``target_parameters``), against
attention alone, loralab against PEFT at equal settings.

For the day a GPU is lent (the device tool); CI has none. No network is needed: the model
is Transformers' own Qwen3-MoE built from a config with random weights, each layer of
Qwen3-30B-A3B's shape (hidden 2048, 32 heads of 128, 128 experts of width 768, top-8) but
4 layers and a vocabulary of 8192, in bf16 (loralab's and PEFT's factors in fp32). A step
is a forward and backward over 8 × 512 tokens and an AdamW update; LoRA r = 8, α = 16 on
W_q, W_v, plus every expert's ``gate_up_proj`` and ``down_proj``. Each side runs in its
own process, the sides alternating; a figure is the median of 6 steps after 2 warm-up
steps, and the peak memory above what the adapted model held before its first step
(``torch.cuda.max_memory_allocated``). About 3 minutes on an H100.

    python benchmarks/gpu_moe.py
    python benchmarks/gpu_moe.py --device cpu --small   # a smoke run of the script here
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_moe import SHAPE, SIDES, adapted, train_steps
from measure import median, result_line, run_worker

LARGE = dict(
    vocab_size=8192,
    hidden_size=2048,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    max_position_embeddings=1024,
)


def measure(side: str, device: str, small: bool) -> dict:
    shape, (batch, length) = (SHAPE, (4, 128)) if small else (LARGE, (8, 512))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = adapted(side, shape, dtype).train().to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, length), generator=generator).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if cuda else 0
    times, losses = train_steps(
        model, optimizer, ids, torch.cuda.synchronize if cuda else lambda: None
    )
    peak = (torch.cuda.max_memory_allocated() - held) / 2**20 if cuda else 0.0
    return {
        "step_ms": 1e3 * median(times),
        "step_peak_mb": peak,
        "trainable": sum(p.numel() for p in parameters),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="bench_moe's CPU shape")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL torch sees no CUDA device", flush=True)
        return 1
    flags = [args.device, "small" if args.small else "large"]
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
        for side in order:
            results[side].append(run_worker(__file__, [side, *flags], f"{round_ + 1}: {side}"))

    def figure(side: str, key: str) -> float:
        return median([r[key] for r in results[side]])

    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    print(f"{where}; torch {torch.__version__}; shape {'small' if args.small else 'large'}")
    print("| library | adapted | trainable | ms a step | × PEFT | peak above the model, MB "
          "| × PEFT | loss, first → last |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for side in SIDES:
        library, targets = side.split("-")
        theirs = f"peft-{targets}"
        ratio = figure(side, "step_ms") / figure(theirs, "step_ms")
        memory = figure(side, "step_peak_mb") / max(figure(theirs, "step_peak_mb"), 1e-9)
        print(
            f"| {library} | {targets} | {figure(side, 'trainable'):,.0f} | "
            f"{figure(side, 'step_ms'):.1f} | {ratio:.2f}× | {figure(side, 'step_peak_mb'):.0f} "
            f"| {memory:.2f}× | {figure(side, 'first_loss'):.3f} → "
            f"{figure(side, 'last_loss'):.3f} |"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, device, shape = sys.argv[2:5]
        result_line(measure(side, device, shape == "small"))
    else:
        raise SystemExit(main())
