"""User data files, token ids with loss masks, and length-grouped batches."""

import json

import pytest

from conftest import char_tokenizer
from loralab.data.batches import batch_stream, collate, length_grouped_order
from loralab.data.encoding import IGNORE_INDEX, Encoded, encode_causal, encode_dataset
from loralab.data.records import DataError, read_examples


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_reads_the_four_shapes(tmp_path):
    shapes = {
        "pc.jsonl": [{"prompt": "a", "completion": "b"}],
        "chat.jsonl": [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        ],
        "lm.jsonl": [{"text": "plain text"}],
        "cls.jsonl": [{"text": "good", "label": 1}, {"text": "bad", "label": 0}],
    }
    for name, records in shapes.items():
        assert read_examples(_write_jsonl(tmp_path / name, records)) == records
    csv_path = tmp_path / "data.csv"
    csv_path.write_text('text,label\n"great, really",1\nawful,0\n', encoding="utf-8")
    assert read_examples(csv_path) == [
        {"text": "great, really", "label": 1},
        {"text": "awful", "label": 0},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
            r"records mix shapes: prompt_completion \(first on line 1\), prompt \(first on "
            r"line 2\)",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n\n{"prompt": 3, "completion": "b"}\n',
            r"line 3: field 'prompt'",
        ),
        ('{"prompt": "a", "completion": "b"}\n{oops\n', r"line 2, column 2: not valid JSON"),
        ('{"question": "a"}\n', r"line 1: record has fields \['question'\]; expected one of"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}\n',
            r"line 1: messages\[0\].role must be",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', r"line 1: .*no assistant turn"),
        (
            '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
            r"records mix shapes: text \(first on line 1\)",
        ),
        ("", r"the file has no examples"),
        ("[1, 2]\n", r"line 1: expected a JSON object"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        read_examples(path)
    assert str(path) in str(error.value)


def test_csv_quoting_rfc_4180_with_the_line_each_record_starts_on(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(
        b'\xef\xbb\xbfprompt,completion\r\n"Say ""dog"":", dog\r\n\r\n"two\nlines",x\r\n'
    )
    # the byte-order mark is not part of the first column's name; "" is one quote
    assert read_examples(path) == [
        {"prompt": 'Say "dog":', "completion": " dog"},
        {"prompt": "two\nlines", "completion": "x"},
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # a stray quote inside a quoted field: refused, not read as 'Say dog":"'
        (
            'prompt,completion\n"Say cat:", cat\n"Say "dog":", dog\n',
            r"line 3: malformed CSV quoting \(',' expected after '\"'\)",
        ),
        # an unterminated quote swallows what follows: named where it opened
        (
            'prompt,completion\n"Say cat:, cat\nSay dog:, dog\nSay bird:, bird\n',
            r"line 2: a quoted field opened here is never closed \(the file ends inside it, "
            r"at line 4\)",
        ),
        (
            'prompt,completion\n"Say cat:, cat\n"Say dog:", dog\n',
            r"line 2 \(the record runs to line 3\): malformed CSV quoting",
        ),
        ("prompt,completion\na,b\nc\n", r"line 3: 1 value, fewer than the 2 header columns"),
        ("prompt,completion\na,b,c\n", r"line 2: 3 values, more than the 2 header columns"),
        ("text,label,text\na,1,b\n", r"line 1: the header names column 'text' twice"),
    ],
)
def test_malformed_csv_names_the_line_where_it_went_wrong(tmp_path, content, message):
    path = tmp_path / "train.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}, line ")


@pytest.mark.parametrize(
    ("suffix", "before", "line"), [(".jsonl", b'{"text": "ok"}\n', 2), (".csv", b"text\nok\n", 3)]
)
def test_a_file_that_is_not_utf8_names_the_line(tmp_path, suffix, before, line):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(before + b"caf\xe9\n")  # Latin-1
    with pytest.raises(DataError, match=rf"line {line}: not UTF-8 text \(invalid continuation"):
        read_examples(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'"):
        read_examples(tmp_path / "data.txt")


def test_loss_counts_only_completion_tokens():
    tokenizer = char_tokenizer()
    encoded = encode_causal(tokenizer, {"prompt": "Q: 1+1?", "completion": " 2"}, 64)
    text = tokenizer.decode(encoded.input_ids)
    assert text == "Q: 1+1? 2<eos>"
    assert _counted_pieces(tokenizer, encoded) == [" 2<eos>"]
    assert encoded.labels[: len("Q: 1+1?")] == [IGNORE_INDEX] * len("Q: 1+1?")


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok"},
]


def _counted_pieces(tokenizer, encoded) -> list[str]:
    """The runs of tokens that carry loss, decoded, in order."""
    marked = "".join(
        tokenizer.decode([t]) if label != IGNORE_INDEX else "|"
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
    )
    return [piece for piece in marked.split("|") if piece]


def test_chat_loss_counts_only_assistant_turns():
    tokenizer = char_tokenizer()
    encoded = encode_causal(tokenizer, {"messages": CHAT}, 256)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == full
    assert _counted_pieces(tokenizer, encoded) == ["yo<eos>", "ok<eos>"]


def test_the_last_turn_alone_can_carry_the_loss():
    """``train_on: last-turn``: the same tokens, only the last assistant reply counted."""
    tokenizer = char_tokenizer()
    every = encode_causal(tokenizer, {"messages": CHAT}, 256)
    last = encode_causal(tokenizer, {"messages": CHAT}, 256, train_on="last-turn")
    assert last.input_ids == every.input_ids
    assert _counted_pieces(tokenizer, last) == ["ok<eos>"]
    with pytest.raises(DataError, match="train_on must be one of all, last-turn, not 'first'"):
        encode_causal(tokenizer, {"messages": CHAT}, 256, train_on="first")


def test_text_counts_every_token_and_truncation():
    tokenizer = char_tokenizer()
    encoded = encode_causal(tokenizer, {"text": "abcdef"}, 4)
    assert encoded.input_ids == encoded.labels and len(encoded) == 4
    with pytest.raises(DataError, match="max_length=3"):
        encode_dataset(tokenizer, [{"prompt": "long prompt", "completion": "x"}], 3)


def test_length_grouped_batches_are_deterministic_and_cover_every_example():
    lengths = [(i * 37) % 101 for i in range(1000)]
    order = length_grouped_order(lengths, 8, seed=3, epoch=0)
    assert order == length_grouped_order(lengths, 8, seed=3, epoch=0)
    assert order != length_grouped_order(lengths, 8, seed=3, epoch=1)
    assert sorted(i for batch in order for i in batch) == list(range(1000))
    # grouping keeps padding small: the mean spread inside a batch is far below random
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in order) / len(
        order
    )
    assert spread < 10


def test_batch_stream_resumes_at_any_position():
    lengths = list(range(20))
    stream = batch_stream(lengths, 4, seed=0)
    first = [next(stream) for _ in range(12)]  # crosses into the third epoch
    resumed = batch_stream(lengths, 4, seed=0, start=7)
    assert [next(resumed) for _ in range(5)] == first[7:]


def test_collate_pads_right_and_masks_labels():
    items = [Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7]), Encoded([8], [8])]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    classes = collate([Encoded([1, 2], 2, [0, 0]), Encoded([3], 0, [0])], pad_id=0)
    assert classes["labels"].tolist() == [2, 0] and classes["token_type_ids"].shape == (2, 2)
