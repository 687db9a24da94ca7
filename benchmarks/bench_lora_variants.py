"""PiSSA, OLoRA and LoRA+ against plain LoRA on the demo's run (issue 29).

Each variant trains as ``loralab demo`` does (SmolLM2-135M-Instruct, LoRA r = 8, α = 16
on W_q and W_v, 60 steps of the e2e task, learning rate 2e-3), with only its own setting
changed, and is scored on the demo's 64 test examples (raw prompt, greedy): BLEU and
ROUGE-L for each seed, their mean, and the difference from LoRA's. The same settings for
all, so a variant that wants another learning rate shows it here.

    python benchmarks/bench_lora_variants.py [--seeds 2] [--write]

``--write`` puts the table in benchmarks/results_lora_variants.md. About 2.5 min a run on
2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loralab.demo import DEMO_TEST_SIZE, WORKED_EXAMPLES, demo_config
from loralab.evaluate import evaluate_task
from loralab.tasks import get_task
from loralab.training.loop import train

VARIANTS = {
    "LoRA": {},
    "PiSSA (init=pissa)": {"init": "pissa"},
    "OLoRA (init=olora)": {"init": "olora"},
    "LoRA+ (loraplus_lr_ratio=16)": {"loraplus_lr_ratio": 16.0},
}
RESULTS = Path(__file__).with_name("results_lora_variants.md")


def run(settings: dict, seed: int, workdir: Path) -> tuple[dict, float]:
    config = dataclasses.replace(demo_config(workdir / "run", seed=seed), progress=False)
    config = dataclasses.replace(config, **settings)
    started = time.perf_counter()
    result = train(config)
    task = get_task("e2e")
    test = task.splits(seed=seed, train_size=WORKED_EXAMPLES, test_size=DEMO_TEST_SIZE)["test"]
    scored = evaluate_task(result.model, result.tokenizer, task, test, batch_size=32)
    return scored.metrics, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    scores: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):  # the variants alternate within each seed
        for name, settings in VARIANTS.items():
            with tempfile.TemporaryDirectory() as workdir:
                metrics, seconds = run(settings, seed, Path(workdir))
            scores[name].append(metrics)
            print(
                f"{name}, seed {seed}: BLEU {metrics['bleu']:.2f}, "
                f"ROUGE-L {metrics['rouge_l']:.2f} ({seconds:.0f} s)",
                flush=True,
            )
    base = {k: statistics.mean(m[k] for m in scores["LoRA"]) for k in ("bleu", "rouge_l")}
    lines = [
        "| variant | BLEU per seed | mean BLEU | vs LoRA "
        "| ROUGE-L per seed | mean ROUGE-L | vs LoRA |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name, runs in scores.items():
        cells = []
        for key in ("bleu", "rouge_l"):
            mean = statistics.mean(m[key] for m in runs)
            each = " / ".join(f"{m[key]:.2f}" for m in runs)
            cells += [each, f"{mean:.2f}", f"{mean - base[key]:+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        header = (
            "# LoRA variants on the demo's run\n\n"
            f"`python benchmarks/bench_lora_variants.py --seeds {args.seeds} --write` on "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; seeds 0..{args.seeds - 1}, each variant "
            "trained and scored as `loralab demo` does, with only its own setting changed.\n\n"
        )
        RESULTS.write_text(header + table + "\n")
        print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
