"""GRPO rollouts: sampled tokens per second while a GRPO step samples its completions,
loralab (its engine, per-row seeds, each row leaving the batch when it stops; and the same
through a ``loralab serve`` with ``--rollout-server``) against TRL's ``GRPOTrainer`` with
PEFT (Transformers' ``generate`` on the PEFT model), on this CPU; and the time of a whole
loralab GRPO step beside it.

Equal settings: SmolLM2-135M in fp32, LoRA r = 8, α = 16 on W_q and W_v (B at zero, as a
run starts), the same 4 sql prompts, G = 8 completions each (32 rows), at most 32 new
tokens, temperature 1, top-p 1, ending at the end-of-sequence token only (TRL's rule).
A side's figure is the completion tokens it sampled (up to and including the end token)
over the seconds its rollout call took: loralab's ``grpo_step.sample`` (rewards aside),
TRL's ``GRPOTrainer._generate`` (tokenizing, generating, decoding). Each side runs one
warm-up rollout, then ``REPS`` timed ones, each with new seeds.

Every measurement runs in a process of its own, the sides alternating, the order flipped
every round; the figures are medians over rounds.

    python benchmarks/bench_grpo.py            # 2 rounds
    python benchmarks/bench_grpo.py --write    # also writes benchmarks/results_grpo.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import command_line, load_average, machine_line, median, now, result_line, run_worker

MODEL = "smollm2-135m"
RESULTS = Path(__file__).with_name("results_grpo.md")
PROMPTS, GROUP, NEW_TOKENS, REPS = 4, 8, 32, 3
SIDES = ("loralab", "server", "trl", "floor")


def _prompts() -> list[dict]:
    from loralab.tasks import get_task

    return get_task("sql").splits(seed=0, train_size=200)["train"][:PROMPTS]


def _model():
    from loralab.models.loading import load_model

    return load_model(MODEL)


def loralab_rollouts(generate=None) -> dict:
    """loralab's rollouts through its engine here, or through ``generate`` (a rollout
    server); with a server, also the seconds a step spent writing and loading the adapter."""
    from loralab import LoraConfig, inject_adapter
    from loralab.training.objectives.grpo_step import (
        Sampling,
        encode_prompts,
        engine_rollouts,
        sample,
    )

    model, tokenizer = _model()
    inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    prompts = encode_prompts(tokenizer, _prompts(), 256)
    sampling = Sampling(GROUP, NEW_TOKENS, 1.0, 1.0, (tokenizer.eos_token_id,))
    figures = []
    for rep in range(REPS + 1):
        started = time.perf_counter()
        rollouts = sample(
            model,
            tokenizer,
            prompts,
            sampling,
            0,
            rep,
            lambda completions, **_: [0.0] * len(completions),
            "group",
            set(),
            generate or engine_rollouts,
        )
        seconds = time.perf_counter() - started
        sync = getattr(generate, "sync_seconds", 0.0)
        if rep:  # the first is the warm-up
            figures.append((rollouts.sampled_tokens, rollouts.seconds, seconds, sync))
    tokens = sum(f[0] for f in figures)
    return {
        "tokens_per_s": tokens / sum(f[1] for f in figures),
        "mean_tokens": tokens / len(figures) / (PROMPTS * GROUP),
        "seconds_per_rollout": sum(f[2] for f in figures) / len(figures),
        "sync_seconds": sum(f[3] for f in figures) / len(figures),
    }


def server_rollouts() -> dict:
    """The same rollouts on a ``loralab serve`` in this process (``--rollout-server``):
    each rollout writes the adapter and loads it there in place, then 32 requests. On one
    machine the server shares its cores with nothing else, so this is the cost of going
    through HTTP and the server's per-request sampler, not the scale-out a second machine
    gives."""
    from loralab.serve import BackgroundServer, ServeOptions, build_state
    from loralab.training.objectives.rollout_server import RolloutServer

    with tempfile.TemporaryDirectory() as folder:
        options = ServeOptions(model=MODEL, adapter_dir=Path(folder), max_batch=PROMPTS * GROUP)
        with BackgroundServer(build_state(options)) as server:
            rollouts = RolloutServer(server.url, Path(folder) / "policy", "grpo-bench")
            return loralab_rollouts(rollouts)


def floor() -> dict:
    """The same rows decoded greedily through the engine to the lengths loralab's sampled
    completions had (no sampling at all): the forward passes alone, below which no
    sampler on this model and CPU goes."""
    from loralab import LoraConfig, inject_adapter
    from loralab.engine import decode

    model, tokenizer = _model()
    inject_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.eval()
    rows = [p["input_ids"] for p in _encoded(tokenizer) for _ in range(GROUP)]
    figures = []
    for rep in range(REPS + 1):
        started = time.perf_counter()
        completions = decode(model, rows, NEW_TOKENS)
        seconds = time.perf_counter() - started
        if rep:
            figures.append((sum(map(len, completions)), seconds))
    return {
        "tokens_per_s": sum(f[0] for f in figures) / sum(f[1] for f in figures),
        "mean_tokens": NEW_TOKENS,
        "seconds_per_rollout": sum(f[1] for f in figures) / len(figures),
    }


def _encoded(tokenizer) -> list[dict]:
    return [{"input_ids": tokenizer(p["prompt"])["input_ids"]} for p in _prompts()]


def trl_rollouts() -> dict:
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = _model()
    records = [{"prompt": p["prompt"]} for p in _prompts()]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda prompts, completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=PeftLoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
    )
    rows = [r["prompt"] for r in records for _ in range(GROUP)]
    eos = tokenizer.eos_token_id
    figures = []
    for rep in range(REPS + 1):
        torch.manual_seed(rep)
        started = time.perf_counter()
        output = trainer._generate(rows)
        seconds = time.perf_counter() - started
        completion_ids = output[1]  # (prompt_ids, completion_ids, …): one list per row
        sampled = sum(_up_to_end(ids, eos) for ids in completion_ids)
        if rep:
            figures.append((sampled, seconds))
    tokens = sum(f[0] for f in figures)
    seconds = sum(f[1] for f in figures)
    return {
        "tokens_per_s": tokens / seconds,
        "mean_tokens": tokens / len(figures) / (PROMPTS * GROUP),
        "seconds_per_rollout": seconds / len(figures),
    }


def _up_to_end(ids, eos: int) -> int:
    ids = list(ids)
    return ids.index(eos) + 1 if eos in ids else len(ids)


def loralab_step() -> dict:
    """A whole loralab GRPO step (rollouts, rewards, forward and backward, update) on sql
    with its execution reward: the median of 3 steps after the first."""
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train

    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig(
            model=MODEL,
            task="sql",
            train_size=200,
            objective="grpo",
            batch_size=PROMPTS,
            num_generations=GROUP,
            max_new_tokens=NEW_TOKENS,
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            max_steps=4,
            save_every=0,
            eval_every=0,
            progress=False,
            output_dir=folder,
        )
        train(config)
        lines = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward" in x][1:]
    return {
        "step_seconds": median([x["seconds"] for x in steps]),
        "rollout_seconds": median([x["rollout_seconds"] for x in steps]),
    }


WORKERS = {
    "loralab": loralab_rollouts,
    "trl": trl_rollouts,
    "floor": floor,
    "server": server_rollouts,
    "loralab-step": loralab_step,
}


def worker(arguments: list[str]) -> None:
    torch.manual_seed(0)
    result_line(WORKERS[arguments[0]]())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {side: [] for side in WORKERS}
    for round_ in range(args.rounds):
        order = list(SIDES) if round_ % 2 == 0 else list(reversed(SIDES))
        for side in order:
            results[side].append(run_worker(__file__, [side], f"round {round_ + 1}: {side}"))
    results["loralab-step"].append(run_worker(__file__, ["loralab-step"], "a loralab GRPO step"))
    ours = median([r["tokens_per_s"] for r in results["loralab"]])
    theirs = median([r["tokens_per_s"] for r in results["trl"]])
    limit = median([r["tokens_per_s"] for r in results["floor"]])
    ratios = [
        a["tokens_per_s"] / b["tokens_per_s"]
        for a, b in zip(results["loralab"], results["trl"], strict=True)
    ]
    step = results["loralab-step"][0]
    served = median([r["tokens_per_s"] for r in results["server"]])
    sync = median([r["sync_seconds"] for r in results["server"]])
    rows = [
        f"| loralab (engine) | {ours:.0f} | **{ours / theirs:.2f}×** "
        f"[{min(ratios):.2f}–{max(ratios):.2f}] | "
        f"{median([r['mean_tokens'] for r in results['loralab']]):.1f} | "
        f"{median([r['seconds_per_rollout'] for r in results['loralab']]):.2f} |",
        f"| loralab on a `loralab serve` in the same process (`--rollout-server`) | "
        f"{served:.0f} | {served / theirs:.2f}× | "
        f"{median([r['mean_tokens'] for r in results['server']]):.1f} | "
        f"{median([r['seconds_per_rollout'] for r in results['server']]):.2f} |",
        f"| the floor: the same rows decoded greedily (forwards alone) | {limit:.0f} | "
        f"{limit / theirs:.2f}× | {NEW_TOKENS} | "
        f"{median([r['seconds_per_rollout'] for r in results['floor']]):.2f} |",
        f"| TRL `GRPOTrainer` + PEFT | {theirs:.0f} | 1.00× | "
        f"{median([r['mean_tokens'] for r in results['trl']]):.1f} | "
        f"{median([r['seconds_per_rollout'] for r in results['trl']]):.2f} |",
    ]
    text = "\n".join(
        [
            "# GRPO rollouts: loralab's engine against TRL's GRPOTrainer (PEFT)",
            "",
            f"- Command: `{command_line(__file__)}`; {now()}; load average {load_average()}",
            f"- Machine: {machine_line()}",
            f"- {PROMPTS} sql prompts × G = {GROUP}, at most {NEW_TOKENS} new tokens, "
            "temperature 1, "
            f"SmolLM2-135M fp32, LoRA r = 8 on W_q, W_v; medians over {args.rounds} rounds "
            f"of {REPS} rollouts each, sides alternated",
            "",
            "| side | sampled tokens/s | × TRL | tokens a completion | s a rollout batch |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"With `--rollout-server`, writing the adapter and loading it on the server "
            f"(`load_inplace`) took {sync:.3f} s a step of those seconds; the server shares "
            "this machine's 2 cores with the client, so its figure is the cost of HTTP and "
            "the server's sampler, not the scale-out a second machine gives.",
            "",
            f"A whole loralab GRPO step on sql (rollouts, execution rewards, forward and backward "
            f"of the 32 completions, update): {step['step_seconds']:.2f} s, of which rollouts "
            f"{step['rollout_seconds']:.2f} s (median of 3 steps after the first).",
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
