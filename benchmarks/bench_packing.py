"""Packing: tokens that carry loss per second, loralab with ``--packing`` against loralab
without it and against TRL's ``SFTTrainer`` (with PEFT) with and without ``packing=True``,
on the same records, ``max_length`` and batch (rows per step), on this CPU.

Two datasets of short examples: the ``e2e`` task's records (prompt and completion, the
loss on the completion) and chats whose lengths follow a skewed distribution (most turns
20–60 tokens, one chat in twelve with a reply of 400+; the loss on the assistant's turn),
written once as JSONL that every side reads. Equal settings: SmolLM2-135M in fp32, LoRA
r = 8, α = 16 on W_q and W_v, dropout 0.05, AdamW (lr 2e-4, weight decay 0.01,
constant), clipping at 1.0, batches of 4 rows of at most 512 tokens. Each side's steps are
timed after one warm-up step (loralab's from its ``metrics.jsonl``, TRL's by a callback
around each step); a step's tokens that carry loss are counted from its labels (TRL's by
its ``compute_loss``). The fill is those tokens over the tokens a step computes, padding
included (TRL's packing is padding-free: one flat row per batch, whose attention covers
the whole batch's length).

Every measurement runs in a process of its own, the sides alternating, the order flipped
every round; the figures are medians over rounds.

    python benchmarks/bench_packing.py            # 2 rounds
    python benchmarks/bench_packing.py --write    # also writes benchmarks/results_packing.md
    python benchmarks/bench_train.py --packing    # the same
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
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
)

MODEL = "smollm2-135m"
RESULTS = Path(__file__).with_name("results_packing.md")
MAX_LENGTH = 512
BATCH = 4
SETTINGS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "learning_rate": 2e-4,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "seed": 0,
}
# The steps each side runs (one warm-up first): about the same examples on every side.
STEPS = {"plain": 16, "packed": 4}
SIDES = ("loralab", "loralab-packed", "trl", "trl-packed")
DATASETS = ("e2e", "chat")
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell"
)
WORDS = _WORDS.split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def chat_records(count: int, seed: int = 0) -> list[dict]:
    """Chats of skewed lengths: most a short question and a 15–45-word reply, one in
    twelve a reply of 320–400 words (400+ tokens)."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        question = _sentence(rng, rng.randint(8, 30))
        long = index % 12 == 5
        reply = _sentence(rng, rng.randint(320, 400) if long else rng.randint(15, 45))
        messages = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ]
        records.append({"messages": messages})
    return records


def e2e_records(count: int) -> list[dict]:
    from loralab.tasks import get_task

    return get_task("e2e").splits(seed=0, train_size=count)["train"][:count]


def write_data(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, records in (("e2e", e2e_records(512)), ("chat", chat_records(384))):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


# -- the sides ----------------------------------------------------------------------------------


def loralab_worker(data: Path, packed: bool, output: Path, steps: int) -> dict:
    from loralab.data.batches import length_grouped_order
    from loralab.data.packing import fill
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train

    config = TrainConfig(
        model=MODEL,
        data=str(data),
        output_dir=str(output),
        max_steps=steps + 1,
        max_length=MAX_LENGTH,
        batch_size=BATCH,
        packing=packed,
        target_modules=["q", "v"],
        schedule="constant",
        warmup_steps=0,
        eval_every=0,
        save_every=0,
        progress=False,
        **SETTINGS,
    )
    result = train(config)
    rows = result.datasets.rows
    lines = (output / "metrics.jsonl").read_text().splitlines()
    entries = [e for e in map(json.loads, lines) if "loss" in e][1:]  # after the warm-up
    seconds = sum(e["seconds"] for e in entries)
    learnt = sum(e["loss_tokens_per_s"] * e["seconds"] for e in entries)
    return {
        "loss_tokens_per_s": learnt / seconds,
        "step_seconds": median([e["seconds"] for e in entries]),
        "fill": fill(rows, length_grouped_order([len(r) for r in rows], BATCH, config.seed, 0)),
        "rows": len(result.datasets.rows),
        "examples": len(result.datasets.train),
        "peak_rss_mb": peak_rss_mb(),
    }


SMOLLM2_TURN = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)


def with_generation_markers(template: str) -> str:
    """SmolLM2's chat template with ``{% generation %}`` around each assistant reply (what
    loralab counts without markers: the reply, <|im_end|> and the newline after it)."""
    if SMOLLM2_TURN not in template:
        raise SystemExit("the model's chat template is not SmolLM2's: mark it by hand")
    marked = (
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    )
    return template.replace(SMOLLM2_TURN, marked)


def trl_worker(data: Path, packed: bool, output: Path, steps: int, chat: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loralab.models.loading import load_model

    torch.manual_seed(SETTINGS["seed"])
    model, tokenizer = load_model(MODEL)
    if chat:  # TRL cannot patch SmolLM2's template itself: the same one, marked
        tokenizer.chat_template = with_generation_markers(tokenizer.chat_template)
    records = datasets.load_dataset("json", data_files=str(data), split="train")
    counted: list[int] = []
    computed: list[int] = []
    seconds: list[float] = []

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            labels = inputs["labels"]
            counted.append(int((labels[..., 1:] != -100).sum()))
            computed.append(labels.numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.start)

    arguments = SFTConfig(
        output_dir=str(output),
        per_device_train_batch_size=BATCH,
        max_steps=steps + 1,
        learning_rate=SETTINGS["learning_rate"],
        weight_decay=SETTINGS["weight_decay"],
        max_grad_norm=SETTINGS["max_grad_norm"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=SETTINGS["seed"],
        max_length=MAX_LENGTH,
        packing=packed,
        assistant_only_loss=chat,
        dataloader_num_workers=0,
        bf16=False,  # TRL's defaults: bf16 autocast and gradient checkpointing; the
        gradient_checkpointing=False,  # sides compare in fp32, without recomputation
    )
    lora = LoraConfig(
        r=SETTINGS["r"],
        lora_alpha=SETTINGS["lora_alpha"],
        lora_dropout=SETTINGS["lora_dropout"],
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    trainer = Counting(
        model=model,
        args=arguments,
        train_dataset=records,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    trainer.train()
    timed = seconds[1:]
    learnt = counted[1 : len(seconds)]
    return {
        "loss_tokens_per_s": sum(learnt) / sum(timed),
        "step_seconds": median(timed),
        "fill": sum(counted) / sum(computed),
        "rows": None,
        "examples": len(records),
        "peak_rss_mb": peak_rss_mb(),
    }


def worker(arguments: list[str]) -> None:
    side, dataset, data, steps = arguments[0], arguments[1], Path(arguments[2]), int(arguments[3])
    packed = side.endswith("-packed")
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as scratch:
        output = Path(scratch) / "run"
        if side.startswith("loralab"):
            result_line(loralab_worker(data, packed, output, steps))
        else:
            result_line(trl_worker(data, packed, output, steps, chat=dataset == "chat"))


# -- the driver and the table -------------------------------------------------------------------


def driver(write: bool, rounds: int, sides: tuple[str, ...]) -> None:
    start = time.perf_counter()
    load_before = load_average()
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as scratch:
        paths = write_data(Path(scratch))
        for index in range(rounds):
            order = sides[::-1] if index % 2 else sides
            for dataset in DATASETS:
                for side in order:
                    label = f"round {index + 1}: {dataset}, {side}"
                    steps = STEPS["packed" if side.endswith("-packed") else "plain"]
                    arguments = [side, dataset, str(paths[dataset]), str(steps)]
                    results.setdefault((dataset, side), []).append(
                        run_worker(__file__, arguments, label)
                    )
    header = {
        "command": command_line(sys.argv[0]),  # bench_train.py --packing, or this script
        "date": now(),
        "took": f"{(time.perf_counter() - start) / 60:.1f} min",
        "machine": machine_line(),
        "load": f"{load_before} before, {load_average()} after",
        "rounds": rounds,
    }
    report = render(header, results, sides)
    print(report)
    if write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"written to {RESULTS}", file=sys.stderr)


def render(header: dict, results: dict, sides: tuple[str, ...]) -> str:
    lines = [
        "# Packing: tokens that carry loss per second",
        "",
        f"`{header['command']}` — {header['date']}, {header['took']}; {header['machine']}; "
        f"load {header['load']}; {header['rounds']} round(s), medians.",
        "",
        f"Batches of {BATCH} rows of at most {MAX_LENGTH} tokens on every side; SmolLM2-135M, "
        "fp32, LoRA r = 8 on W_q, W_v. *Fill*: tokens carrying loss / tokens computed.",
        "",
        "| data | side | loss tokens/s | × loralab unpacked | fill | step (s) | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in DATASETS:
        base = [r["loss_tokens_per_s"] for r in results.get((dataset, "loralab"), [])]
        for side in sides:
            runs = results.get((dataset, side))
            if not runs:
                continue
            speed = [r["loss_tokens_per_s"] for r in runs]
            ratios = [s / b for s, b in zip(speed, base, strict=False)] if base else []
            ratio = ""
            if ratios:
                spread = f" [{min(ratios):.2f}–{max(ratios):.2f}]" if len(ratios) > 1 else ""
                ratio = f"{median(ratios):.2f}×{spread}"
            lines.append(
                f"| {dataset} | {side} | {median(speed):.0f} | {ratio} | "
                f"{100 * median([r['fill'] for r in runs]):.1f}% | "
                f"{median([r['step_seconds'] for r in runs]):.2f} | "
                f"{median([r['peak_rss_mb'] for r in runs]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    args = parser.parse_args(argv)
    driver(args.write, args.rounds, tuple(args.sides))


if __name__ == "__main__":
    main()
