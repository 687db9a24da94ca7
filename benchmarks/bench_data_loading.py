"""Reading training data: a Parquet file against the same records in JSONL, at 25,000,
50,000 and 100,000 rows — the time ``loralab.data.records.read_splits`` takes (what
``loralab train --data`` runs before any model loads: read, layout recognized, records
checked) and the memory it adds, to show that both grow linearly with the rows.

Records: prompt/completion pairs of about 300 characters, the same on every side. Every
measurement runs in a fresh process (this script with ``--worker``), the formats
alternating, the order flipped every round; the figures are medians over rounds. Memory
is the process's peak RSS less its RSS before reading (the libraries imported first:
``datasets`` and pyarrow for Parquet).

    python benchmarks/bench_data_loading.py            # 3 rounds
    python benchmarks/bench_data_loading.py --write    # also writes results_data_loading.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from measure import (
    command_line,
    load_average,
    median,
    now,
    peak_rss_mb,
    result_line,
    run_worker,
    status_mb,
)

RESULTS = Path(__file__).with_name("results_data_loading.md")
SIZES = (25_000, 50_000, 100_000)
FORMATS = ("parquet", "jsonl")
LETTERS = "abcdefghijklmnopqrstuvwxyz     "


def records(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(length: int) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(length)).strip() or "x"

    return [
        {"prompt": text(rng.randint(60, 140)), "completion": text(rng.randint(100, 260))}
        for _ in range(count)
    ]


def write_files(folder: Path) -> dict[tuple[str, int], Path]:
    import datasets

    paths = {}
    rows = records(max(SIZES))
    for size in SIZES:
        jsonl = folder / f"rows-{size}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:size]), encoding="utf-8")
        parquet = folder / f"rows-{size}.parquet"
        datasets.Dataset.from_list(rows[:size]).to_parquet(str(parquet))
        paths["jsonl", size] = jsonl
        paths["parquet", size] = parquet
    return paths


def worker(path: Path) -> None:
    from loralab.data.records import read_splits

    if path.suffix == ".parquet":
        import datasets  # noqa: F401  (imported before the baseline, as a run has it)
    before = status_mb("VmRSS") or 0.0
    start = time.perf_counter()
    splits = read_splits(path)
    seconds = time.perf_counter() - start
    result_line(
        {
            "seconds": seconds,
            "added_mb": peak_rss_mb() - before,
            "rows": len(splits["train"]),
            "file_mb": path.stat().st_size / 1e6,
        }
    )


def driver(write: bool, rounds: int) -> None:
    started = time.perf_counter()
    load_before = load_average()
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        paths = write_files(Path(scratch))
        for index in range(rounds):
            order = FORMATS[::-1] if index % 2 else FORMATS
            for size in SIZES:
                for kind in order:
                    label = f"round {index + 1}: {kind}, {size:,} rows"
                    result = run_worker(__file__, [str(paths[kind, size])], label)
                    assert result["rows"] == size
                    results.setdefault((kind, size), []).append(result)
    lines = [
        "# Reading 25,000–100,000 training records: Parquet and JSONL",
        "",
        f"`{command_line(__file__)}` — {now()}, "
        f"{(time.perf_counter() - started) / 60:.1f} min; load {load_before} before, "
        f"{load_average()} after; {rounds} round(s), medians.",
        "",
        "| format | rows | file (MB) | read (s) | µs per row | memory added (MB) | bytes per row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in FORMATS:
        for size in SIZES:
            runs = results[kind, size]
            seconds = median([r["seconds"] for r in runs])
            added = median([r["added_mb"] for r in runs])
            lines.append(
                f"| {kind} | {size:,} | {runs[0]['file_mb']:.1f} | {seconds:.2f} | "
                f"{1e6 * seconds / size:.1f} | {added:.0f} | {1e6 * added / size:.0f} |"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    if write:
        RESULTS.write_text(report, encoding="utf-8")
        print(f"written to {RESULTS}", file=sys.stderr)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS.name}")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    driver(args.write, args.rounds)


if __name__ == "__main__":
    main()
