"""Mixed-batch adapters: loralab's ``mixed_adapters`` against PEFT's ``adapter_names=``.

Both sides run the embedded SmolLM2-135M-Instruct (fp32, eval, no_grad) with the same
LoRA files: r = 8, α = 16 on q/k/v/o_proj, A and B random and non-zero, written once by
PEFT's ``save_pretrained`` and loaded by each library's own ``load_adapter``. Row ``i``
of the 32-row batch runs adapter ``i % N``, for N = 8 and N = 32.

Each side runs in its own processes (this script with ``--worker``), one per adapter
count, the sides alternating. Loading 32 adapters into PEFT takes over half a minute on
2 cores, so a process per single measurement would not fit in ten minutes. Inside a
process each case is timed interleaved with a bare (unwrapped) copy of the base model, so
"time above the base" compares times taken side by side. Each figure is the median of the
repetitions after warm-up; ``torch.set_num_threads`` is left at its default.

    python benchmarks/bench_adapters.py            # full run (~10 min on 2 cores)
    python benchmarks/bench_adapters.py --quick    # smoke run: fewer repetitions (~5 min)
    python benchmarks/bench_adapters.py --write    # also writes benchmarks/results_adapters.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from measure import (
    Samples,
    command_line,
    interleaved,
    load_average,
    machine_line,
    now,
    result_line,
    run_worker,
    timed,
)

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
BATCH = 32
PROMPT = 8  # tokens behind each decoding step, and in each generate prompt
NEW_TOKENS = 16
PREFILL = (16, 64)
ADAPTER_COUNTS = (8, 32)
SIDES = ("loralab", "peft")
RESULTS = Path(__file__).with_name("results_adapters.md")

# What each process measures, in order; "manage" changes the weights, so it comes last.
PLAN = {
    8: ["verify", "decode_one", "decode", "generate", "prefill16", "prefill64", "manage"],
    32: ["decode", "generate", "prefill16", "prefill64"],
}
# (warm-up, repetitions) per case: full run, then --quick. The long cases run after the
# short ones in the same process, which have warmed the model up.
REPS = {
    "decode_one": ((1, 5), (1, 2)),
    "decode": ((1, 5), (1, 2)),
    "generate": ((0, 3), (0, 1)),
    "prefill16": ((1, 4), (0, 2)),
    "prefill64": ((0, 3), (0, 1)),
    "manage": ((1, 10), (1, 3)),
}


def adapter_names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def row_adapters(count: int) -> list[str]:
    """Row i of the batch runs adapter i % count."""
    return [f"a{i % count}" for i in range(BATCH)]


def tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, shape, generator=generator)


# -- the adapter files, written once by PEFT --------------------------------------------------


def write_adapters(directory: Path, count: int, seed: int = 0) -> None:
    """PEFT adapters ``a0`` … ``a{count-1}`` with random non-zero A and B, one directory
    each, written by PEFT's ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    from loralab.models.loading import load_model

    base, _ = load_model(MODEL)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    factors = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    generator = torch.Generator().manual_seed(seed)
    for name in adapter_names(count):
        with torch.no_grad():
            for parameter in factors:
                # PEFT starts B at zero; std 0.02 gives every adapter a visible effect.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(directory / name)


# -- one side ---------------------------------------------------------------------------------


class Side:
    """One library's model with N adapters, and its ways to mix, switch and load them."""

    def __init__(self, name: str, directory: Path, count: int) -> None:
        from loralab.models.loading import load_model

        self.name, self.directory = name, directory
        self.names = adapter_names(count)
        self.rows = row_adapters(count)
        model, _ = load_model(MODEL)
        if name == "peft":
            from peft import PeftModel

            first = directory / self.names[0]
            model = PeftModel.from_pretrained(model, first, adapter_name=self.names[0])
            for adapter in self.names[1:]:
                model.load_adapter(directory / adapter, adapter_name=adapter)
        else:
            from loralab import load_adapter

            for adapter in self.names:
                load_adapter(model, directory / adapter, adapter_name=adapter)
        self.model = model.eval()

    def mixed(self) -> tuple[contextlib.AbstractContextManager, dict]:
        """(context, forward kwargs) that make row i run ``self.rows[i]``."""
        if self.name == "peft":
            return contextlib.nullcontext(), {"adapter_names": self.rows}
        from loralab.lora.mixing import mixed_adapters

        return mixed_adapters(self.model, self.rows), {}

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the one adapter of every row."""
        if self.name == "peft":
            self.model.set_adapter(adapter)
        else:
            from loralab.lora.adapters import set_active_adapter

            set_active_adapter(self.model, adapter)


def no_mixing() -> tuple[contextlib.AbstractContextManager, dict]:
    return contextlib.nullcontext(), {}


# -- the cases --------------------------------------------------------------------------------


def decode_step(model, enter, block_timed: bool = True) -> Callable[[], float]:
    """A timed 32×1 forward on the KV cache of an 8-token prompt; the cache is cropped back
    to the prompt after each step, untimed. ``enter()`` gives a fresh (context, kwargs);
    with ``block_timed`` entering and leaving the context is part of the time."""
    prompt, step = tokens((BATCH, PROMPT), 1), tokens((BATCH, 1), 2)
    context, kwargs = enter()
    with context:
        cache = model(prompt, use_cache=True, **kwargs).cache

    def forward(kwargs: dict) -> None:
        model(step, cache=cache, use_cache=True, **kwargs)

    def run() -> float:
        context, kwargs = enter()
        if block_timed:

            def in_context() -> None:
                with context:
                    forward(kwargs)

            ms = timed(in_context)
        else:
            with context:
                ms = timed(lambda: forward(kwargs))
        cache.crop(-1)  # back to the prompt
        return ms

    return run


def case_decode_one(side: Side, bare, warmup: int, reps: int) -> Samples:
    """The decoding step with one adapter for all rows, and the bare base."""
    side.activate(side.names[0])
    cases = {"bare": decode_step(bare, no_mixing), "one": decode_step(side.model, no_mixing)}
    return interleaved(cases, warmup, reps)


def case_decode(side: Side, bare, warmup: int, reps: int) -> Samples:
    """The decoding step, rows mixed. A serving loop may regroup its rows at any step, so
    the mixing is set up for every step and timed; for loralab, also the forward alone."""
    cases = {"bare": decode_step(bare, no_mixing), "mixed": decode_step(side.model, side.mixed)}
    if side.name == "loralab":
        cases["mixed_in_block"] = decode_step(side.model, side.mixed, block_timed=False)
    return interleaved(cases, warmup, reps)


def case_generate(side: Side, bare, warmup: int, reps: int) -> Samples:
    """``generate`` of 16 new tokens (greedy) for 32 prompts of 8 tokens, rows mixed."""
    prompts = tokens((BATCH, PROMPT), 3)
    options = {
        "attention_mask": torch.ones_like(prompts),
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,  # no early stop: every run makes 16 steps
        "do_sample": False,
        "pad_token_id": 0,
    }

    def run() -> float:
        context, kwargs = side.mixed()

        def generate() -> None:
            with context:
                out = side.model.generate(input_ids=prompts, **options, **kwargs)
            assert out.shape == (BATCH, PROMPT + NEW_TOKENS)

        return timed(generate)

    return interleaved({"generate": run}, warmup, reps)


def case_prefill(length: int):
    def case(side: Side, bare, warmup: int, reps: int) -> Samples:
        """A 32×length forward, rows mixed, and the bare base; like ``generate``'s prefill,
        only the last position's logits are computed."""
        ids = tokens((BATCH, length), 4)

        def mixed() -> float:
            context, kwargs = side.mixed()

            def run() -> None:
                with context:
                    side.model(ids, logits_to_keep=1, **kwargs)

            return timed(run)

        bare_forward = lambda: timed(lambda: bare(ids, logits_to_keep=1))  # noqa: E731
        return interleaved({"bare": bare_forward, "mixed": mixed}, warmup, reps)

    return case


def case_manage(side: Side, bare, warmup: int, reps: int) -> Samples:
    """Load one more adapter, hot-swap one, switch the active one (unmerged, merged).
    Leaves adapter a0 with other weights and the model merged: run it last."""
    count = len(side.names)
    spare = side.directory / f"a{count}"  # not loaded yet
    swaps = [side.directory / f"a{count + 1}", side.directory / f"a{count + 2}"]
    turn = {"swap": 0, "switch": 0}
    model = side.model

    def next_swap() -> Path:
        turn["swap"] += 1
        return swaps[turn["swap"] % 2]

    def next_adapter() -> str:
        turn["switch"] += 1
        return side.names[turn["switch"] % count]

    if side.name == "peft":
        from peft.utils.hotswap import hotswap_adapter

        def load() -> float:
            ms = timed(lambda: model.load_adapter(spare, adapter_name="extra"))
            model.delete_adapter("extra")
            model.set_adapter(side.names[0])
            return ms

        def swap() -> float:
            source = str(next_swap())
            return timed(lambda: hotswap_adapter(model, source, adapter_name=side.names[0]))

        def switch() -> float:
            adapter = next_adapter()
            return timed(lambda: model.set_adapter(adapter))

        def switch_merged() -> float:
            adapter = next_adapter()

            def run() -> None:
                model.unmerge_adapter()
                model.set_adapter(adapter)
                model.merge_adapter()

            return timed(run)

        merge: Callable[[], None] = model.merge_adapter
    else:
        from loralab import load_adapter, merge_adapter
        from loralab.files.hot_swap import hot_swap_adapter
        from loralab.lora.adapters import delete_adapter, set_active_adapter

        def load() -> float:
            ms = timed(lambda: load_adapter(model, spare, adapter_name="extra"))
            delete_adapter(model, "extra")
            set_active_adapter(model, side.names[0])
            return ms

        def swap() -> float:
            source = next_swap()
            return timed(lambda: hot_swap_adapter(model, source, side.names[0]))

        def switch() -> float:
            adapter = next_adapter()
            return timed(lambda: set_active_adapter(model, adapter))

        switch_merged = switch  # a merged model stays merged: unmerge old, merge new
        merge = lambda: merge_adapter(model)  # noqa: E731

    samples = interleaved({"load": load, "hot_swap": swap, "switch": switch}, warmup, reps)
    merge()
    return samples | interleaved({"switch_merged": switch_merged}, warmup, reps)


def case_verify(side: Side, bare, warmup: int, reps: int) -> Samples:
    """Save the logits of a small mixed batch (8 rows × 8 tokens, row i: adapter i % N)
    for the driver to compare across the sides."""
    ids = tokens((8, 8), 5)
    full = side.rows
    side.rows = full[:8]
    context, kwargs = side.mixed()
    with context:
        logits = side.model(ids, **kwargs).logits
    side.rows = full
    torch.save(logits, side.directory / f"verify-{side.name}.pt")
    return {}


CASES = {
    "verify": case_verify,
    "decode_one": case_decode_one,
    "decode": case_decode,
    "generate": case_generate,
    "prefill16": case_prefill(16),
    "prefill64": case_prefill(64),
    "manage": case_manage,
}


def worker(side_name: str, directory: Path, count: int, quick: bool) -> None:
    """Measure this process's cases for one side and N adapters; print them as JSON."""
    from loralab.models.loading import load_model

    bare, _ = load_model(MODEL)  # a second copy, never wrapped
    side = Side(side_name, directory, count)
    results = {}
    with torch.no_grad():
        for case in PLAN[count]:
            warmup, reps = REPS.get(case, ((0, 0), (0, 0)))[quick]
            start = time.perf_counter()
            results[case] = CASES[case](side, bare, warmup, reps)
            print(f"    {case}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    result_line(results)


# -- the driver -------------------------------------------------------------------------------


def driver(quick: bool, write: bool) -> None:
    start = time.perf_counter()
    load_before = load_average()
    results: dict[tuple[str, int], dict[str, Samples]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as scratch:
        directory = Path(scratch)
        count = max(*ADAPTER_COUNTS, min(ADAPTER_COUNTS) + 3)  # +3: load and hot-swap files
        print(f"writing {count} adapters with PEFT ...", file=sys.stderr)
        write_adapters(directory, count)
        for index, n in enumerate(PLAN):
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:  # who goes first alternates
                arguments = [side, "--dir", str(directory), "--count", str(n)]
                arguments += ["--quick"] if quick else []
                results[(side, n)] = run_worker(__file__, arguments, f"{side}, {n} adapters")
        logits = {side: torch.load(directory / f"verify-{side}.pt") for side in SIDES}
    max_diff = float((logits["loralab"] - logits["peft"]).abs().max())
    if max_diff > 1e-4:
        raise SystemExit(f"the two sides disagree: max |Δlogits| = {max_diff:.3g} > 1e-4")
    print(f"outputs agree: max |Δlogits| = {max_diff:.2e}", file=sys.stderr)

    header = {
        "command": command_line(__file__),
        "date": now(),
        "took": f"{(time.perf_counter() - start) / 60:.1f} min",
        "machine": machine_line(),
        "load": f"{load_before} before, {load_average()} after",
        "max_diff": max_diff,
    }
    report = render(header, results, quick)
    print(report)
    if write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"written to {RESULTS}", file=sys.stderr)


# -- the table --------------------------------------------------------------------------------


def render(header: dict, results: dict, quick: bool) -> str:
    def ms(side: str, n: int, case: str, label: str) -> float:
        return statistics.median(results[(side, n)][case][label])

    rows: list[tuple[str, ...]] = []

    def time_row(case: str, ll: float, pf: float) -> float:
        rows.append((case, f"{ll:.1f} ms", f"{pf:.1f} ms", f"{ll / pf:.2f}", "lower"))
        return ll / pf

    def rate_row(case: str, ll: float, pf: float) -> float:
        rows.append((case, f"{ll:.0f} tok/s", f"{pf:.0f} tok/s", f"{ll / pf:.2f}", "higher"))
        return ll / pf

    step = "decode 32×1 on an 8-token KV cache"
    for label, case in (
        ("bare", "bare base (measured in each side's process)"),
        ("one", "one adapter, all rows"),
    ):
        ll, pf = ms("loralab", 8, "decode_one", label), ms("peft", 8, "decode_one", label)
        time_row(f"{step}: {case}", ll, pf)
    decode_rate = {}
    for n in ADAPTER_COUNTS:
        ll, pf = ms("loralab", n, "decode", "mixed"), ms("peft", n, "decode", "mixed")
        time_row(f"{step}: mixed, {n} adapters", ll, pf)
        decode_rate[n] = rate_row(f"{step}: mixed, {n} adapters, throughput",
                                  BATCH * 1e3 / ll, BATCH * 1e3 / pf)  # fmt: skip
    for n in ADAPTER_COUNTS:
        in_block = ms("loralab", n, "decode", "mixed_in_block")
        rows.append((f"{step}: mixed, {n} adapters, forward only (block entered, untimed)",
                     f"{in_block:.1f} ms", "", "", ""))  # fmt: skip
    generate_rate = {}
    new = BATCH * NEW_TOKENS
    for n in ADAPTER_COUNTS:
        ll, pf = ms("loralab", n, "generate", "generate"), ms("peft", n, "generate", "generate")
        generate_rate[n] = rate_row(
            f"generate 16 new tokens × 32 prompts of 8, mixed, {n} adapters "
            f"({ll:.0f} vs {pf:.0f} ms)",
            new * 1e3 / ll,
            new * 1e3 / pf,
        )
    above_ratio = {}
    for length in PREFILL:
        for n in ADAPTER_COUNTS:
            case = f"prefill{length}"
            name = f"prefill 32×{length}, {n} adapters"
            ll_bare, pf_bare = ms("loralab", n, case, "bare"), ms("peft", n, case, "bare")
            ll_mix, pf_mix = ms("loralab", n, case, "mixed"), ms("peft", n, case, "mixed")
            time_row(f"{name}: bare base", ll_bare, pf_bare)
            time_row(f"{name}: mixed", ll_mix, pf_mix)
            above_ratio[(length, n)] = time_row(
                f"{name}: **mixed − bare base**", ll_mix - ll_bare, pf_mix - pf_bare
            )
    for label, case in (
        ("load", "load one adapter from disk onto a model holding 8"),
        ("hot_swap", "hot-swap an adapter's weights from disk"),
        ("switch", "switch the active adapter (unmerged)"),
        ("switch_merged", "switch the active adapter (merged: unmerge old, merge new)"),
    ):
        time_row(case, ms("loralab", 8, "manage", label), ms("peft", 8, "manage", label))

    def reps(case: str) -> str:
        warmup, count = REPS[case][quick]
        return f"{count} ({warmup} warm-up)"

    def check(ok: bool) -> str:
        return "[x]" if ok else "[ ]"

    lines = [
        "# Mixed-batch adapters: loralab vs PEFT",
        "",
        f"- Command: `{header['command']}`",
        f"- Date: {header['date']}; the run took {header['took']}",
        f"- Machine: {header['machine']}",
        f"- Load average (1, 5, 15 min): {header['load']}",
        "- Set-up: SmolLM2-135M-Instruct, fp32, eval, no_grad; LoRA r=8, α=16 on "
        "q/k/v/o_proj; 32 rows, row i runs adapter i % N; the same adapter files on both "
        f"sides (max |Δlogits| on an 8-row mixed batch: {header['max_diff']:.2e}).",
        "- Method: one process per side and adapter count, the sides alternating; each case "
        "is timed interleaved with a bare (unwrapped) copy of the base in the same process; "
        f"medians of {reps('decode')} reps for decoding, {reps('generate')} for generate, "
        f"{reps('prefill16')} / {reps('prefill64')} for prefill 16 / 64, {reps('manage')} "
        "for management. Mixed times include entering `mixed_adapters` (loralab) or passing "
        "`adapter_names` (PEFT) on every call. Prefill computes the last position's logits "
        "only, as `generate` does. Ratios are loralab/PEFT.",
        "",
        "| Case | loralab | PEFT | loralab/PEFT | better |",
        "|---|---:|---:|---:|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        "Goals:",
        "",
        f"- {check(generate_rate[32] >= 2)} mixed-batch decoding at least 2× PEFT's "
        f"throughput with 32 adapters: `generate` {generate_rate[32]:.2f}× "
        f"(one decoding step: {decode_rate[32]:.2f}×)",
    ]
    for (length, n), ratio in above_ratio.items():
        lines.append(
            f"- {check(ratio <= 0.5)} in prefill at most half of PEFT's time above the bare "
            f"base: 32×{length}, {n} adapters: {ratio:.2f}×"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dir, args.count, args.quick)
    else:
        driver(args.quick, args.write)


if __name__ == "__main__":
    main()
