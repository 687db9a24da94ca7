"""Serving many adapters over HTTP: ``loralab serve`` against the naive server and vLLM-CPU.

A closed loop of C concurrent clients (bounded in requests and in time) sends streamed
completions of a fixed prompt and a fixed output length (``ignore_eos``), each request
drawing its adapter from N; the same load goes, one server after another and the order
flipped every round, to:

- ``loralab serve`` (continuous batching, each row its own adapter; by default on
  loralab's engine for SmolLM2: prompts in chunks between the steps), and with
  ``--engine-weights bf16`` (its base weights in bf16, where the CPU has AVX512-BF16 or
  AMX);
- ``loralab serve --engine hf`` (the same server on Transformers' forward and cache, the
  default before);
- ``naive_server.py``: FastAPI and PEFT, one request at a time, ``set_adapter`` then
  ``generate`` (not streamed: its time to first token is the whole request);
- llama.cpp's ``llama-server`` (``--llama-server PATH``, built from llama.cpp's source:
  ``benchmarks/README.md``; skipped without it) on the base exported to F32 GGUF with the
  32 adapters exported to GGUF by loralab, all loaded at start and each request naming
  its own by index, over ``--llama-slots`` parallel slots (default 32);
- vLLM's CPU build serving the same adapter files with its OpenAI server, from a venv of
  its own (``--vllm-python``; skipped when there is none). Only adapter requests are
  sent: vLLM 0.32's CPU LoRA kernel applies the last adapter slot to base rows that share
  a batch with adapter rows (vllm-project/vllm PR #48421).

Then one decoding step of 32 rows over 32 adapters is profiled in this process, against
the time of its matrix products alone at this machine's measured speed.

``--stall`` measures instead what a long prompt costs the others: 4 clients stream
completions (each request's tokens timed) while one client sends a prompt of
``STALL_PROMPT`` tokens; the largest gap between two tokens of a stream while that prompt
is prefilled, against the streams' median gap before it (a decoding step).

``--in-process`` measures the server's engine alone, without HTTP: in a fresh process per
side, 32 jobs over 32 adapters go to the engine's own round (``Engine._work``), each
finished job replaced by a new one at once, as the closed loop does. On a 2-core machine
the HTTP clients and the event loop share the cores with the engine; this is what the
engine itself gives.

    python benchmarks/bench_serve.py [--quick] [--write] [--vllm-python PATH] [--stall]
        [--sides ...] [--llama-server PATH] [--llama-slots N]
    python benchmarks/bench_serve.py --in-process [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import write_adapters  # PEFT-written adapter files
from measure import command_line, load_average, machine_line, median, now, result_line, run_worker

MODEL = "smollm2-135m"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle:"
NEW_TOKENS = 32
CLIENTS = 32
ADAPTER_COUNTS = (1, 8, 32)
VLLM_PYTHON = Path("/work/vllm-venv/bin/python")
HERE = Path(__file__).resolve().parent


# -- the servers ----------------------------------------------------------------------------


# loralab's servers by their engine flags
LORALAB_SIDES = {
    "loralab": ["--engine", "auto"],  # the default: loralab's engine for SmolLM2
    "loralab-hf": ["--engine", "hf"],  # Transformers' forward and cache (the default before)
    "loralab-engine-bf16": ["--engine", "engine", "--engine-weights", "bf16"],
}
SIDE_NAMES = {side: f"`loralab serve {' '.join(flags)}`" for side, flags in LORALAB_SIDES.items()}


def write_gguf(adapters: Path) -> None:
    """llama-server's files: the base as F32 GGUF and each adapter as a GGUF LoRA, written
    by loralab's own export (``adapters / "gguf"``)."""
    from loralab.files.gguf.adapter import export_adapter_gguf
    from loralab.files.gguf.merged import write_merged_gguf
    from loralab.models.embedded import embedded_gguf
    from loralab.models.loading import load_model

    folder = adapters / "gguf"
    folder.mkdir(exist_ok=True)
    model, _ = load_model(MODEL)
    for i in range(max(ADAPTER_COUNTS)):
        export_adapter_gguf(adapters / f"a{i}", model.config, folder / f"a{i}.gguf")
    write_merged_gguf(embedded_gguf(MODEL), folder / "base-f32.gguf", "f32")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(side: str, adapters: Path, port: int, args) -> tuple[list, dict]:
    names = [f"a{i}" for i in range(max(ADAPTER_COUNTS))]
    env = dict(os.environ)
    if side == "llama-server":  # every adapter loaded at start, chosen per request by id
        command = [str(args.llama_server), "-m", str(adapters / "gguf" / "base-f32.gguf")]
        command += ["--lora", ",".join(str(adapters / "gguf" / f"{n}.gguf") for n in names)]
        command += ["--lora-init-without-apply", "--host", "127.0.0.1", "--port", str(port)]
        command += ["-np", str(args.llama_slots), "-c", str(args.llama_slots * 256), "-cb"]
        threads = str(torch_threads())
        command += ["--threads-http", str(CLIENTS + 4)]  # one a connection: none turned away
        return [*command, "-t", threads, "-tb", threads, "--no-webui"], env
    if side in LORALAB_SIDES:
        pinned = [x for n in names for x in ("--adapter", f"{n}={adapters / n}")]
        command = [sys.executable, "-m", "loralab", "serve", "--model", MODEL, "--port", str(port)]
        command += LORALAB_SIDES[side]
        return [*command, "--max-batch", str(CLIENTS), "--max-loras", str(len(names)), *pinned], env
    if side == "naive":
        command = [sys.executable, str(HERE / "naive_server.py"), "--adapter-dir", str(adapters)]
        return [*command, "--port", str(port)], env
    from loralab.models.embedded import embedded_model_dir

    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; its default asks for most of the memory
    command = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(embedded_model_dir(MODEL)), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--max-model-len", "512"]
    command += ["--enable-lora", "--max-loras", str(len(names)), "--max-lora-rank", "8"]
    command += ["--lora-modules", *(f"{n}={adapters / n}" for n in names)]
    return command, env


@contextlib.contextmanager
def running(side: str, adapters: Path, args, log_dir: Path):
    port = free_port()
    command, env = server_command(side, adapters, port, args)
    log = (log_dir / f"{side}.log").open("a")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=log, cwd=log_dir, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{side} did not start; see {log.name}")
            time.sleep(0.5)
        print(f"  {side} up in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


# -- the clients ----------------------------------------------------------------------------


async def one_request(
    http: httpx.AsyncClient, url: str, model: str, stream: bool, by_id: bool = False
) -> dict:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {}
    if by_id:  # llama-server: the adapter by its index among those it loaded
        body["lora"] = [{"id": int(model[1:]), "scale": 1.0}]
        # its HTTP library closes a connection idle for 5 s, which a pooled connection
        # may be when reused (seen: "Server disconnected without sending a response")
        headers["Connection"] = "close"
    start = time.perf_counter()
    if not stream:
        response = await http.post(url + "/v1/completions", json=body, headers=headers)
        response.raise_for_status()
        done = time.perf_counter() - start
        return {"tokens": response.json()["usage"]["completion_tokens"], "ttft": done, "gaps": []}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    arrivals, tokens = [], 0
    request = http.stream("POST", url + "/v1/completions", json=body, headers=headers)
    async with request as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    tokens = tokens or len(arrivals)  # a server that gives no usage: one token a chunk
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"tokens": tokens, "ttft": arrivals[0] - start, "gaps": gaps}


async def closed_loop(
    url: str, adapters: int, seconds: float, per_client: int, stream: bool, by_id: bool = False
):
    names = [f"a{i}" for i in range(adapters)]
    results: list[dict] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(index: int) -> None:
            draw = random.Random(index)
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                name = draw.choice(names)
                results.append(await one_request(http, url, name, stream, by_id))

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
    }


# -- a long prompt among running streams ------------------------------------------------------

STALL_PROMPT = 6000  # tokens
STALL_STREAMS = 4


def long_prompt(tokens: int) -> str:
    from transformers import AutoTokenizer

    from loralab.models.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(MODEL))
    words = (PROMPT + " ") * (tokens // 10)
    ids = tokenizer(words)["input_ids"][:tokens]
    return tokenizer.decode(ids)


async def stall(url: str, prompt: str) -> dict:
    """Streams run; then the long prompt is sent; the streams' token gaps are kept with
    their times, and the long prompt's first token's time."""
    arrivals: list[list[float]] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=STALL_STREAMS + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:

        async def streamer(index: int) -> None:
            body = {"model": f"a{index}", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
            body |= {"ignore_eos": True, "stream": True}
            while not done.is_set():
                times: list[float] = []
                arrivals.append(times)
                async with http.stream("POST", url + "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choices = json.loads(line[6:]).get("choices", [])
                        if any(c.get("text") for c in choices):
                            times.append(time.perf_counter())

        async def long_one() -> dict:
            await asyncio.sleep(8)  # the streams are running
            body = {"model": "a9", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            sent = time.perf_counter()
            response = await http.post(url + "/v1/completions", json=body)
            response.raise_for_status()
            finished = time.perf_counter()
            done.set()
            return {"sent": sent, "finished": finished, "usage": response.json()["usage"]}

        streams = [asyncio.create_task(streamer(i)) for i in range(STALL_STREAMS)]
        result = await long_one()
        await asyncio.gather(*streams)
    sent, finished = result["sent"], result["finished"]
    before = [b - a for t in arrivals for a, b in itertools.pairwise(t) if b < sent]
    during = [
        b - a for t in arrivals for a, b in itertools.pairwise(t) if b > sent and a < finished
    ]
    return {
        "prompt_tokens": result["usage"]["prompt_tokens"],
        "prefill_s": finished - sent,
        "step_ms": median(before) * 1e3,
        "max_gap_ms": max(during, default=float("nan")) * 1e3,
        "p99_gap_ms": percentile(during, 99) * 1e3,
        "p50_gap_ms": percentile(during, 50) * 1e3,
        "tokens_during": len(during),
    }


def stall_main(args) -> None:
    loads = [load_average()]
    prompt = long_prompt(STALL_PROMPT)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        adapters = scratch / "adapters"
        write_adapters(adapters, max(ADAPTER_COUNTS))
        for side in [s for s in args.sides if s.startswith("loralab")]:
            print(f"stall: {side}", file=sys.stderr)
            with running(side, adapters, args, scratch) as url:
                results[side] = asyncio.run(stall(url, prompt))
    loads.append(load_average())
    lines = [
        "# A long prompt among running streams: `loralab serve`",
        "",
        f"`{command_line(__file__)}`, {now()}; {machine_line()}; load average before "
        f"{loads[0]}, after {loads[1]}.",
        "",
        f"SmolLM2-135M-Instruct, fp32; {STALL_STREAMS} clients stream completions (64 tokens "
        "each, again and again) when one more sends a prompt of "
        f"{results[next(iter(results))]['prompt_tokens']} tokens (1 new token). *step*: the "
        "streams' median gap between tokens before it; *largest gap*: the largest gap of a "
        "stream while it is prefilled (its median and 99th percentile beside it: on 2 "
        "shared cores the largest of a thousand gaps also catches the machine's noise).",
        "",
        "| server | long prompt's time (s) | step (ms) | largest gap (ms) | gap / step | "
        "gap p50 / p99 (ms) | stream tokens meanwhile |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in results.items():
        name = SIDE_NAMES[side]
        lines.append(
            f"| {name} | {r['prefill_s']:.1f} | {r['step_ms']:.0f} | {r['max_gap_ms']:.0f} | "
            f"{r['max_gap_ms'] / r['step_ms']:.1f} | {r['p50_gap_ms']:.0f} / "
            f"{r['p99_gap_ms']:.0f} | {r['tokens_during']} |"
        )
    publish(lines, "results_serve_stall.md", args.write)


def publish(lines: list[str], name: str, write: bool) -> None:
    """Print a report and, with ``--write``, keep it as ``benchmarks/<name>``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        (HERE / name).write_text(text)


# -- the engine alone --------------------------------------------------------------------------


IN_PROCESS = {  # side: (serve's --engine, --engine-weights)
    "loralab": ("auto", "fp32"),
    "loralab-apart": ("auto", "fp32"),  # the prompts' rounds apart from the steps, as before
    "loralab-whole": ("auto", "fp32"),  # every product whole, as before the slices
    "loralab-hf": ("hf", "fp32"),
    "loralab-engine-bf16": ("engine", "bf16"),
}
SIDE_NAMES["loralab-apart"] = "`loralab serve --engine auto`, each prefill round apart"
SIDE_NAMES["loralab-whole"] = "`loralab serve --engine auto`, fp32 products whole (no slices)"


def served_engine(adapters: Path, kind: str, weights: str):
    """The server's engine in this process (``--engine kind --engine-weights weights``)
    over SmolLM2 with the adapters a0 … a31 pinned, and its tokenizer."""
    import torch

    from loralab.models.loading import load_model
    from loralab.serve.adapter_pool import AdapterPool
    from loralab.serve.engine import Engine
    from loralab.serve.metrics import Metrics

    torch.set_grad_enabled(False)
    model, tokenizer = load_model(MODEL)
    metrics = Metrics()
    pool = AdapterPool(model, MODEL, CLIENTS, adapters, metrics)
    for i in range(CLIENTS):
        pool.add_pinned(f"a{i}", adapters / f"a{i}")
    engine = Engine(
        model, tokenizer, pool, metrics, max_batch=CLIENTS, engine=kind, engine_weights=weights
    )
    return engine, tokenizer


def in_process_worker(side: str, seconds: float, adapters: Path) -> None:
    """The engine's output tokens per second over ``seconds`` after a warm-up of 5 s."""
    from loralab.serve.engine import Finished, Job
    from loralab.serve.sampling import Sampling

    engine, tokenizer = served_engine(adapters, *IN_PROCESS[side])
    if side == "loralab-apart":  # what the engine did before its rounds rode in the steps
        engine._shares_steps = lambda: False
    if side == "loralab-whole":  # MKL's products whole, as before ``engine/products.py``
        from loralab.engine import products

        products.MAX_ROWS = 0
    prompt = tokenizer(PROMPT)["input_ids"]
    finished: list[int] = []
    tokens = [0]

    def submit(client: int) -> None:
        def emit(event) -> None:
            if isinstance(event, Finished):
                tokens[0] += event.completion_tokens
                finished.append(client)

        job = Job(list(prompt), f"a{client}", NEW_TOKENS, Sampling(temperature=0), (), emit)
        engine.submit(job)

    def run(span: float) -> float:
        tokens[0], start = 0, time.perf_counter()
        while time.perf_counter() - start < span:
            while finished:
                submit(finished.pop())
            engine._work()  # the engine's own round, on this thread
        return tokens[0] / (time.perf_counter() - start)

    # One client more a round: jobs submitted together would run in lockstep, all ending
    # at one step and all prefilled with no stream running, which HTTP clients never do;
    # staggered, about one job ends and one prompt goes in at each step, as over HTTP.
    for client in range(CLIENTS):
        submit(client)
        engine._work()
    run(5.0)
    result_line({"tokens_per_s": run(seconds)})


def in_process_main(args) -> None:
    seconds, rounds = (8.0, 1) if args.quick else (20.0, 3)
    loads = [load_average()]
    import torch

    from loralab.engine.weights import choose

    sides = [s for s in IN_PROCESS if IN_PROCESS[s][1] == "fp32"]
    if choose("auto", torch.device("cpu"))[0] == "bf16":  # elsewhere bf16 is refused
        sides.append("loralab-engine-bf16")
    samples: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as scratch:
        adapters = Path(scratch) / "adapters"
        write_adapters(adapters, CLIENTS)
        for index in range(rounds):
            order = sides if index % 2 == 0 else sides[::-1]
            for side in order:
                arguments = ["in-process", side, str(seconds), str(adapters)]
                result = run_worker(__file__, arguments, f"{side} (round {index + 1})")
                samples[side].append(result["tokens_per_s"])
    loads.append(load_average())
    default = median(samples["loralab-hf"])
    lines = [
        "# The server's engine alone: `loralab serve`'s rounds without HTTP",
        "",
        f"`{command_line(__file__)}`, {now()}; {machine_line()}; load average before "
        f"{loads[0]}, after {loads[1]}.",
        "",
        f"SmolLM2-135M-Instruct; {CLIENTS} jobs over {CLIENTS} adapters (r = 8 on q, v, "
        f"written by PEFT), {NEW_TOKENS} new tokens each, greedy, each finished job "
        "replaced at once, the first ones started a round apart (so that they do not run in "
        "lockstep); the engine's own rounds (admission, prefill, one step) on one "
        f"thread, {seconds:g} s a side after 5 s of warm-up, each side in a fresh process, "
        f"{rounds} round(s) with the order flipped. Output tokens per second, the median "
        "and the range.",
        "",
        "| server | output tokens/s | × Transformers' path |",
        "|---|---:|---:|",
    ]
    for side, values in samples.items():
        lines.append(
            f"| {SIDE_NAMES[side]} | {median(values):.1f} [{min(values):.1f}–{max(values):.1f}] "
            f"| {median(values) / default:.2f} |"
        )
    publish(lines, "results_serve_inprocess.md", args.write)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure_side(side: str, url: str, seconds: float, per_client: int) -> dict:
    stream, by_id = side != "naive", side == "llama-server"
    asyncio.run(closed_loop(url, max(ADAPTER_COUNTS), 600, 1, stream, by_id))  # warm: one each
    return {
        n: asyncio.run(closed_loop(url, n, seconds, per_client, stream, by_id))
        for n in ADAPTER_COUNTS
    }


# -- one decoding step, profiled --------------------------------------------------------------


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def profile_step(adapters: Path, side: str, steps: int = 8, weights: str = "fp32") -> dict:
    """One decoding step of 32 rows over 32 adapters inside the engine, and the time its
    matrix products take alone (each shape re-run by itself at this machine's speed)."""
    from torch.profiler import ProfilerActivity, profile

    from loralab.serve.engine import Job
    from loralab.serve.sampling import Sampling

    engine, tokenizer = served_engine(adapters, side, weights)  # side: engine or hf
    model = engine.model
    prompt = tokenizer(PROMPT)["input_ids"]
    for i in range(CLIENTS):
        job = Job(list(prompt), f"a{i}", 8 * steps + 8, Sampling(temperature=0), (), lambda e: None)
        engine.submit(job)
    while len(engine.rows) < CLIENTS:  # the engine's own methods, on this thread
        engine._work()
    for _ in range(3):
        engine._step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine._step()
        times.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            engine._step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    in_matmuls = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / steps / 1e3
    alone = sum(
        alone_ms(e.key, e.input_shapes, e.count // steps) for e in events if e.key in MATMULS
    )
    by_op: dict[str, float] = {}
    for e in prof.key_averages():
        by_op[e.key] = e.self_cpu_time_total / steps / 1e3
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    flops = sum(
        matmul_flops(e.key, e.input_shapes) * e.count / steps for e in events if e.key in MATMULS
    )
    rows = engine.engine_rows
    memory = ""
    if rows is not None:  # the engine's own memory beside the weights
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        factors = sum(
            t.numel() * t.element_size()
            for layer in rows._plan.layers
            for group in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if group.update is not None
            for t in (group.update.A, group.update.Bt)
        )
        packed = sum(
            group.packed.weight.numel() * 2
            for layer in rows._plan.layers
            for group in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if group.packed is not None
        )
        if rows._plan.head is not None:
            packed += rows._plan.head.weight.numel() * 2
        copies = f" (and their bf16 copies {packed / 2**20:.0f} MiB)" if packed else ""
        memory = (
            f"weights {weight_bytes / 2**20:.0f} MiB{copies}, KV cache "
            f"{rows.rows.cache.nbytes() / 2**20:.0f} MiB ({rows.rows.cache.rows} rows × "
            f"{rows.rows.cache.length} positions), the rows' "
            f"gathered factors {factors / 2**20:.1f} MiB"
        )
    return {
        "memory": memory,
        "side": side if weights == "fp32" else f"{side}, {weights} weights",
        "rows": CLIENTS,
        "width": max(rows.lengths) if rows is not None else engine.cache.width,
        "step_ms": median(times),
        "profiled_ms": total,
        "matmul_ms": in_matmuls,
        "matmul_alone_ms": alone,
        "gflop": flops / 1e9,
        "top": top,
    }


def _operands(key: str, shapes: list) -> tuple[list, list]:
    """The two factors of a matrix product as the profiler recorded its inputs."""
    if key in ("aten::addmm", "aten::baddbmm"):
        return shapes[1], shapes[2]
    if key == "mkldnn::_linear_pointwise":  # x (M, in) and the packed weight (out, in)
        return shapes[0], shapes[1][::-1]
    return shapes[0], shapes[1]


def matmul_flops(key: str, shapes: list) -> float:
    left, right = _operands(key, shapes)
    batch = left[0] if len(left) == 3 else 1
    return 2.0 * batch * left[-2] * left[-1] * right[-1]


def alone_ms(key: str, shapes: list, count: int, reps: int = 5) -> float:
    """``count`` products of these shapes by themselves, as the step runs them: each with
    its own weight (out, in), read transposed, so that weights come from memory as in a
    step and not from a cache warmed by the same one run again."""
    import torch

    left, right = _operands(key, shapes)
    a = torch.randn(left)
    if key == "mkldnn::_linear_pointwise":  # bf16 weights, packed as the engine packs them
        from loralab.engine.weights import packed

        owners = [torch.nn.Module() for _ in range(count)]
        weights = [packed(o, [torch.randn(right[1], right[0])], [None]) for o in owners]
        a = a.bfloat16()

        def product(x, w):
            return torch.ops.mkldnn._linear_pointwise(x, w.weight, None, "none", [], "")
    elif len(right) == 2:
        weights = [torch.randn(right[1], right[0]).t() for _ in range(count)]
        product = torch.mm
    else:
        weights = [torch.randn(right) for _ in range(count)]
        product = torch.bmm
    for b in weights:
        product(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        for b in weights:
            product(a, b)
    return (time.perf_counter() - start) / reps * 1e3


# -- the report ---------------------------------------------------------------------------------


def summarize(rounds: list[dict]) -> dict:
    """The median over rounds of every figure, per side and adapter count."""
    out: dict = {}
    for side in rounds[0]:
        out[side] = {}
        for n in ADAPTER_COUNTS:
            figures = [r[side][n] for r in rounds if side in r]
            out[side][n] = {k: median([f[k] for f in figures]) for k in figures[0]}
            out[side][n]["range"] = (
                min(f["tokens_per_s"] for f in figures),
                max(f["tokens_per_s"] for f in figures),
            )
    return out


def report(results: dict, profile_figures: dict, settings: str, loads: tuple) -> str:
    lines = [
        "# Serving many adapters: `loralab serve` against other servers",
        "",
        f"`{command_line(__file__)}`, {now()}; {machine_line()}; load average before "
        f"{loads[0]}, after {loads[1]}.",
        "",
        f"SmolLM2-135M-Instruct, fp32; {CLIENTS} clients in a closed loop ({settings}); "
        f"prompt of {len(PROMPT.split())} words, {NEW_TOKENS} new tokens each "
        "(`ignore_eos`), greedy; each request's adapter drawn from N (r = 8 on q, v, "
        "written by PEFT). Medians over the rounds; the tokens/s range in brackets.",
        "",
        "| server | N | output tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | requests |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side, by_n in results.items():
        for n, f in by_n.items():
            low, high = f["range"]
            itl = "—" if side == "naive" else f"{f['itl_p50'] * 1e3:.0f} / {f['itl_p99'] * 1e3:.0f}"
            lines.append(
                f"| {side} | {n} | {f['tokens_per_s']:.1f} [{low:.1f}–{high:.1f}] | "
                f"{f['ttft_p50'] * 1e3:.0f} / {f['ttft_p99'] * 1e3:.0f} | {itl} | "
                f"{f['requests']:.0f} |"
            )
    ours = results.get("loralab")
    if ours is not None:  # the ratios, against the default server
        lines += ["", "Ratios of output tokens/s:", ""]
        for other in [s for s in results if s != "loralab"]:
            cells = ", ".join(
                f"N = {n}: {ours[n]['tokens_per_s'] / results[other][n]['tokens_per_s']:.2f}×"
                for n in ADAPTER_COUNTS
            )
            lines.append(f"- loralab / {other}: {cells}")
        top, low = max(ADAPTER_COUNTS), min(ADAPTER_COUNTS)
        lines.append(
            f"- loralab over {top} adapters / over {low}: "
            f"{ours[top]['tokens_per_s'] / ours[low]['tokens_per_s']:.2f}×"
        )
    for p in profile_figures:
        name = (
            "Transformers' forward (`--engine hf`)"
            if p["side"] == "hf"
            else f"loralab's engine ({p['side']})"
        )
        lines += [
            "",
            f"One decoding step of {p['rows']} rows over {p['rows']} adapters (cache width "
            f"{p['width']}), on {name}: {p['step_ms']:.1f} ms (median of the timed steps; "
            f"{p['profiled_ms']:.1f} ms under the profiler). Its matrix products are "
            f"{p['gflop']:.2f} GFLOP: {p['matmul_ms']:.1f} ms inside the step, "
            f"{p['matmul_alone_ms']:.1f} ms when each shape runs alone "
            f"({p['gflop'] / p['matmul_alone_ms'] * 1e3:.0f} GFLOP/s): the step is "
            f"{p['step_ms'] / p['matmul_alone_ms']:.2f}× its products' time alone.",
            "",
            "Where the profiled step goes (self time, ms): "
            + ", ".join(f"`{k}` {v:.1f}" for k, v in p["top"]),
        ]
        if p["memory"]:
            lines += ["", f"The engine's memory: {p['memory']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also write results_serve.md (results_serve_engine.md when the sides are "
        "loralab's; results_serve_llama_server.md when they are loralab's and llama-server; "
        "results_serve_stall.md with --stall)",
    )
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="a llama-server binary (built from llama.cpp's source; see benchmarks/README.md)",
    )
    parser.add_argument(
        "--llama-slots", type=int, default=CLIENTS, help="llama-server's parallel slots"
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=[*LORALAB_SIDES, "naive", "vllm", "llama-server"],
        choices=[*LORALAB_SIDES, "naive", "vllm", "llama-server"],
    )
    parser.add_argument("--stall", action="store_true", help="a long prompt among streams, instead")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every side (default 2)")
    parser.add_argument("--no-profile", action="store_true", help="no profiled step after")
    parser.add_argument(
        "--in-process", action="store_true", help="the server's engine alone, without HTTP"
    )
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # in-process SIDE SECONDS ADAPTERS
        return in_process_worker(args.worker[1], float(args.worker[2]), Path(args.worker[3]))
    if args.stall:
        return stall_main(args)
    if args.in_process:
        return in_process_main(args)
    seconds, per_client, rounds = (10, 3, 1) if args.quick else (40, 6, args.rounds)
    sides = list(args.sides)
    if "vllm" in sides and not args.vllm_python.exists():
        print(f"no vLLM at {args.vllm_python}: its side is skipped", file=sys.stderr)
        sides.remove("vllm")
    if "llama-server" in sides and not (args.llama_server and args.llama_server.exists()):
        print("no --llama-server binary: its side is skipped", file=sys.stderr)
        sides.remove("llama-server")
    loads = [load_average()]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        adapters = scratch / "adapters"
        write_adapters(adapters, max(ADAPTER_COUNTS))
        if "llama-server" in sides:
            write_gguf(adapters)
        measured = []
        for index in range(rounds):
            order = sides if index % 2 == 0 else sides[::-1]
            this_round = {}
            for side in order:
                print(f"round {index + 1}: {side}", file=sys.stderr)
                with running(side, adapters, args, scratch) as url:
                    this_round[side] = measure_side(side, url, seconds, per_client)
            measured.append({s: this_round[s] for s in sides})
        import torch

        from loralab.engine.weights import choose

        profiled = () if args.no_profile else ("engine", "hf")
        profile_figures = [profile_step(adapters, side) for side in profiled]
        if profiled and choose("auto", torch.device("cpu"))[0] == "bf16":
            profile_figures.insert(1, profile_step(adapters, "engine", weights="bf16"))
    loads.append(load_average())
    settings = f"at most {per_client} requests a client and {seconds} s a case, {rounds} round(s)"
    text = report(summarize(measured), profile_figures, settings, tuple(loads))
    print(text)
    if args.write:
        name = "results_serve.md"
        if set(sides) <= set(LORALAB_SIDES):
            name = "results_serve_engine.md"
        elif set(sides) <= {*LORALAB_SIDES, "llama-server"}:
            name = "results_serve_llama_server.md"
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
