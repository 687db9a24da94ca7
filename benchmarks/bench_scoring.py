"""The time a user waits for scores: the e2e task scored by greedy generation, on loralab's
engine against Transformers' ``generate`` (``--engine hf``), as every ``reproduce`` run,
``loralab eval`` and the demo score.

SmolLM2-135M-Instruct with a LoRA (r = 8 on q and v, the methods experiment's arm,
random non-zero factors) unmerged, and with the bare base; ``evaluate_task`` on the e2e
test prompts in batches of 32 (what ``reproduce`` uses), 64 new tokens at most, the first
line scored. The two engines alternate within each round, in one process; the scores of
both are printed too (the same outputs give the same scores).

    python benchmarks/bench_scoring.py [--examples N] [--rounds N] [--write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from measure import command_line, load_average, machine_line, median, now

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="also write results_scoring.md")
    args = parser.parse_args()
    from loralab import LoraConfig, inject_adapter
    from loralab.evaluate import evaluate_task
    from loralab.lora.adapters import set_active_adapter
    from loralab.models.loading import load_model
    from loralab.tasks import get_task

    load_before = load_average()
    model, tokenizer = load_model("smollm2-135m")
    inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    task = get_task("e2e")
    test = task.splits(test_size=args.examples)["test"]
    seconds: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], dict] = {}
    for round_index in range(args.rounds):
        engines = ("engine", "hf") if round_index % 2 == 0 else ("hf", "engine")
        for adapter in ("default", None):
            set_active_adapter(model, adapter)
            for engine in engines:
                from loralab.generate import use_engine

                use_engine(engine)
                start = time.perf_counter()
                result = evaluate_task(model, tokenizer, task, test, batch_size=32)
                key = (adapter or "base", engine)
                seconds.setdefault(key, []).append(time.perf_counter() - start)
                scores[key] = result.metrics
                print(f"{key}: {seconds[key][-1]:.1f} s {result.metrics}", flush=True)
    lines = [
        "# Scoring by generation: loralab's engine against Transformers' `generate`",
        "",
        f"`{command_line(__file__)}`, {now()}; {machine_line()}; load average before "
        f"{load_before}, after {load_average()}.",
        "",
        f"SmolLM2-135M-Instruct, `evaluate_task` on {args.examples} e2e test prompts, batches "
        f"of 32, at most {task.max_new_tokens} new tokens, the first line scored; medians of "
        f"{args.rounds} rounds, the engines alternated.",
        "",
        "| model | engine | seconds | × Transformers | BLEU | ROUGE-L |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model_name in ("default", "base"):
        hf = median(seconds[(model_name, "hf")])
        for engine in ("hf", "engine"):
            s = median(seconds[(model_name, engine)])
            m = scores[(model_name, engine)]
            label = "LoRA r=8 on q, v (unmerged)" if model_name == "default" else "the base"
            name = "loralab's engine" if engine == "engine" else "Transformers' `generate`"
            lines.append(
                f"| {label} | {name} | {s:.1f} | {hf / s:.2f} | {m['bleu']:.2f} | "
                f"{m['rouge_l']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (HERE / "results_scoring.md").write_text(text)


if __name__ == "__main__":
    main()
