"""``loralab demo``: LoRA on a real pre-trained model, before and after, on a CPU.

On the embedded SmolLM2-135M-Instruct it scores the base model on the ``e2e`` task,
trains LoRA (W_q and W_v, r = 8, as in the paper), scores again, merges, and reports the
metric, trainable parameters against the total, adapter size against the model's, and
the merged model's latency against the base's, with a few generated examples.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluate import evaluate_task
from .io import WEIGHTS_FILE
from .merge import merge_and_unload
from .train import TrainConfig, train

DEMO_STEPS = 60  # about 4 s each on 2 cores: the demo stays well inside 10 minutes
DEMO_TEST_SIZE = 64


@dataclass
class DemoReport:
    base: dict[str, float]
    adapted: dict[str, float]
    trainable: int
    total: int
    adapter_bytes: int
    model_bytes: int
    base_latency_ms: float
    merged_latency_ms: float
    train_seconds: float
    examples: list[dict]

    def table(self) -> str:
        rows = [("metric", "base model", "with LoRA")]
        for name in self.base:
            rows.append((name, f"{self.base[name]:.2f}", f"{self.adapted[name]:.2f}"))
        rows += [
            (
                "trainable parameters",
                f"{self.total - self.trainable:,} (all)",
                f"{self.trainable:,} ({100 * self.trainable / self.total:.3f}%)",
            ),
            (
                "size on disk",
                f"{self.model_bytes / 1e6:.1f} MB (fp32 weights)",
                f"{self.adapter_bytes / 1e6:.2f} MB (adapter)",
            ),
            (
                "latency, batch 1 × 64 tokens",
                f"{self.base_latency_ms:.1f} ms",
                f"{self.merged_latency_ms:.1f} ms (merged, "
                f"{self.merged_latency_ms / self.base_latency_ms:.2f}×)",
            ),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            for row in rows
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


@torch.no_grad()
def forward_latency_ms(model, tokens: torch.Tensor, repeats: int = 15) -> float:
    """Median wall time of one forward pass (after two warm-up passes)."""
    model.eval()
    for _ in range(2):
        model(tokens)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(tokens)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def run_demo(
    output_dir: str | Path = "runs/demo",
    steps: int = DEMO_STEPS,
    test_size: int = DEMO_TEST_SIZE,
    seed: int = 0,
) -> DemoReport:
    from .models import DEFAULT_CAUSAL_LM, load_model
    from .tasks import get_task

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"loading {DEFAULT_CAUSAL_LM} (the embedded default model) …", flush=True)
    model, tokenizer = load_model(DEFAULT_CAUSAL_LM)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    task = get_task("e2e")
    test = task.splits(seed=seed, test_size=test_size)["test"]
    generator = torch.Generator().manual_seed(0)
    latency_input = torch.randint(0, tokenizer.vocab_size, (1, 64), generator=generator)
    base_latency = forward_latency_ms(model, latency_input)

    print(f"scoring the base model on {len(test)} e2e test examples …", flush=True)
    base = evaluate_task(model, tokenizer, task, test, batch_size=32)
    config = TrainConfig(
        model=DEFAULT_CAUSAL_LM,
        task="e2e",
        output_dir=str(output_dir / "run"),
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q", "v"],
        learning_rate=2e-3,
        warmup_steps=max(steps // 10, 1),
        max_steps=steps,
        batch_size=8,
        max_length=96,
        eval_every=max(steps // 2, 1),
        save_every=0,
        seed=seed,
    )
    print(f"training LoRA (W_q, W_v, r = 8) for {steps} steps …", flush=True)
    result = train(config, model=model, tokenizer=tokenizer)
    print(f"scoring the adapted model on the same {len(test)} examples …", flush=True)
    adapted = evaluate_task(model, tokenizer, task, test, batch_size=32)
    adapter_bytes = (result.adapter_dir / WEIGHTS_FILE).stat().st_size
    merged = merge_and_unload(model, safe=True)
    merged_latency = forward_latency_ms(merged, latency_input)
    examples = [
        {
            "input": example["prompt"],
            "reference": example["completion"].strip(),
            "base": before.strip(),
            "lora": after.strip(),
        }
        for example, before, after in zip(
            test[:4], base.predictions, adapted.predictions, strict=False
        )
    ]
    report = DemoReport(
        base=base.metrics,
        adapted=adapted.metrics,
        trainable=result.trainable,
        total=result.total,
        adapter_bytes=adapter_bytes,
        model_bytes=model_bytes,
        base_latency_ms=base_latency,
        merged_latency_ms=merged_latency,
        train_seconds=result.seconds,
        examples=examples,
    )
    _write(report, output_dir, time.perf_counter() - started, result)
    return report


def _meaning_line(prompt: str) -> str:
    # The line of the prompt that holds the meaning representation (slot[value] pairs).
    lines = prompt.splitlines()
    return next((line for line in lines if "[" in line), lines[0] if lines else prompt)


def _write(report: DemoReport, output_dir: Path, seconds: float, result) -> None:
    lines = [
        "# loralab demo: LoRA on SmolLM2-135M-Instruct, e2e task",
        "",
        report.table(),
        "",
        f"Training: {result.steps} steps in {report.train_seconds:.0f} s; whole demo "
        f"{seconds:.0f} s. Adapter: `{result.adapter_dir}`; "
        f"loss curve: `{result.run_dir / 'loss.png'}`.",
        "",
        "## Examples",
    ]
    for example in report.examples:
        lines += [
            "",
            f"- input: `{_meaning_line(example['input'])}`",
            f"  - reference: {example['reference']}",
            f"  - base: {example['base']}",
            f"  - LoRA: {example['lora']}",
        ]
    text = "\n".join(lines) + "\n"
    (output_dir / "report.md").write_text(text, encoding="utf-8")
    data = {**report.__dict__, "seconds": seconds}
    (output_dir / "report.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    print("\n" + text)
