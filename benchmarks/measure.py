"""What the benchmarks share: timing, interleaving, worker processes and the machine line.

Each benchmark runs its measurements in worker processes (the script itself with
``--worker …``) so that one side's allocations, caches and threads never touch the other's;
a worker prints one ``RESULT {json}`` line that ``run_worker`` reads back.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

Samples = dict[str, list[float]]


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds that ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(cases: dict[str, Callable[[], float]], warmup: int, reps: int) -> Samples:
    """Run the cases in turn, the order flipped every round; milliseconds after warm-up."""
    samples: Samples = {label: [] for label in cases}
    labels = list(cases)
    for round_index in range(warmup + reps):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            ms = cases[label]()
            if round_index >= warmup:
                samples[label].append(ms)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM`` …) in MB; None where
    there is no such file or field (off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    On Linux, ``VmHWM``: ``getrusage``'s ``ru_maxrss`` carries the peak of the process it
    was forked from across ``exec``, so a worker started by a driver holding 2 GB reported
    at least 2 GB whatever it did itself."""
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def result_line(payload: dict) -> None:
    """What a worker hands back: one line on stdout."""
    print("RESULT " + json.dumps(payload), flush=True)


def run_worker(script: str, arguments: Sequence[str], label: str) -> dict:
    """Run ``script --worker …`` in a fresh process and return its ``RESULT`` payload."""
    command = [sys.executable, script, "--worker", *arguments]
    print(f"  {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {label} failed (exit {done.returncode})")
    print(f"    {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import peft
    import transformers

    return (
        f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"peft {peft.__version__}, Python {platform.python_version()}"
    )


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command_line(script: str) -> str:
    return f"python benchmarks/{Path(script).name}" + "".join(f" {a}" for a in sys.argv[1:])
