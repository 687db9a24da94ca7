"""LoRA on a mixture of experts: a training step's time and peak memory with the experts'
stacked weights adapted (``target_parameters``) against attention alone, loralab against
PEFT at equal settings, on this CPU.

The model is Transformers' own Qwen3-MoE built from a small config with random weights
(hidden 256, 4 layers, 8 experts, top-2, expert width 512, vocabulary 1024); a step is a
forward and backward over 4 × 128 tokens and an AdamW update. LoRA r = 8, α = 16 on W_q and
W_v (attention alone), plus every expert's ``gate_up_proj`` and ``down_proj`` (experts).
loralab adds each routed token's low-rank update inside its own loop over the experts;
PEFT's ``ParamWrapper`` builds ``W + ΔW`` for every expert at each forward and runs the
model's own experts kernel on it.

Each side runs in a process of its own, the sides alternating and the order flipped every
round; a side's figure is the median step after 2 warm-up steps, the peak resident memory
of its process (``VmHWM``), and that peak above the memory it held before its first step.

    python benchmarks/bench_moe.py            # 2 rounds
    python benchmarks/bench_moe.py --write    # also writes benchmarks/results_moe.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from measure import (
    command_line,
    load_average,
    machine_line,
    median,
    now,
    peak_rss_mb,
    result_line,
    run_worker,
    status_mb,
)

RESULTS = Path(__file__).with_name("results_moe.md")
SIDES = ("loralab-attention", "loralab-experts", "peft-attention", "peft-experts")
WARMUP, STEPS, BATCH, LENGTH = 2, 6, 4, 128
SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    intermediate_size=1024,
    moe_intermediate_size=512,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)


def _model(shape: dict):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape))
    with torch.no_grad():  # routers and experts at a scale where routing varies
        for name, parameter in model.named_parameters():
            if ".experts." in name or name.endswith("gate.weight"):
                parameter.normal_(0.0, 0.05)
    return model


def adapted(side: str, shape: dict = SHAPE, dtype: torch.dtype = torch.float32):
    """The model of ``shape`` in ``dtype`` with the side's adapter (``loralab-experts``,
    ``peft-attention``…); both libraries keep fp32 factors on a half-precision base."""
    library, targets = side.split("-")
    model = _model(shape).to(dtype)
    experts = ["gate_up_proj", "down_proj"] if targets == "experts" else None
    if library == "loralab":
        from loralab import LoraConfig, inject_adapter

        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=experts
        )
        return inject_adapter(model, config)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=experts
    )
    return get_peft_model(model, config)


def train_steps(
    model, optimizer, ids: torch.Tensor, synchronize=lambda: None
) -> tuple[list[float], list[float]]:
    """``WARMUP + STEPS`` training steps on ``ids``: the seconds of each step after the
    warm-up (``synchronize`` waits for a device's queue before the clock is read), and
    every step's loss."""
    times, losses = [], []
    for step in range(WARMUP + STEPS):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    return times, losses


def measure(side: str) -> dict:
    model = adapted(side).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    ids = torch.randint(
        0, SHAPE["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1)
    )
    held = status_mb("VmRSS") or 0.0
    times, losses = train_steps(model, optimizer, ids)
    peak = peak_rss_mb()
    return {
        "step_ms": 1e3 * median(times),
        "peak_mb": peak,
        "step_peak_mb": peak - held,
        "trainable": sum(p.numel() for p in parameters),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def worker(arguments: list[str]) -> None:
    result_line(measure(arguments[0]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
        for side in order:
            results[side].append(run_worker(__file__, [side], f"round {round_ + 1}: {side}"))

    def figure(side: str, key: str) -> float:
        return median([r[key] for r in results[side]])

    rows = []
    for side in SIDES:
        library, targets = side.split("-")
        peft_side = f"peft-{targets}"
        ratio = figure(side, "step_ms") / figure(peft_side, "step_ms")
        memory = figure(side, "step_peak_mb") / figure(peft_side, "step_peak_mb")
        rows.append(
            f"| {library} | {targets} | {figure(side, 'trainable'):,.0f} | "
            f"{figure(side, 'step_ms'):.0f} | {ratio:.2f}× | {figure(side, 'peak_mb'):.0f} | "
            f"{figure(side, 'step_peak_mb'):.0f} | {memory:.2f}× | "
            f"{figure(side, 'first_loss'):.3f} → {figure(side, 'last_loss'):.3f} |"
        )
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    text = "\n".join(
        [
            "# LoRA on a mixture of experts: loralab against PEFT (target_parameters)",
            "",
            f"- Command: `{command_line(__file__)}`; {now()}; load average {load_average()}",
            f"- Machine: {machine_line()}",
            f"- Transformers' Qwen3-MoE from a config ({shape}), random weights; a step is "
            f"forward + backward over {BATCH} × {LENGTH} tokens and an AdamW update; LoRA "
            "r = 8, α = 16 on W_q, W_v (attention), plus every expert's gate_up_proj and "
            f"down_proj (experts); medians of {STEPS} steps after {WARMUP} warm-up steps, "
            f"over {args.rounds} rounds, each side in its own process, sides alternated",
            "",
            "| library | adapted | trainable | ms a step | × PEFT | peak RSS MB | "
            "above the loaded model, MB | × PEFT | loss, first → last step |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if args.write:
        RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
