"""What a decoding step's matrix products can cost on this CPU: the base weights of
SmolLM2-135M's 30 layers (q, k, v, o, gate, up, down: 106 M parameters, 425 MB in
fp32) and its output head (49,152 × 576, 113 MB), times a batch of M rows, M = 1, 2, 8,
32, as

- fp32 ``x @ W.T`` (PyTorch's default CPU path: MKL, which runs a few rows on one
  thread);
- fp32 in slices (``loralab.engine.products``, what the engine's step runs): each
  weight's output rows cut into slices, one ``bmm`` over them on every thread, the same
  bits as MKL's product (the column *same bits* checks it here);
- fp32 through oneDNN with the weights packed for it (``mkldnn._linear_pointwise``:
  other bits);
- int8 weights with one scale a row, the inputs in bf16 (PyTorch's weight-only int8
  kernel, ``--engine-weights int8``: a quarter of the bytes, other numbers);
- bf16 through oneDNN, packed (where oneDNN multiplies bf16: AVX-512 and up; fast only
  where the CPU has AVX512-BF16 or AMX);

and, as the floor for any of them, the time to read the same bytes once on every thread
(a ``sum`` over them). The weights are read once per product, as in a step. Medians of 7
runs, the sides alternated; GB/s counts the fp32 bytes for every side, so a side above
fp32's figure is faster at the same work.

    python benchmarks/bench_small_matmuls.py [--rows 1 2 8 32]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from measure import interleaved, machine_line, median, now, timed

from loralab.engine import products
from loralab.engine import weights as weights_module
from loralab.engine.weights import onednn_bf16

LAYERS = 30
SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32])
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [torch.randn(*shape) * 0.05 for _ in range(LAYERS) for shape in SHAPES]
    head = [torch.randn(*HEAD) * 0.05]
    print(f"{now()}; {machine_line()}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for what, weights in (("layers", layers), ("head", head)):
        gigabytes = sum(w.numel() for w in weights) * 4 / 1e9
        print(f"\n{what}: {len(weights)} weights, {gigabytes * 1e3:.0f} MB in fp32")
        flat = torch.cat([w.flatten() for w in weights])
        for rows in args.rows:
            runs = sides_for(weights, rows)
            runs["reading the bytes once (floor)"] = flat.sum
            timings = interleaved({n: partial(timed, r) for n, r in runs.items()}, warmup=2, reps=7)
            whole = median(timings["fp32, MKL"])
            same = _same_bits(weights, rows)
            for name, samples in timings.items():
                ms = median(samples)
                note = f", same bits: {same}" if "slices" in name else ""
                print(
                    f"  M = {rows:2d}, {name}: {ms:6.1f} ms, {gigabytes / ms * 1e3:5.1f} GB/s, "
                    f"{whole / ms:.2f}× MKL's speed{note}"
                )


def sides_for(weights: list[torch.Tensor], rows: int) -> dict:
    linear = torch.ops.mkldnn._linear_pointwise
    inputs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    sides = {
        "fp32, MKL": lambda: [inputs[w.shape[1]] @ w.T for w in weights],
        f"fp32, MKL in slices ({products.slices(weights[0].shape[0])} for the first)": lambda: [
            products.linear(inputs[w.shape[1]], w) for w in weights
        ],
        "fp32, oneDNN packed": lambda: [
            linear(inputs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(weights, packed, strict=True)
        ],
    }
    quantized = [weights_module.quantized(w) for w in weights]
    halves = {n: x.bfloat16() for n, x in inputs.items()}
    sides["int8 weights, bf16 inputs (--engine-weights int8)"] = lambda: [
        torch._weight_int8pack_mm(halves[q.shape[1]], q, scales) for q, scales in quantized
    ]
    if onednn_bf16():
        packed_bf16 = [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows) for w in weights]
        sides["bf16, oneDNN packed"] = lambda: [
            linear(halves[w.shape[1]], b, None, "none", [], "")
            for w, b in zip(weights, packed_bf16, strict=True)
        ]
    return sides


def _same_bits(weights: list[torch.Tensor], rows: int) -> str:
    """Whether each distinct shape's sliced product gives MKL's bits here (where not, the
    engine runs it whole)."""
    shapes = {tuple(w.shape): w for w in weights}
    verdicts = []
    for shape, weight in shapes.items():
        count = products.checked_slices(weight, rows, "plain")
        verdicts.append(f"{shape[0]}×{shape[1]}: {'yes' if count > 1 else 'no'}")
    return ", ".join(verdicts)


if __name__ == "__main__":
    main()
