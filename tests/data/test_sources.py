"""Where training records come from: JSON arrays, Parquet, Arrow and ``save_to_disk``
folders (through ``datasets``), in-memory ``Dataset``s, ``DatasetDict``s and lists given
to ``train``; which split trains and which validates; and the clear line each bad input
gets."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from loralab.data.records import DataError, read_examples, read_splits
from loralab.lora.config import ConfigError
from loralab.training.examples import load_examples

datasets = pytest.importorskip("datasets")  # the test extra has it; the data extra too

RECORDS = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ("cat", "dog", "bird", "fox")]


def _config(tmp_path, **overrides):
    from tiny_runs import run_config

    settings = dict(data=None, validation_data=None)  # the task: ignored where data is
    settings.update(overrides)
    return run_config(tmp_path, **settings)


@pytest.mark.parametrize("kind", ["parquet", "arrow", "saved", "json-array"])
def test_each_format_gives_the_same_records(tmp_path, kind):
    dataset = datasets.Dataset.from_list(RECORDS)
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        dataset.to_parquet(str(path))
    elif kind == "arrow":
        saved = tmp_path / "saved"
        dataset.save_to_disk(str(saved))
        (path,) = saved.glob("*.arrow")  # the Arrow stream file save_to_disk wrote
    elif kind == "saved":
        path = tmp_path / "saved"
        dataset.save_to_disk(str(path))
    else:
        path = tmp_path / "train.json"
        path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    assert read_examples(path) == RECORDS


def test_a_saved_dataset_dict_keeps_its_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS),
            "validation": datasets.Dataset.from_list(RECORDS[:1]),
            "extra": datasets.Dataset.from_list(RECORDS[1:2]),
        }
    ).save_to_disk(str(folder))
    assert read_splits(folder) == {
        "train": RECORDS,
        "validation": RECORDS[:1],
        "extra": RECORDS[1:2],
    }
    examples = load_examples(_config(tmp_path, data=str(folder)))
    assert (examples.train, examples.validation) == (RECORDS, RECORDS[:1])  # its validation
    examples = load_examples(_config(tmp_path, data=str(folder), data_split="extra"))
    assert (examples.train, examples.validation) == (RECORDS[1:2], RECORDS[:1])
    with pytest.raises(
        DataError, match=r"no split 'test' \(data_split\); it has train, validation, extra"
    ):
        load_examples(_config(tmp_path, data=str(folder), data_split="test"))


def test_a_bad_row_is_named_by_file_and_row(tmp_path):
    path = tmp_path / "train.parquet"
    rows = [*RECORDS, {"prompt": "Say owl:", "completion": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(
        DataError, match=rf"{path}, row 4: field 'completion' must be a string, got None"
    ):
        read_examples(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"text": "a"},\n  3]', r"line 2: element 1 is not a JSON object"),
        ('[{"text": "a"},\n {"text": }]', r"line 2, column 11: not valid JSON"),
        ('[{"text": "a"}]\n[]', r"line 1: text after the JSON array"),
        ("[]", r"the file has no examples"),
        ('[{"text": "a"}\n {"text": "b"}]', r"line 2: ',' or '\]' expected after element 0"),
        (
            '[{"text": "a"},\n\n {"prompt": "b", "completion": "c"}]',
            r"text \(first on line 1\), prompt_completion \(first on line 3\)",
        ),
    ],
)
def test_a_bad_json_array_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_what_cannot_be_read_says_why_in_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{broken}: the datasets library cannot read it \("):
        read_examples(broken)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(
        DataError,
        match=r"someone/some-dataset: no such data file, and no Hub dataset of that name in "
        r"the local cache \(.*empty-hub\); loralab fetches nothing",
    ):
        read_examples("someone/some-dataset")
    with pytest.raises(
        DataError,
        match=r"unknown data format '\.txt'; use \.jsonl, \.json, \.csv, \.parquet or \.arrow",
    ):
        (tmp_path / "a.txt").write_text("x")
        read_examples(tmp_path / "a.txt")
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the data extra
    with pytest.raises(
        DataError, match=r"not installed: pip install 'loralab\[data\]' \(JSONL and CSV"
    ):
        read_examples(path)


@pytest.mark.parametrize("kind", ["list", "dataset", "dict"])
def test_records_in_memory(tmp_path, kind):
    given = {
        "list": RECORDS,
        "dataset": datasets.Dataset.from_list(RECORDS),
        "dict": datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(RECORDS),
                "validation": datasets.Dataset.from_list(RECORDS[:2]),
            }
        ),
    }[kind]
    examples = load_examples(_config(tmp_path), given)
    assert examples.train == RECORDS
    assert examples.validation == (RECORDS[:2] if kind == "dict" else [])


def test_bad_records_in_memory(tmp_path):
    with pytest.raises(DataError, match=r"data, row 1: field 'prompt' must be a string, got 3"):
        load_examples(_config(tmp_path), [RECORDS[0], {"prompt": 3, "completion": "x"}])
    with pytest.raises(DataError, match=r"one record .* not a dataset"):
        load_examples(_config(tmp_path), RECORDS[0])
    with pytest.raises(
        DataError, match=r"expected a datasets\.Dataset, a DatasetDict or a sequence of records"
    ):
        load_examples(_config(tmp_path), "train.jsonl")
    with pytest.raises(DataError, match=r"row 0: expected a record \(a dict\)"):
        load_examples(_config(tmp_path), ["just text"])


def test_a_fraction_of_the_records_validates(tmp_path):
    records = [{"text": f"record {i}"} for i in range(40)]
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = _config(tmp_path, data=str(path), validation_split_fraction=0.25, validation_size=100)
    first, again = load_examples(config), load_examples(config)
    assert (first.train, first.validation) == (again.train, again.validation)  # seeded
    assert len(first.validation) == 10 and len(first.train) == 30
    assert sorted(r["text"] for r in first.train + first.validation) == sorted(
        r["text"] for r in records
    )
    other = load_examples(
        _config(
            tmp_path,
            data=str(path),
            validation_split_fraction=0.25,
            validation_size=100,
            data_seed=7,
        )
    )
    assert other.validation != first.validation
    with pytest.raises(
        DataError, match=r"validation_split_fraction 0\.25 and .* both give the validation set"
    ):
        load_examples(
            _config(
                tmp_path, data=str(path), validation_split_fraction=0.25, validation_data=str(path)
            )
        )
    with pytest.raises(
        DataError, match="holds out 0; it must leave at least one record on each side"
    ):
        load_examples(_config(tmp_path, data=str(path), validation_split_fraction=0.001))
    with pytest.raises(ConfigError, match="validation_split_fraction holds out part of your own"):
        load_examples(_config(tmp_path, task="e2e", validation_split_fraction=0.1))
    in_memory = load_examples(_config(tmp_path, validation_split_fraction=0.5), records)
    assert len(in_memory.validation) == 20
    with pytest.raises(ConfigError, match="validation_split_fraction"):
        _config(tmp_path, data=str(path), validation_split_fraction=1.5)


def test_train_takes_records_and_keeps_a_copy_it_resumes_from(tmp_path, tiny_model_dir):
    """``train(config, data=...)``: the run trains on the records given, writes them as
    JSONL in its folder, and its config.yaml names that copy (as if given as files)."""
    from loralab.training.loop import train
    from tiny_runs import WORDS, run_config, tiny_pair

    records = [{"prompt": f"Reverse {w}:", "completion": f" {w[::-1]}"} for w in WORDS * 4]
    given = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(records),
            "validation": datasets.Dataset.from_list(records[:4]),
        }
    )
    config = run_config(
        tmp_path, data=None, validation_data=None, max_steps=2, eval_every=2, save_every=0
    )
    model, tokenizer = tiny_pair(tiny_model_dir)
    result = train(config, model, tokenizer, data=given)
    assert result.validation
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(run / "data" / "train.jsonl")
    assert saved["validation_data"] == str(run / "data" / "validation.jsonl")
    assert read_examples(saved["data"]) == records
    assert read_examples(saved["validation_data"]) == records[:4]
    # A value JSON cannot hold (a record keeps its layout's fields alone: here a tool's
    # schema): nothing is written.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    odd = [{"messages": chat, "tools": [{"when": object()}]}]
    with pytest.raises(
        DataError, match="data, record 0: not JSON: object is not JSON serializable"
    ):
        train(
            run_config(tmp_path, name="odd", data=None, validation_data=None),
            *tiny_pair(tiny_model_dir),
            data=odd,
        )
    assert not (tmp_path / "odd" / "data" / "train.jsonl").exists()
    with pytest.raises(ConfigError, match="the data is given twice"):
        train(run_config(tmp_path, name="again"), model, tokenizer, data=records)


def test_train_on_is_a_choice(tmp_path):
    assert _config(tmp_path, train_on="last-turn").train_on == "last-turn"
    with pytest.raises(ConfigError, match="train_on"):
        _config(tmp_path, train_on="first")


def test_a_hub_dataset_in_the_local_cache_is_read_with_its_splits(tmp_path, monkeypatch):
    """The Hub cache's layout: datasets--owner--name/refs/main names the snapshot, whose
    files (links to blobs) are the repository's, their names giving the splits."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--toy"
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for split, rows in (("train", RECORDS), ("test", RECORDS[:2])):
        blob = repo / "blobs" / split
        datasets.Dataset.from_list(rows).to_parquet(str(blob))
        (snapshot / "data" / f"{split}-00000-of-00001.parquet").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    splits = read_splits("someone/toy")
    assert splits == {"train": RECORDS, "test": RECORDS[:2]}
    examples = load_examples(_config(tmp_path, data="someone/toy", data_split="test"))
    assert examples.train == RECORDS[:2]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as without the data extra
    with pytest.raises(
        DataError,
        match=r"someone/toy \(the Hub cache's .*0123abcd\): a Hub dataset is read through "
        r"the datasets library, which is not installed: pip install 'loralab\[data\]'",
    ):
        read_splits("someone/toy")
