"""``loralab serve`` against a hostile client and a hostile file system (issue 27).

Each case was seen to fail on the server before it was hardened: weights from outside
``--adapter-dir``, a frozen process, an engine that failed every step, a regex that
stalled every stream, 500s for client errors. Races are made deterministic by a hook at
the window's edge, never by a sleep in the server; after each case the server must still
answer ``/health`` and a greedy request from another client, token for token.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.serve import app as app_module
from loralab.serve.engine import PRIORITY_AFTER_S, Job, Text
from loralab.serve.header_timeout import HeaderTimeoutProtocol
from loralab.serve.sampling import Sampling
from loralab.serve.text import TextStream
from serving import reference, save_adapters, start

PROMPT = "Adapt:"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    """``allowed`` (the server's --adapter-dir, three adapters) and ``outside`` beside it."""
    root = tmp_path_factory.mktemp("hostile")
    save_adapters(tiny_model_dir, root / "allowed", count=3)
    save_adapters(tiny_model_dir, root / "outside", count=1, seed=50)
    return root


@pytest.fixture(scope="module")
def expected(tiny_model_dir, library):
    """Greedy texts of ``loralab generate``: the base, each allowed adapter, the outside one."""
    texts = {None: reference(tiny_model_dir, None, PROMPT, 12)}
    for name in ("a0", "a1", "a2"):
        texts[name] = reference(tiny_model_dir, library / "allowed" / name, PROMPT, 12)
    texts["outside"] = reference(tiny_model_dir, library / "outside" / "a0", PROMPT, 12)
    assert texts["outside"] != texts["a0"]
    return texts


def _copy(library: Path, source: str, name: str) -> Path:
    """A fresh copy of an allowed adapter as ``allowed/name``."""
    target = library / "allowed" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(library / "allowed" / source, target)
    return target


def _load(server, name, path, inplace=False, timeout=30):
    body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
    return httpx.post(server.url + "/v1/load_lora_adapter", json=body, timeout=timeout)


def _complete(server, model, timeout=30, **fields):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)


def _text(server, model) -> str:
    response = _complete(server, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _assert_alive(server, tiny_model_dir, expected) -> None:
    """``/health`` within 3 s, and another client's greedy request within 30 s, exact."""
    assert httpx.get(server.url + "/health", timeout=3).status_code == 200
    assert _text(server, tiny_model_dir.name) == expected[None]


# -- reading: once, from what was checked ------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _unblock(path: Path) -> None:
    """Open a FIFO for writing, once, so that anything blocked reading it returns."""
    with contextlib.suppress(OSError):  # nobody reads it: nothing was blocked
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("swap", ["symlink to outside weights", "FIFO"])
def test_a_file_swapped_after_the_check_is_never_what_a_hot_swap_reads(
    tiny_model_dir, library, expected, swap
):
    """The window the attack won: the HTTP side checked the files, and the engine's thread
    read them by name later. The hook swaps the weights file at that window's edge (when
    the load is handed to the engine); what was checked must be what is loaded."""
    victim = _copy(library, "a0", "victim")
    weights = victim / "adapter_model.safetensors"
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        assert _load(server, "v", "victim").status_code == 200
        engine = server.state.engine
        handed = engine.call

        def swap_then_hand(function):
            if swap == "FIFO":
                _fifo(weights)
            else:
                weights.unlink()
                os.symlink(library / "outside" / "a0" / "adapter_model.safetensors", weights)
            return handed(function)

        engine.call = swap_then_hand
        try:
            swapped = _load(server, "v", "victim", inplace=True, timeout=10)
        finally:
            engine.call = handed
            if swap == "FIFO":
                _unblock(weights)
        assert swapped.status_code == 200, swapped.text
        assert _text(server, "v") == expected["a0"] != expected["outside"]
        _assert_alive(server, tiny_model_dir, expected)


def test_a_read_that_stalls_is_abandoned_and_stalls_nobody(
    tiny_model_dir, library, expected, monkeypatch
):
    """A hung network file system: the read never returns. The load fails after the
    bound; every other client goes on."""
    monkeypatch.setattr(app_module, "READ_SECONDS", 0.5)
    hung = threading.Event()
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        server.state.pool.read = lambda path: hung.wait(30)
        try:
            started = time.monotonic()
            stalled = _load(server, "s", "a0")
            assert time.monotonic() - started < 5
            assert stalled.status_code == 504, stalled.text
            assert "took over 0.5 s; abandoned" in stalled.json()["error"]["message"]
            _assert_alive(server, tiny_model_dir, expected)
        finally:
            hung.set()


@pytest.mark.parametrize("swapped", ["the directory", "the weights file"])
def test_a_link_swapped_in_after_the_path_is_resolved_is_not_followed(
    tiny_model_dir, library, expected, monkeypatch, swapped
):
    """The reader's own window, between resolving a path and opening it: every component
    is opened without following a symlink, so a link swapped in there is refused."""
    victim = _copy(library, "a1", "victim-late")
    real_victim = victim.resolve()
    outside = library / "outside" / "a0"
    resolve = Path.resolve

    def resolve_then_swap(self, *args, **kwargs):
        real = resolve(self, *args, **kwargs)
        if real == real_victim and not victim.is_symlink():
            if swapped == "the directory":
                shutil.rmtree(victim)
                os.symlink(outside, victim)
            elif not (victim / "adapter_model.safetensors").is_symlink():
                (victim / "adapter_model.safetensors").unlink()
                os.symlink(
                    outside / "adapter_model.safetensors", victim / "adapter_model.safetensors"
                )
        return real

    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        monkeypatch.setattr(Path, "resolve", resolve_then_swap)
        refused = _load(server, "late", "victim-late")
        monkeypatch.setattr(Path, "resolve", resolve)
        assert refused.status_code == 403, refused.text
        assert "refused" in refused.json()["error"]["message"]
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [
            tiny_model_dir.name
        ]
        _assert_alive(server, tiny_model_dir, expected)
    if victim.is_symlink():
        victim.unlink()


def test_fifos_devices_and_oversized_files_are_refused_at_once(tiny_model_dir, library, expected):
    fifo = _copy(library, "a0", "fifo")
    _fifo(fifo / "adapter_model.safetensors")
    device = _copy(library, "a0", "device")
    (device / "adapter_config.json").unlink()
    os.symlink("/dev/zero", device / "adapter_config.json")  # outside, so refused anyway
    folder = _copy(library, "a0", "folder")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    big = _copy(library, "a0", "big")
    with open(big / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(1 << 31)  # sparse: 2 GiB that take no disk
    options = {"adapter_dir": library / "allowed", "max_adapter_bytes": 1 << 30}
    with start(tiny_model_dir, **options) as server:
        started = time.monotonic()
        refused = _load(server, "f", "fifo", timeout=10)
        assert (
            refused.status_code == 403
            and "fifo/adapter_model.safetensors is not a regular"
            in (refused.json()["error"]["message"])
        )
        assert time.monotonic() - started < 5
        assert _load(server, "d", "device").status_code == 403
        assert _load(server, "d", "folder").status_code == 403
        too_big = _load(server, "b", "big")
        assert too_big.status_code == 400 and "at most 1073741824 bytes" in too_big.text
        _assert_alive(server, tiny_model_dir, expected)


def _rewrite_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


BAD_FILES = {
    "rank_pattern": ({"rank_pattern": {"(?i)q_proj": 4}}, "rank_pattern key '(?i)q_proj'"),
    "alpha_pattern": ({"alpha_pattern": {"(?i)q_proj": 4}}, "alpha_pattern key '(?i)q_proj'"),
    "layers_pattern": (
        {"layers_pattern": "(?P<idx>layers)", "layers_to_transform": [0]},
        "layers_pattern '(?P<idx>layers)'",
    ),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "loralab.json", "nested 100,000 deep"])
def test_a_file_that_makes_re_or_json_fail_is_a_400_naming_the_file_and_key(
    tiny_model_dir, library, expected, case
):
    bad = _copy(library, "a0", "bad")
    if case in BAD_FILES:
        changes, words = BAD_FILES[case]
        _rewrite_config(bad, **changes)
        where = "bad/adapter_config.json"
    elif case == "loralab.json":
        config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
        config["rank_pattern"] = {"(?i)q_proj": 4}
        (bad / "loralab.json").write_text(json.dumps({"format": 1, "config": config}))
        words, where = "rank_pattern key '(?i)q_proj'", "bad/loralab.json"
    else:
        text = (bad / "adapter_config.json").read_text()
        deep = "[" * 100_000 + "]" * 100_000
        (bad / "adapter_config.json").write_text(text.replace('"revision": null', f'"x": {deep}'))
        words, where = "nested too deeply", "bad/adapter_config.json"
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        refused = _load(server, "bad", "bad")
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert where in message and words in message
        _assert_alive(server, tiny_model_dir, expected)


def test_nan_or_infinite_factors_are_refused_naming_the_tensor(tiny_model_dir, library, expected):
    bad = _copy(library, "a0", "nan")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = sorted(tensors)[1]
    tensors[key][0, 0] = math.inf
    save_file(tensors, bad / "adapter_model.safetensors")
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        refused = _load(server, "nan", "nan")
        assert refused.status_code == 400
        assert f"tensor {key!r} holds NaN or infinite values" in refused.text
        _assert_alive(server, tiny_model_dir, expected)


def test_an_adapter_broken_on_disk_after_eviction_fails_nobody(tiny_model_dir, library, expected):
    """It comes back from memory, as it was checked; the engine never reads the disk."""
    broken = _copy(library, "a0", "evicted")
    options = {"adapter_dir": library / "allowed", "max_loras": 1}
    with start(tiny_model_dir, **options) as server:
        assert _load(server, "x", "evicted").status_code == 200
        assert _load(server, "y", "a1").status_code == 200  # x is evicted for it
        _rewrite_config(broken, rank_pattern={"(?i)q_proj": 4})
        (broken / "adapter_model.safetensors").write_bytes(b"garbage")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            others = [pool.submit(_text, server, tiny_model_dir.name) for _ in range(3)]
            assert _text(server, "x") == expected["a0"]
            assert _text(server, "y") == expected["a1"]
            assert [o.result() for o in others] == [expected[None]] * 3
        _assert_alive(server, tiny_model_dir, expected)


def test_a_regex_that_backtracks_without_end_is_refused_within_a_bound(
    tiny_model_dir, library, expected
):
    bad = _copy(library, "a0", "slow-regex")
    _rewrite_config(bad, target_modules=r"(.*){1,22}[bc]")
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            other = pool.submit(_text, server, tiny_model_dir.name)
            started = time.monotonic()
            refused = _load(server, "slow", "slow-regex")
            assert time.monotonic() - started < 10
            assert other.result(timeout=30) == expected[None]
        assert refused.status_code == 400, refused.text
        assert "backtracks catastrophically" in refused.json()["error"]["message"]
        _assert_alive(server, tiny_model_dir, expected)


# -- requests: client errors are 400s ------------------------------------------------------


def test_client_errors_that_were_500s_are_400s_and_keep_the_connection(
    tiny_model_dir, library, expected
):
    with start(tiny_model_dir, adapter_dir=library / "allowed") as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            body = {"model": tiny_model_dir.name, "prompt": "a\ud800b", "max_tokens": 2}
            surrogate = client.post(
                "/v1/completions",
                content=json.dumps(body).encode(),  # json.dumps escapes it as \ud800
                headers={"content-type": "application/json"},
            )
            assert surrogate.status_code == 400, surrogate.text
            assert "lone UTF-16 surrogate" in surrogate.json()["error"]["message"]
            assert surrogate.headers.get("connection") != "close"
            tiny_p = client.post(
                "/v1/completions",
                json={**body, "prompt": PROMPT, "top_p": 1e-46, "temperature": 1.0},
            )
            assert tiny_p.status_code == 200, tiny_p.text
            long_name = client.post(
                "/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "x" * 300}
            )
            assert long_name.status_code == 400, long_name.text
            assert "File name too long" in long_name.text
        _assert_alive(server, tiny_model_dir, expected)


def test_no_response_shows_a_server_path(tiny_model_dir, library, expected):
    root = str(library.resolve())
    bad = _copy(library, "a0", "for-paths")
    _rewrite_config(bad, rank_pattern={"(?i)q_proj": 4})
    with start(tiny_model_dir, adapter_dir=library / "allowed", max_loras=1) as server:
        responses = [
            httpx.get(server.url + "/v1/models"),
            _load(server, "x", "../outside/a0"),
            _load(server, "x", "absent"),
            _load(server, "x", "for-paths"),
            _load(server, "x", "a0"),
            _load(server, "x", "a0"),
            _load(server, "x", "a2", inplace=True),
            _complete(server, "nope"),
        ]
        for response in responses:
            assert root not in response.text and str(tiny_model_dir) not in response.text
        assert "already loaded from a0" in responses[5].text
        _assert_alive(server, tiny_model_dir, expected)


# -- the event loop and the engine do only what they must ----------------------------------


def test_parsing_a_request_never_holds_the_event_loop(tiny_model_dir, expected, monkeypatch):
    """A request whose parsing is slow (a large chat, a long template) is held on a
    worker thread here: every other client's route must still answer meanwhile."""
    parse = app_module.parse_completion
    held, release = threading.Event(), threading.Event()

    def slow_parse(body, *args, **kwargs):
        if body.get("prompt") == "hold me":
            held.set()
            release.wait(20)
        return parse(body, *args, **kwargs)

    monkeypatch.setattr(app_module, "parse_completion", slow_parse)
    with start(tiny_model_dir) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_complete, server, tiny_model_dir.name, prompt="hold me")
        assert held.wait(10)
        try:
            assert httpx.get(server.url + "/health", timeout=3).status_code == 200
            assert _text(server, tiny_model_dir.name) == expected[None]
        finally:
            release.set()
        assert slow.result(timeout=30).status_code == 200


def test_slow_headers_and_bodies_are_cut_off(tiny_model_dir, expected, monkeypatch):
    monkeypatch.setattr(HeaderTimeoutProtocol, "header_seconds", 0.5)
    monkeypatch.setattr(app_module, "BODY_SECONDS", 0.5)
    with start(tiny_model_dir) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow_headers:
            slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.3)
            slow_headers.sendall(b"X-One-More: byte\r\n")  # bytes keep coming, slowly
            assert slow_headers.recv(1024) == b""  # closed, within the bound
        with socket.create_connection((host, int(port)), timeout=10) as slow_body:
            slow_body.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b'\r\nContent-Length: 100\r\n\r\n{"model": '
            )
            answer = slow_body.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer
        _assert_alive(server, tiny_model_dir, expected)


class _CountingPieces:
    """A byte-level tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_strings_and_text_cost_the_same_per_token_however_long_the_text():
    pieces = [b"a", b"b", b"ab", b"\xc3", b"\xa9", b" ", b"st", b"op"]
    tokenizer = _CountingPieces(pieces)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (4000,), generator=generator).tolist()  # never "stop"
    stream = TextStream(tokenizer, stop=("stop", "ab" * 50, "é" * 30))
    text = "".join(stream.push(i) for i in ids) + stream.finish()
    assert tokenizer.decoded < 20 * len(ids)  # the whole text at each token: 8,000,000
    assert text == tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_text_equals_the_whole_decode_and_cuts_at_the_first_stop(seed):
    pieces = [b"a", b"b", b"ab", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b" ", b"\xff", b"ba"]
    tokenizer = _CountingPieces(pieces)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(pieces), (60,), generator=generator).tolist()
    stops = ("bab", "é€", "aa a")
    stream = TextStream(tokenizer, stop=stops)
    given = []
    for token in ids:
        given.append(stream.push(token))
        if stream.stopped:
            break
    given.append(stream.finish())
    whole = tokenizer.decode(ids)
    found = [i for s in stops if (i := whole.find(s)) >= 0]
    assert "".join(given) == (whole[: min(found)] if found else whole)


@pytest.mark.slow
def test_streamed_text_equals_the_whole_decode_with_smollm2s_tokenizer():
    from transformers import AutoTokenizer

    from loralab.models.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    text = "Café — ünïcödé 😀 naïve\n\tcode: x = [1, 2]  # 数学 ends here" * 3
    generator = torch.Generator().manual_seed(0)
    cases = [tokenizer(text)["input_ids"]]
    cases += [torch.randint(0, len(tokenizer), (200,), generator=generator).tolist()]
    for ids in cases:
        stream = TextStream(tokenizer)
        streamed = "".join(stream.push(i) for i in ids) + stream.finish()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_job_waiting_for_an_adapter_slot_is_not_starved_by_later_ones(
    tiny_model_dir, library, monkeypatch
):
    """One slot, held by a stream of requests on one adapter that never runs dry: the job
    for another adapter gets the slot once it has waited ``PRIORITY_AFTER_S``."""
    from loralab.models.loading import load_model
    from loralab.serve.adapter_pool import AdapterPool
    from loralab.serve.engine import Engine
    from loralab.serve.metrics import Metrics

    model, tokenizer = load_model(str(tiny_model_dir))
    metrics = Metrics()
    pool = AdapterPool(model, "base", 1, library / "allowed", metrics)
    pool.load("busy", pool.read("a0"), inplace=False)
    pool.load("other", pool.read("a1"), inplace=False)  # evicts busy: one slot
    engine = Engine(model, tokenizer, pool, metrics, max_batch=8)  # driven on this thread

    def job(adapter: str) -> tuple[Job, list]:
        events: list = []
        prompt = tokenizer(PROMPT)["input_ids"]
        return Job(prompt, adapter, 6, Sampling(temperature=0), (), events.append), events

    engine.submit(job("busy")[0])
    engine._work()
    waiting, events = job("other")
    engine.submit(waiting)
    for step in range(40):
        engine.submit(job("busy")[0])  # a new one at every step: busy is never idle
        engine._work()
        if step == 3:
            assert not events  # it lets later ones pass, for a while …
            waiting.arrived -= PRIORITY_AFTER_S  # … as long as this
        if any(isinstance(e, Text) for e in events):
            break
    assert any(isinstance(e, Text) for e in events), "the waiting job never got the slot"
    assert pool.entries["other"].resident
