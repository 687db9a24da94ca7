"""The engine under the server: rows that join and leave, sampling, text, failures."""

from __future__ import annotations

import threading

import pytest
import torch

from loralab.data.encoding import encode_prompt
from loralab.models.loading import load_model
from loralab.serve.adapter_pool import AdapterPool
from loralab.serve.batch_cache import BatchCache, new_cache
from loralab.serve.engine import Engine, Failed, Finished, Job, Text
from loralab.serve.metrics import Metrics
from loralab.serve.sampling import Sampler, Sampling
from loralab.serve.text import TextStream
from serving import reference, save_adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("engine-adapters")
    return directory, save_adapters(tiny_model_dir, directory, count=3)


def _engine(base, directory, names, **options):
    model, tokenizer = load_model(str(base))
    metrics = Metrics()
    pool = AdapterPool(model, "base", 8, directory, metrics)
    for name in names:
        pool.add_pinned(name, directory / name)
    return Engine(model, tokenizer, pool, metrics, **options), tokenizer


class _Collect:
    """A job's events, and a way to wait for its end."""

    def __init__(self) -> None:
        self.events: list = []
        self.ended = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if not isinstance(event, Text):
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Text))


def _job(tokenizer, prompt, adapter, max_tokens, **sampling):
    collect = _Collect()
    job = Job(
        encode_prompt(tokenizer, prompt), adapter, max_tokens, Sampling(**sampling), (), collect
    )
    return job, collect


@pytest.mark.parametrize("kind", ["hf", "auto"])
def test_requests_that_join_and_leave_mid_batch_equal_generate(tiny_model_dir, adapters, kind):
    """Rows join and leave (on the engine, a row that leaves is replaced by the last)."""
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names, max_batch=3, engine=kind)
    engine.start()
    try:
        cases = [
            (f"prompt number {i} " * (1 + i % 3), [None, *names][i % 4], 5 + 3 * i)
            for i in range(10)
        ]
        jobs = []
        for prompt, adapter, max_tokens in cases:  # each arrives while others decode
            job, collect = _job(tokenizer, prompt, adapter, max_tokens, temperature=0)
            engine.submit(job)
            jobs.append(collect)
            if len(jobs) > 2:
                jobs[-3].ended.wait(30)
        for collect in jobs:
            assert collect.ended.wait(30)
    finally:
        engine.stop()
    for (prompt, adapter, max_tokens), collect in zip(cases, jobs, strict=True):
        assert collect.text == reference(
            tiny_model_dir, adapter and directory / adapter, prompt, max_tokens
        )
        end = collect.events[-1]
        assert isinstance(end, Finished)
        prompt_tokens = len(encode_prompt(tokenizer, prompt))
        assert (end.reason, end.prompt_tokens, end.completion_tokens) == (
            "length",
            prompt_tokens,
            max_tokens,
        )
        # the tokens sampled (return_token_ids) are the text's
        assert len(end.token_ids) == max_tokens
        assert tokenizer.decode(end.token_ids, skip_special_tokens=True) == collect.text


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_copied_weights_serve_what_generate_writes_with_them(
    tiny_model_dir, adapters, monkeypatch, format
):
    """Rows of different adapters, on bf16 or int8 weights (``--engine-weights``), each
    prefilled with others and decoded in one batch: each text is ``loralab generate``'s
    alone on the same weights."""
    from loralab.engine import weights

    monkeypatch.setattr(weights, "_native_bf16", lambda device: "the test says so")
    directory, names = adapters
    engine, tokenizer = _engine(
        tiny_model_dir, directory, names, max_batch=4, engine="engine", engine_weights=format
    )
    assert engine.engine_rows.weights == format
    cases = [(f"prompt {i} " * (1 + i), [None, *names][i], 12) for i in range(4)]
    engine.start()
    try:
        jobs = []
        for prompt, adapter, max_tokens in cases:
            job, collect = _job(tokenizer, prompt, adapter, max_tokens, temperature=0)
            engine.submit(job)
            jobs.append(collect)
        assert all(collect.ended.wait(30) for collect in jobs)
    finally:
        engine.stop()
    for (prompt, adapter, max_tokens), collect in zip(cases, jobs, strict=True):
        expected = reference(
            tiny_model_dir, adapter and directory / adapter, prompt, max_tokens, weights=format
        )
        assert collect.text == expected
    assert engine.engine_rows.rows.plan([None]).layers[0].qkv.packed.format == format


def test_the_end_token_stops_a_row(tiny_model_dir, adapters):
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names)
    first = reference(tiny_model_dir, directory / "a0", "stop soon", 3)
    engine.eos = tokenizer.convert_tokens_to_ids(first[1])  # the second token ends it
    engine.start()
    try:
        job, collect = _job(tokenizer, "stop soon", "a0", 20, temperature=0)
        engine.submit(job)
        onward, past = _job(tokenizer, "stop soon", "a0", 20, temperature=0)
        onward.ignore_eos = True  # vLLM's extension: run to max_tokens
        engine.submit(onward)
        assert collect.ended.wait(30) and past.ended.wait(30)
    finally:
        engine.stop()
    assert collect.text == first[0]
    assert collect.events[-1].reason == "stop" and collect.events[-1].completion_tokens == 2
    assert past.events[-1].reason == "length" and past.events[-1].completion_tokens == 20


@pytest.mark.parametrize("kind", ["engine", "hf"])
def test_a_failed_step_fails_its_batch_and_the_engine_goes_on(
    tiny_model_dir, adapters, monkeypatch, kind
):
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names, engine=kind)
    assert (engine.engine_rows is None) == (kind == "hf")
    owner = engine.model if kind == "hf" else engine.engine_rows
    forward = owner.forward if kind == "hf" else owner.step
    calls = {"n": 0}
    # The step with both rows: Transformers' forward runs their prefill (one) first; the
    # engine prefills one prompt a round, each followed by a step.
    first_step = 2

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == first_step:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(owner, "forward" if kind == "hf" else "step", flaky)
    first = [_job(tokenizer, f"fail {i}", names[i], 10, temperature=0) for i in range(2)]
    for job, _ in first:
        engine.submit(job)
    engine.start()
    try:
        for _, collect in first:
            assert collect.ended.wait(30)
            assert isinstance(collect.events[-1], Failed)
            assert collect.events[-1].error.status == 500
        job, after = _job(tokenizer, "after", "a1", 6, temperature=0)
        engine.submit(job)
        assert after.ended.wait(30)
    finally:
        engine.stop()
    assert after.text == reference(tiny_model_dir, directory / "a1", "after", 6)
    assert all(e.users == 0 for e in engine.pool.entries.values())  # rows gave back their adapters


def test_a_cancelled_waiting_job_never_runs(tiny_model_dir, adapters):
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names)
    job, collect = _job(tokenizer, "never", "a2", 10)
    engine.submit(job)
    job.cancelled = True
    engine.start()
    try:
        kept, done = _job(tokenizer, "kept", None, 2)
        engine.submit(kept)
        assert done.ended.wait(30)
    finally:
        engine.stop()
    assert collect.events == [] and engine.pool.entries["a2"].users == 0


def test_rows_of_the_batch_cache_keep_their_own_keys(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    rows = []
    for length in (3, 7, 5):
        cache = new_cache(model.config)
        model(input_ids=torch.randint(3, 90, (1, length)), cache=cache, use_cache=True)
        rows.append(cache)
    batch = BatchCache(model.config)
    originals = [[layer.keys.clone() for layer in row.layers] for row in rows]
    for row, length in zip(rows, (3, 7, 5), strict=True):
        batch.add(row, [length], [0])
    assert batch.width == 7 and batch.lengths == [3, 7, 5]
    batch.keep([2, 0])  # the longest row leaves: the batch narrows to 5
    assert batch.width == 5
    mask, positions = batch.step_inputs()
    assert mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert positions.tolist() == [[5], [3]]
    for i, original in zip((0, 1), (originals[2], originals[0]), strict=True):
        for layer, keys in zip(batch.cache.layers, original, strict=True):
            length = keys.shape[2]
            assert torch.equal(layer.keys[i, :, batch.width - length :], keys[0])
            assert not layer.keys[i, :, : batch.width - length].any()  # padding


def test_rows_of_a_prefill_that_finished_at_once_are_not_added(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    joint = new_cache(model.config)  # two prompts, left-padded to 6: lengths 6 and 2
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    ids = torch.randint(3, 90, (2, 6))
    model(input_ids=ids, attention_mask=mask, cache=joint, use_cache=True)
    short = [layer.keys[1:, :, 4:].clone() for layer in joint.layers]
    batch = BatchCache(model.config)
    batch.add(joint, [6, 2], [1])  # the long one ended with its first token
    assert batch.lengths == [2] and batch.width == 2  # its padding went with it
    for layer, keys in zip(batch.cache.layers, short, strict=True):
        assert torch.equal(layer.keys, keys)


# -- sampling and text ---------------------------------------------------------------------


def test_sampling_greedy_seeded_and_by_the_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    assert Sampler(Sampling(temperature=0))(logits) == 1
    draws = [Sampler(Sampling(temperature=1.0, seed=3))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a seed repeats
    sampler = Sampler(Sampling(temperature=0.7, seed=11))
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(4000)]), minlength=4)
    expected = torch.softmax(logits / 0.7, 0)
    assert torch.allclose(counts / 4000, expected, atol=0.03)
    nucleus = Sampler(Sampling(temperature=1.0, top_p=0.5, seed=1))
    assert {nucleus(logits) for _ in range(200)} == {1}  # the top token alone holds 0.5


class _Pieces:
    """A tokenizer whose ids decode to given strings (bytes of UTF-8 spelt in pieces)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_text_is_given_out_only_when_final():
    tokenizer = _Pieces([b"ab", b"c", b"EN", b"D", b"\xc3", b"\xa9", b"x"])
    stream = TextStream(tokenizer, stop=("END",))
    assert [stream.push(i) for i in (0, 1, 2)] == ["ab", "c", ""]  # "EN" may start END
    assert stream.push(6) == "ENx"  # it did not
    assert stream.push(4) == ""  # half of é
    assert stream.push(5) == "é"
    assert stream.push(2) == "" and stream.push(3) == "" and stream.stopped
    assert stream.finish() == ""
    plain = TextStream(tokenizer)
    assert plain.push(4) == "" and plain.finish() == "\ufffd"  # what is there at the end


def test_a_row_that_fails_fails_alone_and_gives_its_adapter_back(
    tiny_model_dir, adapters, monkeypatch
):
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names)
    draw = Sampler.__call__

    def faulty(self, logits):
        if self.sampling.seed == 666:
            raise RuntimeError("bad row")
        return draw(self, logits)

    monkeypatch.setattr(Sampler, "__call__", faulty)
    jobs = [
        _job(tokenizer, "one", "a0", 8, temperature=0),
        _job(tokenizer, "two", "a0", 8, temperature=1.0, seed=666),
        _job(tokenizer, "three", "a1", 8, temperature=0),
    ]
    for job, _ in jobs:
        engine.submit(job)  # prefilled together
    engine.start()
    try:
        for _, collect in jobs:
            assert collect.ended.wait(30)
    finally:
        engine.stop()
    (_, one), (_, two), (_, three) = jobs
    assert isinstance(two.events[-1], Failed) and two.events[-1].error.status == 500
    assert one.text == reference(tiny_model_dir, directory / "a0", "one", 8)
    assert three.text == reference(tiny_model_dir, directory / "a1", "three", 8)
    assert all(e.users == 0 for e in engine.pool.entries.values())


def test_a_long_prompt_goes_in_chunks_inside_the_running_rows_steps(
    tiny_model_dir, adapters, monkeypatch
):
    """While a long prompt is prefilled, the running row gets a step with every one of its
    chunks (it never waits for the whole prompt): once a step has been timed, the chunk
    rides in the step's own forward; and both texts are exact."""
    from loralab.serve import engine_rows

    monkeypatch.setattr(engine_rows, "MAX_CHUNK", 6)
    monkeypatch.setattr(engine_rows, "MIN_CHUNK", 6)
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names, engine="engine")
    rows = engine.engine_rows
    log: list[str] = []
    prefill, step, round_ = rows.prefill, rows.step, rows.round

    def logged_prefill():
        log.append(f"prefill {len(rows.prompts)}")
        return prefill()

    def logged_step(tokens):
        log.append("step")
        return step(tokens)

    def logged_round(tokens):
        log.append(f"round {len(rows.prompts)}")
        return round_(tokens)

    monkeypatch.setattr(rows, "prefill", logged_prefill)
    monkeypatch.setattr(rows, "step", logged_step)
    monkeypatch.setattr(rows, "round", logged_round)
    short, long = "go on", "a much longer prompt, " * 2
    running, stream = _job(tokenizer, short, "a0", 30, temperature=0)
    engine.submit(running)
    engine.start()
    try:
        while not stream.events:
            threading.Event().wait(0.01)
        late, after = _job(tokenizer, long, "a1", 4, temperature=0)
        engine.submit(late)
        assert stream.ended.wait(30) and after.ended.wait(30)
    finally:
        engine.stop()
    after_first_step = log[log.index("step") :]  # the stream's own prompt went in before
    chunks = [i for i, entry in enumerate(after_first_step) if entry in ("prefill 1", "round 1")]
    assert len(chunks) >= len(encode_prompt(tokenizer, long)) // 6
    assert all(after_first_step[i] == "round 1" for i in chunks), log  # each inside a step
    assert stream.text == reference(tiny_model_dir, directory / "a0", short, 30)
    assert after.text == reference(tiny_model_dir, directory / "a1", long, 4)


def test_a_failed_shared_forward_runs_the_step_and_the_round_again_alone(
    tiny_model_dir, adapters, monkeypatch, caplog
):
    """When the forward shared by the rows' step and a prompt's round fails, the step
    runs alone, then the round: nobody's request fails and every text is exact."""
    directory, names = adapters
    engine, tokenizer = _engine(tiny_model_dir, directory, names, engine="engine")
    rows = engine.engine_rows
    round_, calls = rows.round, {"n": 0}

    def flaky(tokens):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return round_(tokens)

    monkeypatch.setattr(rows, "round", flaky)
    running, stream = _job(tokenizer, "go on", "a0", 12, temperature=0)
    engine.submit(running)
    engine.start()
    try:
        while len(stream.events) < 2:  # a step alone has run: the next round shares one
            threading.Event().wait(0.01)
        late, after = _job(tokenizer, "then this", "a1", 5, temperature=0)
        engine.submit(late)
        assert stream.ended.wait(30) and after.ended.wait(30)
    finally:
        engine.stop()
    assert calls["n"] >= 1 and "each runs again alone" in caplog.text
    assert stream.text == reference(tiny_model_dir, directory / "a0", "go on", 12)
    assert after.text == reference(tiny_model_dir, directory / "a1", "then this", 5)
    assert all(e.users == 0 for e in engine.pool.entries.values())


def test_a_step_and_a_chunk_in_one_forward_compute_what_each_computes_alone(
    tiny_model_dir, adapters
):
    """The rows' step and a prompt's chunk sharing one forward (each base weight read once
    for both) give each the logits it gets alone, to fp32 rounding, each with its own
    adapters; the chunk's keys and values are those of its forward alone."""
    import copy

    from loralab.engine.runner import Part, Runner, forward_together

    directory, names = adapters
    engine, _ = _engine(tiny_model_dir, directory, names, engine="engine")
    model = engine.model
    for name in names[:3]:
        engine.pool.acquire(name)
    rows_runner, chunk_runner = Runner(model, 3, 64), Runner(model, 1, 64)
    rows_plan = rows_runner.plan([names[0], None, names[1]])
    chunk_plan = chunk_runner.plan([names[2]])
    generator = torch.Generator().manual_seed(0)
    history = torch.randint(0, model.config.vocab_size, (3, 9), generator=generator)
    rows_runner.forward(rows_plan, history, torch.arange(9).expand(3, 9))  # 9 tokens in
    chunk_runner.forward(chunk_plan, history[:1, :5], torch.arange(5)[None])  # 5 in
    step = Part(rows_runner, rows_plan, torch.tensor([[5], [7], [11]]), torch.full((3, 1), 9))
    chunk = Part(chunk_runner, chunk_plan, history[:1, 5:], torch.arange(5, 9)[None])
    saved = copy.deepcopy((rows_runner.cache.keys, chunk_runner.cache.keys))
    together = forward_together([step, chunk])
    keys_together = copy.deepcopy(chunk_runner.cache.keys)
    rows_runner.cache.keys, chunk_runner.cache.keys = copy.deepcopy(saved)
    alone = [forward_together([part])[0] for part in (step, chunk)]
    for mixed, single in zip(together, alone, strict=True):
        torch.testing.assert_close(mixed, single, rtol=0, atol=1e-5)
    for mixed, single in zip(keys_together, chunk_runner.cache.keys, strict=True):
        torch.testing.assert_close(mixed, single, rtol=0, atol=1e-5)
    assert (together[0][0] - together[0][1]).abs().max() > 0  # the rows' adapters differ


def test_the_engine_is_refused_by_name_where_it_cannot_run(tiny_model_dir, adapters, caplog):
    from loralab.serve.engine_rows import EngineRows

    directory, names = adapters
    engine, _ = _engine(tiny_model_dir, directory, names, engine="engine")
    assert isinstance(engine.engine_rows, EngineRows)
    default, _ = _engine(tiny_model_dir, directory, names)  # auto: the engine for a Llama
    assert isinstance(default.engine_rows, EngineRows)
    from conftest import make_model

    metrics = Metrics()
    model = make_model("gpt2")
    pool = AdapterPool(model, "base", 8, directory, metrics)
    with pytest.raises(ValueError, match=r"the engine cannot serve this model: .*'gpt2'"):
        Engine(model, engine.tokenizer, pool, metrics, engine="engine")
    assert Engine(model, engine.tokenizer, pool, metrics).engine_rows is None  # the default
    assert "serving with Transformers' forward and cache: " in caplog.text
    assert "'gpt2'" in caplog.text  # the reason, by name


def test_the_prefill_round_is_steered_toward_its_share_of_steps(tiny_model_dir, adapters):
    """A chunk that took twice its target halves the next; one that took far less grows
    it at most ``GROWTH``-fold (a longer chunk costs more per token); the bounds hold; a chunk in
    the step's forward counts its time less the step's; whole short prompts never steer
    (they cost less per token than a chunk deep in a long prompt)."""
    from loralab.serve import engine_rows

    def work(take: int, chunked: bool = True):
        return engine_rows._Work([], take, take, chunked)

    directory, names = adapters
    engine, _ = _engine(tiny_model_dir, directory, names, engine="engine")
    rows = engine.engine_rows
    rows.adapters = ["a0"]  # a stream runs
    rows.step_s = 0.1  # a chunk's target: CHUNK_STEPS × 0.1 s
    target = engine_rows.CHUNK_STEPS * rows.step_s
    rows._steer(work(100), spent=2 * target)
    assert rows.chunk_tokens == 50
    rows._steer(work(50), spent=target / 10)
    assert rows.chunk_tokens == int(50 * engine_rows.GROWTH)  # not 500
    rows._steer(work(100), spent=100 * target)
    assert rows.chunk_tokens == engine_rows.MIN_CHUNK
    for _ in range(20):
        rows._steer(work(rows.chunk_tokens), spent=target / 10)
    assert rows.chunk_tokens == engine_rows.MAX_CHUNK
    rows._steer(work(100), spent=rows.step_s + 2 * target, fixed=rows.step_s)
    assert rows.chunk_tokens == 50
    rows._steer(work(10, chunked=False), spent=100 * target)
    assert rows.chunk_tokens == 50
