"""What a decoding step's matrix products can cost on this CPU: the 60 MLP weights of
SmolLM2-135M's 30 layers (1536 × 576 and 576 × 1536, 53 M parameters, 212 MB in fp32)
times a batch of M rows, M = 1, 8, 32, as

- fp32 ``x @ W.T`` (PyTorch's default CPU path: MKL);
- fp32 through oneDNN with the weights packed for it (``mkldnn._linear_pointwise``);
- bf16 through oneDNN, packed (fast only where the CPU has AVX512-BF16 or AMX).

The weights are read once per product, as in a step. Medians of 7 runs, the sides
alternated; GB/s counts the
fp32 bytes (212 MB) for every side, so a side above fp32's figure is faster at the same
work. This is the floor under the engine's step (``bench_engine_step.py``) and why fp32
decoding of 8 rows costs more than twice one row's.

    python benchmarks/bench_small_matmuls.py
"""

from __future__ import annotations

from functools import partial

import torch
from measure import interleaved, machine_line, median, now, timed

LAYERS = 30


def main() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(1536, 576) for _ in range(LAYERS)]
    weights += [torch.randn(576, 1536) for _ in range(LAYERS)]
    gigabytes = sum(w.numel() for w in weights) * 4 / 1e9
    print(f"{now()}; {machine_line()}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for rows in (1, 8, 32):
        sides = {name: partial(timed, run) for name, run in sides_for(weights, rows).items()}
        for name, samples in interleaved(sides, warmup=2, reps=7).items():
            ms = median(samples)
            print(f"M = {rows:2d}, {name}: {ms:5.1f} ms, {gigabytes / ms * 1e3:5.1f} GB/s")


def sides_for(weights: list[torch.Tensor], rows: int) -> dict:
    linear = torch.ops.mkldnn._linear_pointwise
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    packed_bf16 = [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows) for w in weights]
    inputs = {n: torch.randn(rows, n) for n in (576, 1536)}
    halves = {n: x.bfloat16() for n, x in inputs.items()}
    pairs = list(zip(weights, packed, packed_bf16, strict=True))
    return {
        "fp32, MKL": lambda: [inputs[w.shape[1]] @ w.T for w in weights],
        "fp32, oneDNN packed": lambda: [
            linear(inputs[w.shape[1]], p, None, "none", [], "") for w, p, _ in pairs
        ],
        "bf16, oneDNN packed": lambda: [
            linear(halves[w.shape[1]], b, None, "none", [], "") for w, _, b in pairs
        ],
    }


if __name__ == "__main__":
    main()
