"""Mixed-batch adapters: loralab's ``mixed_adapters`` against PEFT's ``adapter_names=``.

Both sides run the embedded SmolLM2-135M-Instruct (fp32, eval, no_grad) with the same
LoRA files: r = 8, α = 16 on q/k/v/o_proj, A and B random and non-zero, written once by
PEFT's ``save_pretrained`` and loaded by each library's own ``load_adapter``. Row ``i``
of a 32-row batch uses adapter ``i % N``, for N = 8 and N = 32.

Every measurement (one side, one case) runs in its own process, started from this script
with ``--worker``; the two sides alternate, and each process times its case interleaved
with the bare base model (a second, unwrapped copy), so that "time above base" is a
difference of times taken side by side. Each figure is the median of the repetitions
after warm-up; ``torch.set_num_threads`` is left at its default.

    python benchmarks/bench_adapters.py            # full run, prints the table (~10 min, 2 cores)
    python benchmarks/bench_adapters.py --quick    # smoke run: fewer repetitions
    python benchmarks/bench_adapters.py --write    # also writes benchmarks/results_adapters.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
BATCH = 32
PROMPT = 8  # tokens of the prompt behind the decoding step, and of each generate prompt
NEW_TOKENS = 16
PREFILL = (16, 64)
ADAPTER_COUNTS = (8, 32)
SIDES = ("loralab", "peft")
RESULTS = Path(__file__).with_name("results_adapters.md")


def adapter_names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def row_adapters(count: int) -> list[str]:
    """Row i of the batch runs adapter i % count."""
    return [f"a{i % count}" for i in range(BATCH)]


# -- the adapter files, written once by PEFT --------------------------------------------------


def write_adapters(directory: Path, count: int, seed: int = 0) -> None:
    """``count`` PEFT adapters ``a0``, ``a1``, … with random non-zero A and B, one
    directory each, all written by PEFT's ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    from loralab.models import load_model

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
                # PEFT starts B at zero; std 0.02 gives each adapter a visible effect.
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.save_pretrained(directory / name)


# -- one side's model --------------------------------------------------------------------------


def load_side(side: str, directory: Path, names: list[str]):
    """The embedded model with ``names`` loaded by ``side``'s own loader."""
    from loralab.models import load_model

    model, _ = load_model(MODEL)
    if side == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, directory / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(directory / name, adapter_name=name)
    else:
        from loralab import load_adapter

        for name in names:
            load_adapter(model, directory / name, adapter_name=name)
    return model.eval()


def mixed(side: str, model, rows: list[str]):
    """(context, forward kwargs) that make each row run its own adapter."""
    if side == "peft":
        return contextlib.nullcontext(), {"adapter_names": rows}
    from loralab.adapters import mixed_adapters

    return mixed_adapters(model, rows), {}


def single(side: str, model, name: str) -> None:
    """Make ``name`` the one active adapter, for every row."""
    if side == "peft":
        model.set_adapter(name)
    else:
        from loralab.adapters import set_active_adapter

        set_active_adapter(model, name)


def timed(fn) -> float:
    """Milliseconds that ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(cases: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    """Run the cases in turn (order flipped every round); milliseconds after warm-up."""
    samples: dict[str, list[float]] = {label: [] for label in cases}
    labels = list(cases)
    for round_index in range(warmup + reps):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            ms = cases[label]()
            if round_index >= warmup:
                samples[label].append(ms)
    return samples


def tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, shape, generator=generator)


# -- the workers: one case, one side, one process --------------------------------------------


def no_mixing():
    return contextlib.nullcontext(), {}


def decode_case(model, enter, block_timed: bool = True):
    """A timed 32×1 forward on a KV cache of an 8-token prompt; the cache is cropped back
    to the prompt after each step, untimed. ``enter()`` gives a fresh (context, kwargs);
    with ``block_timed`` entering and leaving the context is part of the time."""
    prompt, step = tokens((BATCH, PROMPT), 1), tokens((BATCH, 1), 2)
    context, kwargs = enter()
    with context:
        cache = model(prompt, use_cache=True, **kwargs).past_key_values

    def forward(kwargs: dict) -> None:
        model(step, past_key_values=cache, use_cache=True, **kwargs)

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
        cache.crop(PROMPT)
        return ms

    return run


def work_decode(side, directory, count, warmup, reps):
    """The decoding step: bare base and one adapter for all rows (count = 1), or mixed."""
    from loralab.models import load_model

    bare, _ = load_model(MODEL)
    model = load_side(side, directory, adapter_names(count))
    cases = {"bare": decode_case(bare, no_mixing)}
    if count == 1:
        single(side, model, "a0")
        cases["one"] = decode_case(model, no_mixing)
        return interleaved(cases, warmup, reps)
    rows = row_adapters(count)
    # A serving loop may regroup the rows at any step, so the mixing is set up for each
    # step and timed; for loralab, also the forward alone inside an entered block.
    cases["mixed"] = decode_case(model, lambda: mixed(side, model, rows))
    if side == "loralab":
        cases["mixed_in_block"] = decode_case(
            model, lambda: mixed(side, model, rows), block_timed=False
        )
    return interleaved(cases, warmup, reps)


def work_generate(side, directory, count, warmup, reps):
    """``generate`` of 16 new tokens on 32 prompts of 8 tokens, rows mixed."""
    model = load_side(side, directory, adapter_names(count))
    rows = row_adapters(count)
    prompts = tokens((BATCH, PROMPT), 3)
    options = {
        "attention_mask": torch.ones_like(prompts),
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,  # every run makes exactly 16 steps
        "do_sample": False,
        "pad_token_id": 0,
    }

    def run() -> float:
        context, kwargs = mixed(side, model, rows)

        def generate():
            with context:
                out = model.generate(input_ids=prompts, **options, **kwargs)
            assert out.shape == (BATCH, PROMPT + NEW_TOKENS)

        return timed(generate)

    return interleaved({"generate": run}, warmup, reps)


def work_prefill(side, directory, count, length, warmup, reps):
    """A 32×length forward (logits of the last position only, as ``generate`` asks)."""
    from loralab.models import load_model

    bare, _ = load_model(MODEL)
    model = load_side(side, directory, adapter_names(count))
    rows = row_adapters(count)
    ids = tokens((BATCH, length), 4)

    def base() -> float:
        return timed(lambda: bare(ids, logits_to_keep=1))

    def mixed_forward() -> float:
        context, kwargs = mixed(side, model, rows)

        def run():
            with context:
                model(ids, logits_to_keep=1, **kwargs)

        return timed(run)

    return interleaved({"bare": base, "mixed": mixed_forward}, warmup, reps)


def work_manage(side, directory, count, warmup, reps):
    """Load one more adapter, hot-swap one, switch the active one (unmerged and merged)."""
    model = load_side(side, directory, adapter_names(count))
    names = adapter_names(count)
    spare = directory / f"a{count}"  # not loaded yet
    swaps = [directory / f"a{count + 1}", directory / f"a{count + 2}"]
    state = {"swap": 0, "switch": 0}

    def next_name() -> str:
        state["switch"] += 1
        return names[state["switch"] % len(names)]

    if side == "peft":
        from peft.utils.hotswap import hotswap_adapter

        def load() -> float:
            ms = timed(lambda: model.load_adapter(spare, adapter_name="extra"))
            model.delete_adapter("extra")
            model.set_adapter(names[0])
            return ms

        def swap() -> float:
            state["swap"] += 1
            source = str(swaps[state["swap"] % 2])
            return timed(lambda: hotswap_adapter(model, source, adapter_name=names[0]))

        def switch() -> float:
            name = next_name()
            return timed(lambda: model.set_adapter(name))

        def switch_merged() -> float:
            name = next_name()

            def run():
                model.unmerge_adapter()
                model.set_adapter(name)
                model.merge_adapter()

            return timed(run)

        unmerged = interleaved({"load": load, "hot_swap": swap, "switch": switch}, warmup, reps)
        model.merge_adapter()
        merged = interleaved({"switch_merged": switch_merged}, warmup, reps)
        return unmerged | merged

    from loralab import load_adapter, merge_adapter
    from loralab.adapters import delete_adapter, hot_swap_adapter, set_active_adapter

    def load() -> float:
        ms = timed(lambda: load_adapter(model, spare, adapter_name="extra"))
        delete_adapter(model, "extra")
        set_active_adapter(model, names[0])
        return ms

    def swap() -> float:
        state["swap"] += 1
        source = swaps[state["swap"] % 2]
        return timed(lambda: hot_swap_adapter(model, source, names[0]))

    def switch() -> float:
        name = next_name()
        return timed(lambda: set_active_adapter(model, name))

    unmerged = interleaved({"load": load, "hot_swap": swap, "switch": switch}, warmup, reps)
    merge_adapter(model)
    merged = interleaved({"switch_merged": switch}, warmup, reps)
    return unmerged | {"switch_merged": merged["switch_merged"]}


def work_verify(side, directory, count, warmup, reps):
    """Logits of a small mixed batch (8 rows × 8 tokens over ``count`` adapters)."""
    model = load_side(side, directory, adapter_names(count))
    rows = [f"a{i % count}" for i in range(8)]
    ids = tokens((8, 8), 5)
    context, kwargs = mixed(side, model, rows)
    with context:
        logits = model(ids, **kwargs).logits
    torch.save(logits, directory / f"verify-{side}.pt")
    return {}


WORKERS = {
    "decode": work_decode,
    "generate": work_generate,
    "prefill": work_prefill,
    "manage": work_manage,
    "verify": work_verify,
}


def worker(args) -> None:
    work = WORKERS[args.worker]
    directory = Path(args.dir)
    with torch.no_grad():
        if args.worker == "prefill":
            samples = work(args.side, directory, args.count, args.length, args.warmup, args.reps)
        else:
            samples = work(args.side, directory, args.count, args.warmup, args.reps)
    print("RESULT " + json.dumps(samples))


# -- the driver ------------------------------------------------------------------------------


def run_worker(directory: Path, side: str, case: str, count: int, warmup: int, reps: int,
               length: int = 0) -> dict[str, list[float]]:  # fmt: skip
    command = [sys.executable, __file__, "--worker", case, "--side", side, "--dir",
               str(directory), "--count", str(count), "--length", str(length),
               "--warmup", str(warmup), "--reps", str(reps)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"worker failed: {shlex.join(command)}")
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    label = f"{case}{length or ''} N={count}"
    print(f"  {side:8s} {label:14s} {time.perf_counter() - start:6.1f} s", file=sys.stderr)
    return json.loads(line.removeprefix("RESULT "))


def uptime() -> str:
    load = os.getloadavg()
    return f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def driver(args) -> None:
    import peft
    import transformers

    start = time.perf_counter()
    load_before = uptime()
    warmup, reps = (1, 2) if args.quick else (1, args.reps)
    gen_reps = 1 if args.quick else max(2, reps - 2)
    pre_reps = {16: reps, 64: 2 if args.quick else max(3, reps - 2)}
    manage_reps = 3 if args.quick else 10
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as scratch:
        directory = Path(scratch)
        print("writing 35 adapters with PEFT ...", file=sys.stderr)
        write_adapters(directory, max(ADAPTER_COUNTS) + 3)

        for side in SIDES:
            run_worker(directory, side, "verify", 8, 0, 0)
        verify = {s: torch.load(directory / f"verify-{s}.pt") for s in SIDES}
        max_diff = float((verify["loralab"] - verify["peft"]).abs().max())
        if max_diff > 1e-4:
            raise SystemExit(f"the two sides disagree: max |Δlogits| = {max_diff:.3g} > 1e-4")
        print(f"outputs agree: max |Δlogits| = {max_diff:.2e}", file=sys.stderr)

        jobs = [("decode", 1, 0, reps), *(("decode", n, 0, reps) for n in ADAPTER_COUNTS)]
        jobs += [("generate", n, 0, gen_reps) for n in ADAPTER_COUNTS]
        jobs += [("prefill", n, length, pre_reps[length])
                 for length in PREFILL for n in ADAPTER_COUNTS]  # fmt: skip
        jobs += [("manage", 8, 0, manage_reps)]
        for index, (case, count, length, job_reps) in enumerate(jobs):
            sides = SIDES if index % 2 == 0 else SIDES[::-1]  # who goes first alternates
            for side in sides:
                samples = run_worker(directory, side, case, count, warmup, job_reps, length)
                results[(side, f"{case}{length or ''}-{count}")] = samples

    elapsed = time.perf_counter() - start
    command = "python benchmarks/bench_adapters.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a.startswith("--")
    )
    header = {
        "command": command,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": (
            f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"peft {peft.__version__}, Python {platform.python_version()}"
        ),
        "load": f"load average (1, 5, 15 min) {load_before} before, {uptime()} after",
        "elapsed": f"{elapsed / 60:.1f} min",
        "max_diff": max_diff,
        "reps": (warmup, reps, gen_reps, pre_reps, manage_reps),
    }
    report = render(header, results)
    print(report)
    if args.write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"written to {RESULTS}", file=sys.stderr)


# -- the table ---------------------------------------------------------------------------------


def render(header: dict, results: dict) -> str:
    def m(side: str, key: str, label: str) -> float:
        return median(results[(side, key)][label])

    def above(side: str, key: str) -> tuple[float, float, float]:
        """(bare, mixed, mixed − bare): medians of the interleaved runs."""
        bare, mix = m(side, key, "bare"), m(side, key, "mixed")
        return bare, mix, mix - bare

    rows: list[tuple[str, str, str, str, str]] = []

    def time_row(case: str, ll: float, pf: float, unit: str = "ms") -> None:
        rows.append((case, f"{ll:.1f} {unit}", f"{pf:.1f} {unit}", f"{ll / pf:.2f}", "lower"))

    def rate_row(case: str, ll: float, pf: float) -> None:
        rows.append((case, f"{ll:.0f} tok/s", f"{pf:.0f} tok/s", f"{ll / pf:.2f}", "higher"))

    step = "decode 32×1 (KV cache of an 8-token prompt)"
    time_row(f"{step}: bare base, in each side's processes",
             m("loralab", "decode-1", "bare"), m("peft", "decode-1", "bare"))  # fmt: skip
    time_row(f"{step}: one adapter, all rows",
             m("loralab", "decode-1", "one"), m("peft", "decode-1", "one"))  # fmt: skip
    for n in ADAPTER_COUNTS:
        key = f"decode-{n}"
        time_row(f"{step}: mixed, {n} adapters", m("loralab", key, "mixed"), m("peft", key, "mixed"))
    for n in ADAPTER_COUNTS:
        key = f"decode-{n}"
        ll_step, pf_step = m("loralab", key, "mixed"), m("peft", key, "mixed")
        rate_row(f"{step}: mixed, {n} adapters, throughput",
                 BATCH * 1e3 / ll_step, BATCH * 1e3 / pf_step)  # fmt: skip
    for n in ADAPTER_COUNTS:
        rows.append((
            f"{step}: loralab mixed, {n} adapters, forward only (block entered once)",
            f"{m('loralab', f'decode-{n}', 'mixed_in_block'):.1f} ms", "", "", "",
        ))  # fmt: skip
    generation = {}
    for n in ADAPTER_COUNTS:
        key = f"generate-{n}"
        ll, pf = m("loralab", key, "generate"), m("peft", key, "generate")
        new = BATCH * NEW_TOKENS
        generation[n] = (new * 1e3 / ll) / (new * 1e3 / pf)
        rate_row(f"generate 32 × (8 + 16 new), mixed, {n} adapters ({ll:.0f} / {pf:.0f} ms)",
                 new * 1e3 / ll, new * 1e3 / pf)  # fmt: skip
    prefill = {}
    for length in PREFILL:
        for n in ADAPTER_COUNTS:
            key = f"prefill{length}-{n}"
            ll_bare, ll_mix, ll_above = above("loralab", key)
            pf_bare, pf_mix, pf_above = above("peft", key)
            case = f"prefill 32×{length}, {n} adapters"
            time_row(f"{case}: bare base", ll_bare, pf_bare)
            time_row(f"{case}: mixed", ll_mix, pf_mix)
            time_row(f"{case}: mixed − bare base", ll_above, pf_above)
            prefill[(length, n)] = ll_above / pf_above
    for label, case in (
        ("load", "load one adapter from disk (8 loaded)"),
        ("hot_swap", "hot-swap an adapter's weights from disk"),
        ("switch", "switch the active adapter (unmerged)"),
        ("switch_merged", "switch the active adapter (merged)"),
    ):
        time_row(case, m("loralab", "manage-8", label), m("peft", "manage-8", label))

    warmup, reps, gen_reps, pre_reps, manage_reps = header["reps"]
    lines = [
        "# Mixed-batch adapters: loralab vs PEFT",
        "",
        f"- Command: `{header['command']}`",
        f"- Date: {header['date']}; took {header['elapsed']}",
        f"- Machine: {header['machine']}",
        f"- CPU load: {header['load']}",
        "- Set-up: SmolLM2-135M-Instruct, fp32, eval, no_grad; LoRA r=8, α=16 on "
        "q/k/v/o_proj; 32 rows, row i runs adapter i % N; identical weights on both sides "
        f"(max |Δlogits| on an 8-row mixed batch: {header['max_diff']:.2e}).",
        "- Method: one process per (side, case), the sides alternating; in each process the "
        "case is timed interleaved with a bare (unwrapped) copy of the base. Medians after "
        f"{warmup} warm-up: {reps} reps for decoding, {gen_reps} for generate, "
        f"{pre_reps[16]}/{pre_reps[64]} for prefill 16/64, {manage_reps} for management. "
        "Mixed times include entering `mixed_adapters` (loralab) / passing `adapter_names` "
        "(PEFT) for every call; prefill keeps the logits of the last position only.",
        "",
        "| Case | loralab | PEFT | loralab/PEFT | better |",
        "|---|---:|---:|---:|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        "Goals:",
        "",
    ]
    ok = generation[32] >= 2
    lines.append(
        f"- [{'x' if ok else ' '}] mixed-batch decoding at least 2× PEFT's throughput with 32 "
        f"adapters: generate {generation[32]:.2f}× "
        f"(a single decode step: {m('peft', 'decode-32', 'mixed') / m('loralab', 'decode-32', 'mixed'):.2f}×)"  # noqa: E501
    )
    for (length, n), ratio in prefill.items():
        ok = ratio <= 0.5
        lines.append(
            f"- [{'x' if ok else ' '}] in prefill at most half of PEFT's time above the bare "
            f"base: 32×{length}, {n} adapters: {ratio:.2f}×"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per decoding case")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
