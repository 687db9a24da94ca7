"""The HTTP side: OpenAI's routes on Starlette, streamed with server-sent events.

Handlers parse and check a request, hand its jobs to the engine and relay the engine's
events: as SSE chunks, or gathered into one response. A client that goes away cancels its
jobs; anything one client sends ends in an error response for that client alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .adapter_pool import AdapterPool
from .engine import Engine, Failed, Finished, Job, Text
from .errors import RequestError
from .metrics import Metrics
from .protocol import Completion, parse_completion

DEFAULT_MAX_BODY = 1 << 20  # bytes; prompts of a whole context fit many times over
BODY_SECONDS = 30.0  # for a whole request body to arrive
READ_SECONDS = 30.0  # for one adapter's files to be read (a hung file system fails the load)


@dataclass
class ServerState:
    engine: Engine
    pool: AdapterPool
    tokenizer: Any
    base_name: str
    metrics: Metrics
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    created: int = field(default_factory=lambda: int(time.time()))
    # Adapter reads run here, apart from the default executor that parses requests: a
    # read stuck in a hung file system holds one of these threads, never a parser.
    readers: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="loralab-read"
        )
    )


def create_app(state: ServerState) -> Starlette:
    async def completions(request: Request) -> Response:
        return await _complete(state, request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _complete(state, request, chat=True)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": _model_cards(state)})

    async def load_lora_adapter(request: Request) -> Response:
        body = await _json_body(request, state.max_body)
        name = _field(body, "lora_name", str)
        path = _field(body, "lora_path", str)
        inplace = body.get("load_inplace", False)
        if not isinstance(inplace, bool):
            raise RequestError(
                f"load_inplace must be a boolean, got {inplace!r}", param="load_inplace"
            )
        reading = state.readers.submit(state.pool.read, path)
        try:
            snapshot = await asyncio.wait_for(asyncio.wrap_future(reading), READ_SECONDS)
        except asyncio.TimeoutError:  # builtin TimeoutError only from Python 3.11
            raise RequestError(
                f"reading the adapter at {path!r} took over {READ_SECONDS:g} s; abandoned",
                status=504,
                param="lora_path",
            ) from None
        message = await _on_engine(state, lambda: state.pool.load(name, snapshot, inplace))
        return PlainTextResponse(f"Success: {message}")

    async def unload_lora_adapter(request: Request) -> Response:
        body = await _json_body(request, state.max_body)
        name = _field(body, "lora_name", str)
        message = await _on_engine(state, lambda: state.pool.unload(name))
        return PlainTextResponse(f"Success: {message}")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.text(), media_type=state.metrics.content_type)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            RequestError: _request_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=_lifespan(state),
    )
    if state.api_key is not None:
        app.add_middleware(_RequireKey, key=state.api_key)
    # added last, so outermost: refusals by the key check are counted too
    app.add_middleware(_CountRequests, metrics=state.metrics, known={r.path for r in routes})
    return app


def _lifespan(state: ServerState):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.engine.stop)
            state.readers.shutdown(wait=False, cancel_futures=True)
            state.pool.close()

    return lifespan


# -- completions ---------------------------------------------------------------------------


async def _complete(state: ServerState, request: Request, chat: bool) -> Response:
    data = await _body_bytes(request, state.max_body)
    # JSON, the chat template and the tokenizer take time on large bodies: on a worker
    # thread, so that the event loop goes on relaying every other client's tokens
    parsed = await asyncio.to_thread(
        lambda: parse_completion(
            _parse_json(data),
            chat,
            state.tokenizer,
            state.base_name,
            state.pool.names(),
            state.engine.context_length,
            state.engine.vocab_size,
        )
    )
    run = _Run(state, parsed)
    if parsed.stream:
        return StreamingResponse(
            run.events_as_sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return JSONResponse(await run.response(request))


class _Run:
    """One HTTP request's jobs (one per prompt and choice) and what they send back."""

    def __init__(self, state: ServerState, parsed: Completion) -> None:
        self.parsed = parsed
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs: list[Job] = []
        for prompt_index, prompt in enumerate(parsed.prompts):
            for choice in range(parsed.n):
                sampling = parsed.sampling
                if sampling.seed is not None and choice:  # each choice its own draws
                    sampling = replace(sampling, seed=sampling.seed + choice)
                index = len(self.jobs)
                self.jobs.append(
                    Job(
                        prompt=prompt,
                        adapter=parsed.adapter,
                        max_tokens=parsed.max_tokens[prompt_index],
                        sampling=sampling,
                        stop=parsed.stop,
                        emit=_emitter(loop, self.queue, index),
                        ignore_eos=parsed.ignore_eos,
                        stop_token_ids=parsed.stop_token_ids,
                    )
                )
        self.done = [False] * len(self.jobs)
        if len(self.jobs) > state.engine.max_waiting:
            raise RequestError(
                f"the request asks for {len(self.jobs)} completions (prompts × n); the "
                f"server queues at most {state.engine.max_waiting}",
                param="n",
            )
        try:
            for job in self.jobs:
                state.engine.submit(job)
        except RequestError:
            self.cancel()
            raise

    def cancel(self) -> None:
        for job, done in zip(self.jobs, self.done, strict=True):
            if not done:
                job.cancelled = True

    async def response(self, request: Request) -> dict:
        texts = [""] * len(self.jobs)
        reasons: list[str | None] = [None] * len(self.jobs)
        token_ids: list[list[int]] = [[] for _ in self.jobs]
        usage = _Usage()
        check = time.monotonic() + 1.0
        try:
            while not all(self.done):
                try:
                    wait = max(check - time.monotonic(), 0.0)
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=wait)
                except asyncio.TimeoutError:  # builtin TimeoutError only from Python 3.11
                    event = None
                if time.monotonic() >= check:  # about once a second, tokens flowing or not
                    if await request.is_disconnected():
                        return {}
                    check = time.monotonic() + 1.0
                if event is None:
                    continue
                if isinstance(event, Text):
                    texts[index] += event.text
                elif isinstance(event, Finished):
                    self.done[index] = True
                    reasons[index] = event.reason
                    token_ids[index] = event.token_ids
                    usage.add(index, event, self.parsed.n)
                elif isinstance(event, Failed):
                    raise event.error
        finally:
            self.cancel()
        return self._body(texts, reasons, token_ids, usage)

    def _body(
        self,
        texts: list[str],
        reasons: list[str | None],
        token_ids: list[list[int]],
        usage: _Usage,
    ) -> dict:
        """The whole response of a request that is not streamed."""
        choices = []
        for index, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            if self.parsed.chat:
                message = {"role": "assistant", "content": text}
                choice = {"index": index, "message": message}
            else:
                choice = {"index": index, "text": text}
            choice.update(logprobs=None, finish_reason=reason)
            choices.append({**choice, **self._token_ids(index, token_ids[index])})
        response = self._head("chat.completion" if self.parsed.chat else "text_completion")
        if self.parsed.chat and self.parsed.return_token_ids:  # a chat has one prompt
            response["prompt_token_ids"] = self.parsed.prompts[0]
        return {**response, "choices": choices, "usage": usage.body()}

    def _token_ids(self, index: int, ids: list[int], first: bool = True) -> dict:
        """vLLM's ``return_token_ids`` fields of one choice: its tokens (with the stop
        token), and a completion's prompt (in a stream, with its first chunk only)."""
        if not self.parsed.return_token_ids:
            return {}
        fields = {"token_ids": ids}
        if first and not self.parsed.chat:
            fields["prompt_token_ids"] = self.parsed.prompts[index // self.parsed.n]
        return fields

    async def events_as_sse(self):
        usage = _Usage()
        sent = [0] * len(self.jobs)  # each choice's tokens given out so far
        try:
            if self.parsed.chat:  # the role comes first, as OpenAI streams it
                for index in range(len(self.jobs)):
                    yield self._chunk(index, {"role": "assistant", "content": ""}, None, [], True)
            while not all(self.done):
                index, event = await self.queue.get()
                if isinstance(event, Text):
                    first = not self.parsed.chat and sent[index] == 0
                    yield self._chunk(index, event.text, None, event.token_ids, first)
                    sent[index] += len(event.token_ids)
                elif isinstance(event, Finished):
                    self.done[index] = True
                    usage.add(index, event, self.parsed.n)
                    rest = event.token_ids[sent[index] :]
                    first = not self.parsed.chat and sent[index] == 0
                    empty = {} if self.parsed.chat else ""
                    yield self._chunk(index, empty, event.reason, rest, first)
                elif isinstance(event, Failed):
                    yield _sse(event.error.body())
                    break
            if self.parsed.include_usage:
                yield _sse({**self._head(), "choices": [], "usage": usage.body()})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream
            self.cancel()

    def _head(self, kind: str | None = None) -> dict:
        if kind is None:
            kind = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.parsed.model}

    def _chunk(
        self,
        index: int,
        content: str | dict,
        reason: str | None,
        token_ids: list[int],
        first: bool,
    ) -> str:
        """One SSE chunk of choice ``index``; ``first``: the choice's first chunk, which
        carries the prompt's token ids where asked (a chat's: the role's chunk)."""
        if self.parsed.chat:
            delta = content if isinstance(content, dict) else {"content": content}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": content, "logprobs": None, "finish_reason": reason}
        choice.update(self._token_ids(index, token_ids, first))
        chunk = {**self._head(), "choices": [choice]}
        if self.parsed.chat and self.parsed.return_token_ids and first and index == 0:
            chunk["prompt_token_ids"] = self.parsed.prompts[0]  # once: a chat has one prompt
        if self.parsed.include_usage:
            chunk["usage"] = None
        return _sse(chunk)


class _Usage:
    def __init__(self) -> None:
        self.prompt: dict[int, int] = {}
        self.completion = 0

    def add(self, index: int, event: Finished, n: int) -> None:
        self.prompt[index // n] = event.prompt_tokens  # a prompt counts once for its n choices
        self.completion += event.completion_tokens

    def body(self) -> dict:
        prompt = sum(self.prompt.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion,
            "total_tokens": prompt + self.completion,
        }


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def emit(event) -> None:  # on the engine's thread
        # RuntimeError: the event loop has closed, nobody is listening any more
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return emit


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _model_cards(state: ServerState) -> list[dict]:
    common = {
        "object": "model",
        "created": state.created,
        "owned_by": "loralab",
        "max_model_len": state.engine.context_length,
    }
    cards = [{"id": state.base_name, "root": state.base_name, "parent": None, **common}]
    cards += [
        {"id": name, "root": name, "parent": state.base_name, **common}
        for name in state.pool.names()
    ]
    return cards


async def _on_engine(state: ServerState, function):
    return await asyncio.wrap_future(state.engine.call(function))


# -- bodies ----------------------------------------------------------------------------------


async def _json_body(request: Request, limit: int) -> Any:
    return _parse_json(await _body_bytes(request, limit))


async def _body_bytes(request: Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes, arrived within ``BODY_SECONDS``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"the request body is {declared} bytes; the limit is {limit}", status=413
        )

    async def receive() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise RequestError(
                    f"the request body is over the limit of {limit} bytes", status=413
                )
        return bytes(data)

    try:
        return await asyncio.wait_for(receive(), BODY_SECONDS)
    except asyncio.TimeoutError:  # builtin TimeoutError only from Python 3.11
        raise RequestError(
            f"the request body did not arrive within {BODY_SECONDS:g} s", status=408
        ) from None


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise RequestError(
            f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise RequestError(
            f"the request body is not UTF-8: {error.reason} at byte {error.start}"
        ) from None
    except (RecursionError, ValueError) as error:  # nested too deep, a 5,000-digit number
        raise RequestError(f"the request body cannot be read as JSON: {error}") from None


def _field(body: Any, name: str, kind: type) -> Any:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    value = body.get(name)
    if not isinstance(value, kind) or not value:
        raise RequestError(
            f"{name} is required and must be a non-empty {kind.__name__}", param=name
        )
    return value


# -- errors and middleware ---------------------------------------------------------------------


async def _request_error(request: Request, error: RequestError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    if error.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif error.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    else:
        message = str(error.detail)
    return JSONResponse(
        RequestError(message, status=error.status_code).body(), status_code=error.status_code
    )


async def _internal_error(request: Request, error: Exception) -> Response:
    return JSONResponse(RequestError("internal error", status=500).body(), status_code=500)


class _RequireKey:
    """Every route but ``/health`` needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = RequestError(
                    "a valid API key is required: send Authorization: Bearer KEY",
                    status=401,
                    code="invalid_api_key",
                )
                response = JSONResponse(
                    error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CountRequests:
    """``loralab_requests_total`` by route (unknown paths as one label) and status."""

    def __init__(self, app, metrics: Metrics, known: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.known else "other"
        status = {"code": 500}

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
