"""``loralab demo``: LoRA on a real pre-trained model, before and after, on a CPU.

On the embedded SmolLM2-135M-Instruct it scores the base model on the ``e2e`` task,
trains LoRA (W_q and W_v, r = 8, as in the paper), scores again, merges, and reports the
metric, trainable parameters against the total, adapter size against the model's, and
the merged model's latency against the base's, with a few generated examples.

The baseline is the base model asked as its makers intend: through its chat template,
with a one-line instruction and one worked example (``E2ETask.chat_messages``). The
same model on the raw prompt, which it was never trained to complete, is reported too,
labelled as such; the adapter is scored on the raw prompt it was trained on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .evaluate import evaluate_task
from .files.adapter_dir import WEIGHTS_FILE
from .files.atomic_write import json_writer, write_files_atomically
from .files.output_dirs import check_output_dir
from .lora.merge import merge_and_unload
from .models.devices import choose_device, model_device
from .tasks.task import LOWER_IS_BETTER, as_text
from .training.config import TrainConfig
from .training.loop import train

DEMO_STEPS = 60  # about 4 s each on 2 cores: the demo stays well inside 10 minutes
DEMO_TEST_SIZE = 64
WORKED_EXAMPLES = 1  # shown to the base model before each question (chat baseline)
COLUMNS = {
    "base_raw_prompt": "base, raw prompt",
    "base": "base, chat template + instruction + 1 example",
    "adapted": "with LoRA (raw prompt, as trained)",
}


@dataclass
class DemoReport:
    base: dict[str, float]
    """The baseline: the base model through its chat template, instruction and example."""
    base_raw_prompt: dict[str, float]
    """The base model on the raw prompt ("MR\\nDescription:"), as the adapter sees it."""
    adapted: dict[str, float]
    trainable: int
    total: int
    adapter_bytes: int
    model_bytes: int
    base_latency_ms: float
    merged_latency_ms: float
    train_seconds: float
    baseline_chat: list[dict]
    """The chat the base model got for the first test example (the others differ only in
    their meaning representation)."""
    examples: list[dict]
    lower_is_better: list[str] = field(default_factory=list)
    """The metrics of which less is better (e2e's slot errors); more, for the others."""

    def table(self) -> str:
        scores = [("metric", *COLUMNS.values())]
        for name in self.base:
            scores.append((name, *(f"{getattr(self, column)[name]:.2f}" for column in COLUMNS)))
        costs = [
            ("", "base model", "with LoRA"),
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
        return _markdown_table(scores) + "\n\n" + _markdown_table(costs)


def _markdown_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
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
    tokens = tokens.to(model_device(model))
    for _ in range(2):
        model(tokens)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(tokens)
        if tokens.device.type == "cuda":  # a GPU's work is queued: wait for it
            torch.cuda.synchronize(tokens.device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def demo_config(output_dir: str | Path, steps: int = DEMO_STEPS, seed: int = 0) -> TrainConfig:
    """The demo's run: LoRA on W_q and W_v of the embedded model, r = 8, α = 16, for the
    e2e task (the benchmarks of the LoRA variants start from it too)."""
    from .models.embedded import DEFAULT_CAUSAL_LM

    return TrainConfig(
        model=DEFAULT_CAUSAL_LM,
        task="e2e",
        output_dir=str(output_dir),
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


def run_demo(
    output_dir: str | Path = "runs/demo",
    steps: int = DEMO_STEPS,
    test_size: int = DEMO_TEST_SIZE,
    seed: int = 0,
) -> DemoReport:
    from .models.embedded import DEFAULT_CAUSAL_LM
    from .models.loading import load_model
    from .tasks import get_task

    # Everything that can be refused is refused before the model loads.
    output_dir = check_output_dir(output_dir, "--output-dir")
    config = demo_config(output_dir / "run", steps, seed)
    task = get_task("e2e")
    splits = task.splits(seed=seed, train_size=WORKED_EXAMPLES, test_size=test_size)
    test, shots = splits["test"], splits["train"]  # the shots come from the training data
    started = time.perf_counter()
    print(f"loading {DEFAULT_CAUSAL_LM} (the embedded default model) …", flush=True)
    model, tokenizer = load_model(DEFAULT_CAUSAL_LM)
    model.to(choose_device())  # the GPU when there is one; training stays there too
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(
        f"the base: {model_bytes / 1e6:.0f} MB of dense {dtype} weights, dequantized from the "
        "shipped GGUF (`loralab train --quantized-base gguf` trains over its packed weights)",
        flush=True,
    )
    generator = torch.Generator().manual_seed(0)
    latency_input = torch.randint(0, tokenizer.vocab_size, (1, 64), generator=generator)
    base_latency = forward_latency_ms(model, latency_input)

    print(f"scoring the base model on {len(test)} e2e test examples, raw prompt …", flush=True)
    base_raw = evaluate_task(model, tokenizer, task, test, batch_size=32, progress="score")
    print("… and through its chat template, instruction and one worked example …", flush=True)
    base = evaluate_task(
        model, tokenizer, task, test, batch_size=32, chat_shots=shots, progress="score"
    )
    print(f"training LoRA (W_q, W_v, r = 8) for {steps} steps …", flush=True)
    result = train(config, model=model, tokenizer=tokenizer)
    print(f"scoring the adapted model on the same {len(test)} examples …", flush=True)
    adapted = evaluate_task(model, tokenizer, task, test, batch_size=32, progress="score")
    adapter_bytes = (result.adapter_dir / WEIGHTS_FILE).stat().st_size
    merged = merge_and_unload(model, safe=True)
    merged_latency = forward_latency_ms(merged, latency_input)
    examples = [
        {
            "input": example["meaning_representation"],
            "reference": example["completion"].strip(),
            "base_raw_prompt": as_text(raw),
            "base": as_text(chat),
            "lora": as_text(after),
        }
        for example, raw, chat, after in zip(
            test[:4], base_raw.predictions, base.predictions, adapted.predictions, strict=False
        )
    ]
    report = DemoReport(
        base=base.metrics,
        base_raw_prompt=base_raw.metrics,
        adapted=adapted.metrics,
        trainable=result.trainable,
        total=result.total,
        adapter_bytes=adapter_bytes,
        model_bytes=model_bytes,
        base_latency_ms=base_latency,
        merged_latency_ms=merged_latency,
        train_seconds=result.seconds,
        baseline_chat=task.chat_messages(test[0], shots),
        examples=examples,
        lower_is_better=sorted(LOWER_IS_BETTER & set(base.metrics)),
    )
    _write(report, output_dir, time.perf_counter() - started, result)
    return report


def _gain(name: str, value: float, report: DemoReport) -> str:
    fewer = " (fewer is better)" if name in report.lower_is_better else ""
    return f"{name} {value:+.2f}{fewer}"


def _write(report: DemoReport, output_dir: Path, seconds: float, result) -> None:
    gain = {name: report.adapted[name] - report.base[name] for name in report.base}
    lines = [
        "# loralab demo: LoRA on SmolLM2-135M-Instruct, e2e task",
        "",
        report.table(),
        "",
        "LoRA against the baseline (the base model through its chat template): "
        + ", ".join(_gain(name, value, report) for name, value in gain.items())
        + f". Training: {result.steps} steps in {report.train_seconds:.0f} s; whole demo "
        f"{seconds:.0f} s. Adapter: `{result.adapter_dir}`; "
        f"loss curve: `{result.run_dir / 'loss.png'}`.",
        "",
        "The baseline's chat (the template adds its default system prompt):",
        "",
        *(f"> **{m['role']}**: {m['content']}".replace("\n", " ") for m in report.baseline_chat),
        "",
        "## Examples",
    ]
    for example in report.examples:
        lines += [
            "",
            f"- input: `{example['input']}`",
            f"  - reference: {example['reference']}",
            f"  - base, raw prompt: {example['base_raw_prompt']}",
            f"  - base, chat template: {example['base']}",
            f"  - LoRA: {example['lora']}",
        ]
    text = "\n".join(lines) + "\n"
    output_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomically(
        output_dir,
        {
            "report.md": lambda path: Path(path).write_text(text, encoding="utf-8"),
            "report.json": json_writer({**asdict(report), "seconds": seconds}),
        },
    )
    print("\n" + text)
