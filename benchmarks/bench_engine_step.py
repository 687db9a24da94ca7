"""One decoding step of loralab's engine, and what would make it faster: SmolLM2-135M with
one unmerged LoRA (r = 8 on q, k, v, o), R rows at position 32 (live length 64), the
greedy token out, timed as

- the model's own modules (``engine/llama.py``, eager);
- the fast step over the model's tensors (``engine/step.py``, eager: what the engine runs);
- the same with bf16 base weights (``--engine-weights bf16``; where the CPU has
  AVX512-BF16 or AMX), against its own products alone;
- the fast step ``torch.compile``d for this one shape (``dynamic=False``), with its
  compile time: the gain a compiled step would bring, and its price;
- the step's matrix products alone (each product of the step re-run by itself, same
  shapes and weights, as the step runs them: in slices at a few rows,
  ``engine/products.py``): the floor for this arithmetic, which no eager or compiled step
  beats;
- the time to read the model's weights once on every thread (a ``sum`` over them): the
  floor under any way of multiplying by them.

The sides alternate, two rounds of 30 steps each.

    python benchmarks/bench_engine_step.py [--rows 1 8] [--no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from measure import interleaved, machine_line, median, now, timed

STEPS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    from loralab import LoraConfig, inject_adapter
    from loralab.models.loading import load_model

    torch.set_grad_enabled(False)
    model, _ = load_model("smollm2-135m")
    inject_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if ".lora." in name:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    print(f"{now()}; {machine_line()}")
    for rows in args.rows:
        measure(model, rows, not args.no_compile)


def measure(model, rows: int, compile_too: bool) -> None:
    from loralab.engine import step
    from loralab.engine.runner import Runner

    runner = Runner(model, rows, 512)
    plan = runner.plan()
    modules = runner.plan()
    modules.layers, modules.reason = None, "for comparison"
    zeros, ones = torch.zeros(rows), torch.ones(rows)
    prompt = torch.arange(1, 33).expand(rows, 32)
    runner.forward(plan, prompt, torch.arange(32).expand(rows, 32))

    def stepper(rows_plan):
        return lambda t, p: runner.decode_step(rows_plan, t, p, zeros, ones, zeros)

    def fast_step(runner, rows_plan):
        """The step as one function of tensors, greedy (what a compiler takes)."""

        def run(token, position, live):
            hidden = step.forward(
                model, rows_plan.layers, runner.cache, token[:, None], position[:, None],
                runner.rotary, live,
            )  # fmt: skip
            return step.head(model, rows_plan.head, hidden[:, 0]).argmax(-1)

        return run

    sides = {"modules (eager)": stepper(modules), "fast step (eager)": stepper(plan)}
    from loralab.engine.weights import choose as choose_weights

    compiling = [("fast step (compiled)", runner, plan)]
    half_floor = None
    if choose_weights("auto", torch.device("cpu"))[0] == "bf16":
        halves = Runner(model, rows, 512, "bf16")
        half = halves.plan()
        halves.forward(half, prompt, torch.arange(32).expand(rows, 32))
        sides["fast step, bf16 weights (eager)"] = lambda t, p: halves.decode_step(
            half, t, p, zeros, ones, zeros
        )
        half_floor = _products_alone(model, half.layers, rows, half.head)
        # Inductor packs weights itself: under compile the bf16 copies go in unpacked
        compiling.append(("fast step, bf16 weights (compiled)", halves, _unpacked(model, half)))
    compile_s, failed = {}, {}
    for name, owner, rows_plan in compiling if compile_too else ():
        compiled = torch.compile(fast_step(owner, rows_plan), dynamic=False)
        start = time.perf_counter()
        try:
            compiled(torch.full((rows,), 5), torch.full((rows,), 32), 64)
        except Exception as error:  # reported; the other sides go on
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            continue
        compile_s[name] = time.perf_counter() - start
        sides[name] = lambda t, p, compiled=compiled: compiled(t, p, 64)
    token = torch.full((rows,), 5)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(2):
        for name, run in sides.items():
            for i in range(3):  # warm-up
                run(token, torch.full((rows,), 32 + i))
            start = time.perf_counter()
            for i in range(STEPS):
                run(token, torch.full((rows,), 32 + i))
            times[name].append((time.perf_counter() - start) / STEPS * 1e3)
    floor = _products_alone(model, plan.layers, rows)
    read = _reading(model)
    print(f"\n{rows} row(s):")
    for name, values in times.items():
        own = half_floor if "bf16" in name else floor
        print(f"  {name}: {median(values):.1f} ms ({median(values) / own:.2f}× its products)")
    print(f"  its matrix products alone: {floor:.1f} ms")
    print(f"  reading its weights once: {read:.1f} ms ({floor / read:.2f}× for the products)")
    if half_floor is not None:
        print(f"  its matrix products alone with bf16 weights: {half_floor:.1f} ms")
    for name, seconds in compile_s.items():
        print(f"  compiling {name} for this shape took {seconds:.0f} s")
    for name, reason in failed.items():
        print(f"  {name} did not compile: {reason}")


def _unpacked(model, rows_plan):
    """A copy of a bf16 plan whose groups and head hold plain bf16 weights, not oneDNN's
    packed ones (which Inductor's lowering does not take)."""
    import copy

    from loralab.engine.weights import Packed

    result = copy.copy(rows_plan)
    result.layers = []
    for layer in rows_plan.layers:
        layer = copy.copy(layer)
        for name in ("qkv", "o", "gate_up", "down"):
            group = copy.copy(getattr(layer, name))
            weight = torch.cat([w.detach() for w in group.weights]).bfloat16()
            group.packed = Packed(weight, group.packed.bias, onednn=False)
            setattr(layer, name, group)
        result.layers.append(layer)
    if rows_plan.head is not None:
        head = model.lm_head.weight.detach().bfloat16()
        result.head = Packed(head, rows_plan.head.bias, onednn=False)
    return result


def _reading(model) -> float:
    """The time to read every base weight of the step once (a sum over each)."""
    weights = [p for n, p in model.named_parameters() if ".lora." not in n and p.dim() == 2]
    weights = [w for w in weights if w is not model.model.embed_tokens.weight]
    weights.append(model.lm_head.weight)  # tied to the embedding: read once, as the head

    def run() -> None:
        for weight in weights:
            weight.sum()

    return median(interleaved({"read": lambda: timed(run)}, warmup=3, reps=10)["read"])


def _products_alone(model, layers, rows: int, head=None) -> float:
    """The time of the step's matrix products, each run alone on its own weights (the
    groups' packed bf16 weights and ``head`` where the plan has them, with the casts)."""
    from loralab.engine.products import linear as sliced
    from loralab.engine.weights import linear

    x = {}
    products, packed = [], []
    for plan in layers:
        for group in (plan.qkv, plan.o, plan.gate_up, plan.down):
            width = group.weights[0].shape[1]
            if group.packed is not None:
                packed.append((width, group.packed))
            else:
                products += [(width, w) for w in group.weights]
            if group.update is not None:
                products.append((width, group.update.A))
                products.append((group.update.A.shape[0], group.update.Bt.T))
    if head is not None:
        packed.append((model.lm_head.weight.shape[1], head))
    else:
        products.append((model.lm_head.weight.shape[1], model.lm_head.weight))
    for width, _ in products + packed:
        x.setdefault(width, torch.randn(rows, width))

    def run() -> None:
        for width, weight in products:
            sliced(x[width], weight)  # as the step runs them: in slices at a few rows
        for width, weights in packed:
            linear(x[width], weights)

    return median(interleaved({"products": lambda: timed(run)}, warmup=3, reps=10)["products"])


if __name__ == "__main__":
    main()
