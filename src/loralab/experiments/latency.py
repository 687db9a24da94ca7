"""``loralab reproduce latency``: what each method costs at inference (Table 1, finding 7).

One forward pass (no grad, eval mode) of the embedded SmolLM2-135M as five variants: the
base; LoRA merged into the weights; LoRA unmerged (W_q and W_v, r = 8, the paper's choice,
the low-rank path run beside each weight); Adapter^H and Adapter^L (bottleneck 8). The
adapters carry random non-zero weights (B and the up-projections, which start at zero,
are drawn from N(0, 0.02²)): nothing is trained, because latency does not depend on the
values, only on the shapes.

Each variant is its own copy of the model (five copies of 135M fp32 parameters, about
2.7 GB). For each (batch, sequence) shape the variants run ``warmup`` untimed rounds,
then one timed forward each per repetition, interleaved, with the order rotated every
repetition, so that drift and other load on the machine fall on all of them alike. The
ratio to the base is taken within a repetition and then summarised by its median and
interquartile range; the milliseconds by median and min–max.

A forward computes the next-token logits only (``logits_to_keep=1``, as a generation's
prefill does): the vocabulary projection is the same for every variant, and full logits
at (32, 512) would be a 3.2 GB tensor.

Threads: the timing runs on one thread (``LatencyScale.threads``). On a machine where
other jobs run, PyTorch's threads wait for each other at every operation: on the 2-core
build machine, busy with other jobs, a (1, 128) forward took 8 s with 2 threads and 0.7 s
with 1. One thread is immune to that, and the ratios between the variants, which are
what the experiment reports, keep their meaning.

Scale: ``LatencyScale.shapes`` are the shapes timed; each seed is one timed repetition
(``--seeds N`` times N repetitions). The full mode times the paper's shapes; the quick
mode keeps (1, 128) and replaces the two large shapes with (4, 128) and (8, 256), the same
trend (more tokens per forward), because one (32, 512) forward takes minutes.

Expected time, measured with one thread on the (busy) 2-core build machine: one base
forward takes 0.7 s at (1, 128), 2.7 s at (4, 128), 9.5 s at (8, 256), 21 s at (16, 256)
and 103 s at (32, 512), and the adapted variants up to 15 % more. Quick mode: 6 rounds ×
5 variants × 13 s ≈ 7 min (two runs took 6.3 and 6.9 min). Full mode: 11 rounds (1 warm-up and
10 timed) × 5 variants × 125 s ≈ 2 h.
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora.config import LoraConfig
from ..lora.merge import merge_and_unload
from ..methods import MethodSettings, get_method
from .report import Report, markdown_table
from .runs import torch_threads
from .settings import Scale

NAME = "latency"
SUMMARY = "forward latency of the base, merged/unmerged LoRA, Adapter^H and Adapter^L"
MODEL = "smollm2-135m"
PAPER_SHAPES = ((1, 128), (16, 256), (32, 512))
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}
ADAPTER_RANK = 8
RANDOM_STD = 0.02

# key -> label, in the order of the paper's Table 1
VARIANTS = {
    "base": "Base",
    "lora-merged": "LoRA (merged)",
    "lora-unmerged": "LoRA (unmerged)",
    "adapter-h": "Adapter^H",
    "adapter-l": "Adapter^L",
}


@dataclass(frozen=True)
class LatencyScale(Scale):
    """The size of a latency run: it trains nothing, so only the seeds count (one timed
    repetition each), with the shapes it times and the untimed rounds before them."""

    steps: int = 0
    train_size: int = 0
    test_size: int = 0
    seeds: tuple[int, ...] = tuple(range(10))
    shapes: tuple[tuple[int, int], ...] = PAPER_SHAPES
    """(batch, sequence) of the random token ids each forward pass gets."""
    warmup: int = 1
    """Untimed rounds of every variant at each shape, before the timed ones."""
    threads: int | None = 1
    """PyTorch threads while timing (None: PyTorch's default); see the module docstring."""

    def describe(self) -> str:
        shown = ", ".join(f"({b}, {t})" for b, t in self.shapes)
        return (
            f"forward passes at (batch, sequence) = {shown}; {self.warmup} warm-up "
            f"round(s), then {len(self.seeds)} timed repetitions of every variant, "
            f"{self.threads or torch.get_num_threads()} thread(s)"
        )


QUICK = LatencyScale(seeds=tuple(range(5)), shapes=((1, 128), (4, 128), (8, 256)), quick=True)
FULL = LatencyScale(seeds=tuple(range(10)), shapes=PAPER_SHAPES)
FULL_HOURS = 2.0  # measured per-forward times × rounds; see the module docstring


# -- the variants ----------------------------------------------------------------------


def randomize_zero_parameters(model: nn.Module, seed: int = 0, std: float = RANDOM_STD) -> None:
    """Give every trainable parameter that is all zeros (LoRA's B, an adapter's
    up-projection) N(0, std²) values, so that the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad and not parameter.any():
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(noise.to(parameter.dtype))


def latency_variants(
    base: nn.Module,
    lora: LoraConfig | None = None,
    adapter_rank: int = ADAPTER_RANK,
    seed: int = 0,
) -> dict[str, nn.Module]:
    """The five models of ``VARIANTS``: ``base`` itself and four adapted copies of it."""
    lora = lora or LoraConfig(**LORA)
    settings = MethodSettings(adapter_rank=adapter_rank)

    def adapted(method: str) -> nn.Module:
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        get_method(method).apply(model, settings, lora if method == "lora" else None)
        randomize_zero_parameters(model, seed)
        return model.eval()

    unmerged = adapted("lora")
    merged = merge_and_unload(copy.deepcopy(unmerged))  # the original modules, new weights
    return {
        "base": base.eval(),
        "lora-merged": merged.eval(),
        "lora-unmerged": unmerged,
        "adapter-h": adapted("adapter-h"),
        "adapter-l": adapted("adapter-l"),
    }


# -- timing ---------------------------------------------------------------------------


def _forward_options(model: nn.Module) -> dict[str, Any]:
    # Next-token logits only, where the model can (Transformers' causal LMs).
    return (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )


@torch.no_grad()
def time_forwards(
    variants: dict[str, nn.Module],
    shapes: Sequence[tuple[int, int]],
    repetitions: int,
    warmup: int,
    vocab_size: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of one forward pass, per shape (``"BxT"``) and variant: ``repetitions``
    values each, after ``warmup`` untimed rounds. Every round runs every variant once, in
    an order rotated by one each round."""
    names = list(variants)
    options = {name: _forward_options(model) for name, model in variants.items()}
    generator = torch.Generator().manual_seed(seed)
    timings: dict[str, dict[str, list[float]]] = {}
    for batch, length in shapes:
        tokens = torch.randint(0, vocab_size, (batch, length), generator=generator)
        key = f"{batch}x{length}"
        timings[key] = {name: [] for name in names}
        started = time.perf_counter()
        for round_index in range(warmup + repetitions):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                tick = time.perf_counter()
                variants[name](input_ids=tokens, **options[name])
                elapsed = time.perf_counter() - tick
                if round_index >= warmup:
                    timings[key][name].append(elapsed)
        medians = ", ".join(
            f"{name} {1000 * statistics.median(values):.0f} ms"
            for name, values in timings[key].items()
        )
        log(
            f"{NAME}: ({batch}, {length}): {medians} "
            f"({time.perf_counter() - started:.0f} s for this shape)"
        )
    return timings


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarize(timings: dict[str, dict[str, list[float]]], base: str = "base") -> dict:
    """Per shape and variant: milliseconds (median, min, max) and the ratio to ``base``
    within each repetition (median and interquartile range)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for shape, by_variant in timings.items():
        summary[shape] = {}
        for name, seconds in by_variant.items():
            ratios = [s / b for s, b in zip(seconds, by_variant[base], strict=True)]
            q1, median, q3 = _quartiles(ratios)
            summary[shape][name] = {
                "median_ms": 1000 * statistics.median(seconds),
                "min_ms": 1000 * min(seconds),
                "max_ms": 1000 * max(seconds),
                "ratio_median": median,
                "ratio_q1": q1,
                "ratio_q3": q3,
            }
    return summary


# -- the experiment --------------------------------------------------------------------


def run(scale: Scale, workdir: Path) -> Report:
    from ..models.loading import load_model

    if not isinstance(scale, LatencyScale):
        raise TypeError(f"the latency experiment needs a LatencyScale, got {type(scale).__name__}")
    model, tokenizer = load_model(MODEL)
    variants = latency_variants(model)
    with torch_threads(scale.threads):
        timings = time_forwards(
            variants, scale.shapes, len(scale.seeds), scale.warmup, tokenizer.vocab_size
        )
    return report_of(timings, scale, list(variants))


def report_of(
    timings: dict[str, dict[str, list[float]]], scale: LatencyScale, names: Sequence[str]
) -> Report:
    """The tables, JSON and figure of measured ``timings`` (``time_forwards``)."""
    summary = summarize(timings)
    shapes = list(timings)
    header = ["Variant", *(_shape_label(s) for s in shapes)]
    ratio_rows, ms_rows = [], []
    for name in names:
        stats = [summary[s][name] for s in shapes]
        ratio_rows.append(
            [
                VARIANTS.get(name, name),
                *(
                    f"{v['ratio_median']:.3f}× [{v['ratio_q1']:.3f}–{v['ratio_q3']:.3f}]"
                    for v in stats
                ),
            ]
        )
        ms_rows.append(
            [
                VARIANTS.get(name, name),
                *(f"{v['median_ms']:.1f} [{v['min_ms']:.1f}–{v['max_ms']:.1f}]" for v in stats),
            ]
        )
    setup = (
        f"Forward latency (no grad, eval mode) of the embedded {MODEL} as five variants, "
        f"on random token ids, next-token logits only. LoRA: W_q and W_v at r = {LORA['r']} "
        f"(α = {LORA['lora_alpha']}); adapters: bottleneck {ADAPTER_RANK}. The adapters' "
        "weights are random and untrained (latency depends on shapes, not values). "
        f"{len(scale.seeds)} timed repetitions per shape after {scale.warmup} warm-up "
        "round(s), the variants interleaved in a rotating order, on "
        f"{scale.threads or torch.get_num_threads()} thread(s)."
    )
    if tuple(scale.shapes) != PAPER_SHAPES:
        setup += (
            " The paper's shapes are (1, 128), (16, 256), (32, 512); shapes here that are "
            "not among them are smaller stand-ins with the same trend (more tokens per "
            "forward from left to right), so that the run fits its time budget. The full "
            "mode times the paper's shapes."
        )
    body = (
        f"{setup}\n\n"
        "Ratio to the base (median over repetitions of variant ÷ base in the same "
        "repetition, [interquartile range]):\n\n"
        + markdown_table(header, ratio_rows)
        + "\n\nMilliseconds per forward pass (median [min–max]):\n\n"
        + markdown_table(header, ms_rows)
    )
    raw = {
        "model": MODEL,
        "variants": {name: VARIANTS.get(name, name) for name in names},
        "lora": LORA,
        "adapter_rank": ADAPTER_RANK,
        "random_std": RANDOM_STD,
        "threads": scale.threads or torch.get_num_threads(),
        "timings_s": timings,
        "summary": summary,
    }

    def draw(figure) -> None:
        axis = figure.subplots()
        shown = [n for n in names if n != "base"]
        width = 0.8 / max(len(shown), 1)
        for index, name in enumerate(shown):
            xs = [i + (index - (len(shown) - 1) / 2) * width for i in range(len(shapes))]
            stats = [summary[s][name] for s in shapes]
            medians = [v["ratio_median"] for v in stats]
            errors = [
                [v["ratio_median"] - v["ratio_q1"] for v in stats],
                [v["ratio_q3"] - v["ratio_median"] for v in stats],
            ]
            # bars grow from the base's 1.0, so a variant faster by noise points down
            heights = [m - 1 for m in medians]
            axis.bar(
                xs, heights, width, bottom=1, yerr=errors, capsize=2, label=VARIANTS.get(name, name)
            )
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(shapes)), [_shape_label(s) for s in shapes])
        axis.set_xlabel("(batch, sequence)")
        axis.set_ylabel("latency ÷ base (median, IQR)")
        axis.set_title(f"Forward latency against the base, {MODEL}", fontsize=9)
        axis.legend(fontsize=7)

    return Report(NAME, "Inference latency of the methods", body, raw, draw, scale)


def _shape_label(key: str) -> str:
    batch, length = key.split("x")
    return f"({batch}, {length})"
