"""The server's text per token: ``TextStream.push`` against decoding the whole text.

Before, ``serve``'s stream decoded every token id of a completion at every new token,
and searched the stop strings from near the start: a completion of n tokens cost O(n²).
Now it decodes a window of a few tokens and feeds stop-string matchers one character at
a time. This prints the time of one ``push`` (with four stop strings that never occur)
at several lengths of text so far, beside the time of one decode of the whole text at
that length (what each token cost before), and their ratio, with SmolLM2's tokenizer.

    python benchmarks/bench_text.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loralab.models.embedded import embedded_model_dir
from loralab.serve.text import TextStream

STOPS = ("</answer>", "\n\nUser:", "###", "<|im_end|>")


def per_push_ms(tokenizer, ids: list[int], at: int, repeats: int) -> float:
    """One push at a text of ``at`` tokens: the median over ``repeats`` pushes there."""
    stream = TextStream(tokenizer, STOPS)
    for token in ids[:at]:
        stream.push(token)
    times = []
    for token in ids[at : at + repeats]:
        start = time.perf_counter()
        stream.push(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def whole_decode_ms(tokenizer, ids: list[int], at: int, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        tokenizer.decode(ids[: at + i], skip_special_tokens=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    text = Path(__file__).read_text(encoding="utf-8")  # ordinary prose and code
    ids = tokenizer(text * 20)["input_ids"]
    lengths = (256, 2048) if args.quick else (256, 1024, 4096, 8192)
    repeats = 50 if args.quick else 200
    assert len(ids) > max(lengths) + repeats
    print(
        f"`python benchmarks/bench_text.py{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| tokens so far | push (ms) | decode of the whole text (ms) | whole / push |")
    print("|---:|---:|---:|---:|")
    for at in lengths:
        push = per_push_ms(tokenizer, ids, at, repeats)
        whole = whole_decode_ms(tokenizer, ids, at, repeats)
        print(f"| {at} | {push:.4f} | {whole:.4f} | {whole / push:.1f}× |")


if __name__ == "__main__":
    main()
