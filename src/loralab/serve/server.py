"""``loralab serve``: load the base and the pinned adapters, then run the app on uvicorn."""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ..models.devices import base_dtype, choose_device, place
from ..models.loading import load_model
from .adapter_pool import DEFAULT_MAX_ADAPTER_BYTES, AdapterPool
from .app import DEFAULT_MAX_BODY, ServerState, create_app
from .engine import Engine
from .errors import RequestError
from .header_timeout import HeaderTimeoutProtocol
from .metrics import Metrics

log = logging.getLogger("loralab.serve")


@dataclass
class ServeOptions:
    model: str = "smollm2-135m"
    served_model_name: str | None = None  # the base's id for clients; None: see served_name
    adapters: list[tuple[str, Path]] = field(default_factory=list)  # pinned, NAME=DIR
    adapter_dir: Path | None = None  # run-time loading from inside it only
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_loras: int = 8
    max_cpu_loras: int | None = None  # None: max(max_loras, 64)
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES  # a run-time adapter's weights file
    max_waiting: int = 256
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    device: str | None = None  # auto, cpu, cuda, cuda:N (None: auto)
    dtype: str | None = None  # the base's weights: fp32, bf16, fp16, auto (None: fp32)
    quantized_base: str | None = None  # gguf, nf4, fp4, int8 (``QUANTIZED_BASES``); None: dense
    engine: str = "auto"  # auto: loralab's where it runs the model; engine: or refused; hf
    engine_weights: str = "fp32"  # loralab's engine's base weights: fp32, bf16, int8 or auto


def served_name(model: str) -> str:
    """The base's id in ``/v1/models`` when none is given: an alias or Hub id as it was
    given, a local path by its last component (no response shows a server's paths)."""
    path = Path(model)
    return path.name if path.exists() and path.name else model


class ServeError(ValueError):
    """A start-up setting or file the server cannot use (one line on the command line)."""


def build_state(options: ServeOptions) -> ServerState:
    """Everything but the socket: the model, the pinned adapters, the engine."""
    _check(options)
    device = choose_device(options.device)  # a GPU that is not there: before the load
    if options.engine != "hf":  # bf16 on a CPU without its units: before the load too
        from ..engine.weights import choose

        try:
            choose(options.engine_weights, device)
        except ValueError as error:
            raise ServeError(f"--engine-weights {options.engine_weights}: {error}") from None
    model, tokenizer = load_model(
        options.model,
        dtype=base_dtype(options.dtype),
        quantized_base=options.quantized_base,
        device=device,
    )
    place(model, device)
    base_name = options.served_model_name or served_name(options.model)
    metrics = Metrics()
    pool = AdapterPool(
        model,
        base_name,
        options.max_loras,
        options.adapter_dir,
        metrics,
        options.max_cpu_loras,
        options.max_adapter_bytes,
    )
    for name, directory in options.adapters:
        try:
            pool.add_pinned(name, Path(directory))
        except RequestError as error:
            raise ServeError(f"--adapter {name}={directory}: {error.message}") from None
    try:
        engine = Engine(
            model, tokenizer, pool, metrics, options.max_batch, options.max_waiting,
            options.engine, options.engine_weights,
        )  # fmt: skip
    except ValueError as error:  # the engine cannot run the model, or bf16 on this CPU
        raise ServeError(f"--engine {options.engine}: {error}") from None
    return ServerState(
        engine, pool, tokenizer, base_name, metrics, options.api_key, options.max_body
    )


def _check(options: ServeOptions) -> None:
    """Refuse a start-up setting the server cannot use, by its flag, before the load."""
    for flag, value in (
        ("--max-batch", options.max_batch),
        ("--max-loras", options.max_loras),
        ("--max-waiting", options.max_waiting),
    ):
        if value < 1:
            raise ServeError(f"{flag} must be ≥ 1, got {value}")
    if options.max_cpu_loras is not None and options.max_cpu_loras < options.max_loras:
        raise ServeError(
            f"--max-cpu-loras {options.max_cpu_loras} must be ≥ --max-loras {options.max_loras}"
        )
    if options.engine not in ("auto", "engine", "hf"):
        raise ServeError(f"--engine must be auto, engine or hf, got {options.engine!r}")
    if options.engine_weights not in ("fp32", "bf16", "int8", "auto"):  # engine/weights.py's
        raise ServeError(
            f"--engine-weights must be fp32, bf16, int8 or auto, got {options.engine_weights!r}"
        )
    if options.engine_weights != "fp32" and options.engine == "hf":
        raise ServeError(
            f"--engine-weights {options.engine_weights} is loralab's engine's: it needs "
            "--engine auto or engine (got --engine hf)"
        )
    if not 0 <= options.port <= 65535:
        raise ServeError(f"--port must be in 0-65535 (0: any free port), got {options.port}")
    if options.adapter_dir is not None and not options.adapter_dir.is_dir():
        raise ServeError(f"--adapter-dir {options.adapter_dir} is not a directory")
    for name, directory in options.adapters:
        if not Path(directory).is_dir():
            raise ServeError(f"--adapter {name}={directory}: not an adapter directory")


def serve(options: ServeOptions) -> None:
    """Serve until interrupted."""
    state = _build_off_the_main_thread(options)
    dtype = str(state.engine.model.dtype).removeprefix("torch.")
    print(f"loralab serve: {options.model} on {state.engine.device}, {dtype}", file=sys.stderr)
    rows = state.engine.engine_rows
    if rows is not None:
        print(f"loralab serve: the engine's weights {rows.weights} ({rows.why})", file=sys.stderr)
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.api_key is None:
        log.warning(
            "serving on %s without --api-key: anyone who can reach this port can use it",
            options.host,
        )
    uvicorn.run(
        create_app(state),
        host=options.host,
        port=options.port,
        log_level="info",
        http=HeaderTimeoutProtocol,
    )


def _build_off_the_main_thread(options: ServeOptions) -> ServerState:
    """``build_state`` on a thread that ends before the engine's starts. GNU OpenMP keeps a
    pool of worker threads for each thread that ran a parallel region, until that thread
    ends; with the main thread's pool alive beside the engine thread's, more OpenMP threads
    than cores are alive and every worker waits asleep instead of spinning between two
    parallel regions, and a step of about a thousand small operations pays a wake-up for
    each: on 2 cores, a step of 32 rows took 82 ms on a thread beside a main thread that
    had run steps, 53 ms with no other pool alive (bf16 weights; 127 against 93 ms in
    fp32). Loading the model and the adapters runs such regions; uvicorn's main thread and
    its request threads run none."""
    built: dict = {}

    def build() -> None:
        try:
            built["state"] = build_state(options)
        except BaseException as error:  # raised again on the main thread
            built["error"] = error

    thread = threading.Thread(target=build, name="loralab-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in built:
        raise built["error"]
    return built["state"]


class BackgroundServer:
    """The server on a thread of this process, on a free port (tests, notebooks)."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            create_app(state), host=host, port=port, log_level="warning", http=HeaderTimeoutProtocol
        )
        self.server = uvicorn.Server(config)
        self.state = state
        self.thread = threading.Thread(target=self.server.run, name="loralab-http", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
