"""The layouts users already have: each recognized by its fields and mapped onto a shape
the encoder knows (one record each, as the README's table shows them), ``--data-format``
where a record has the fields of two, preference records checked and refused by the
supervised methods with the reason, and tool-calling chats checked."""

from __future__ import annotations

import json

import pytest

from loralab.data.layouts import DATA_FORMATS, LAYOUTS
from loralab.data.records import DataError, example_shape, read_examples
from loralab.training.examples import load_examples
from tiny_runs import run_config

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
# layout: (a record as users have it, the record the encoder gets, its shape)
EXAMPLES = {
    "prompt-completion": (
        {"prompt": "2+2=", "completion": " 4", "id": 7},
        {"prompt": "2+2=", "completion": " 4"},
        "prompt_completion",
    ),
    "prompts": (
        {"prompt": "2+2=", "answer": 4},
        {"prompt": "2+2=", "answer": 4},  # the other fields are the reward's to read
        "prompt",
    ),
    "unpaired-preference": (
        {"prompt": "2+2=", "completion": " 5", "label": False, "id": 3},
        {"prompt": "2+2=", "completion": " 5", "label": False},
        "unpaired",
    ),
    "messages": ({"messages": CHAT, "source": "x"}, {"messages": CHAT}, "messages"),
    "text": ({"text": "Once upon a time"}, {"text": "Once upon a time"}, "text"),
    "classification": (
        {"text": "great film", "label": 1},
        {"text": "great film", "label": 1},
        "text_label",
    ),
    "alpaca": (
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {
            "messages": [
                {"role": "user", "content": "Translate to French\n\ncat"},
                {"role": "assistant", "content": "chat"},
            ]
        },
        "messages",
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"messages": CHAT},
        "messages",
    ),
    "preference": (
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
        "preference",
    ),
}


def _file(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_every_layout_has_an_example():
    assert set(EXAMPLES) == set(LAYOUTS) and ("auto", *LAYOUTS) == DATA_FORMATS


@pytest.mark.parametrize("layout", sorted(EXAMPLES))
def test_each_layout_is_recognized_by_its_fields(tmp_path, layout):
    given, expected, shape = EXAMPLES[layout]
    path = _file(tmp_path, [given, given])
    assert read_examples(path) == [expected, expected]
    assert read_examples(path, layout) == [expected, expected]  # named: the same
    assert example_shape(expected) == shape


def test_a_rendered_text_or_a_label_beside_a_layout_does_not_make_it_ambiguous(tmp_path):
    # Stanford Alpaca's own file has a "text" column beside its fields; many chat
    # datasets a rendered "text" or a "label" of their own.
    record = {"instruction": "Say hi", "input": "", "output": "hi", "text": "### Say hi\nhi"}
    path = _file(tmp_path, [record])
    assert read_examples(path)[0]["messages"][1] == {"role": "assistant", "content": "hi"}
    assert read_examples(path, "text") == [{"text": "### Say hi\nhi"}]
    chat = {"messages": CHAT, "text": "rendered", "label": "greeting"}
    assert read_examples(_file(tmp_path, [chat], "chat.jsonl")) == [{"messages": CHAT}]


def test_a_record_with_the_fields_of_two_layouts_needs_the_format_named(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
    path = _file(tmp_path, [{"messages": CHAT, "conversations": turns}])
    with pytest.raises(
        DataError,
        match=r"data.jsonl, line 1: the record has the fields of messages \(messages\) and "
        r"sharegpt \(conversations\); choose with --data-format messages or --data-format "
        "sharegpt",
    ):
        read_examples(path)
    assert read_examples(path, "sharegpt") == [{"messages": CHAT}]


def test_a_named_format_that_does_not_fit_names_the_fields(tmp_path):
    path = _file(tmp_path, [{"sentence": "good", "label": 1, "idx": 0}])
    with pytest.raises(
        DataError,
        match=r"line 1: --data-format alpaca reads instruction, output; the "
        "record has idx, label, sentence",
    ):
        read_examples(path, "alpaca")
    # Not recognized at all: the record's own fields are named.
    with pytest.raises(
        DataError, match=r"line 1: record has fields \['idx', 'label', 'sentence'\]"
    ):
        read_examples(path)


def test_a_prompt_beside_messages_belongs_to_the_chat(tmp_path):
    # UltraChat's records: prompt, prompt_id and messages.
    record = {"prompt": "Hi", "prompt_id": "a1", "messages": CHAT}
    assert read_examples(_file(tmp_path, [record])) == [{"messages": CHAT}]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"prompt": "Q", "chosen": " A", "rejected": " A"},
            "line 1: 'chosen' and 'rejected' are the same; a preference pair needs two",
        ),
        (
            {"prompt": "Q", "chosen": " A"},
            "line 1: a preference record needs 'rejected' beside 'chosen'",
        ),
        (
            {"prompt": "Q", "chosen": " A", "rejected": CHAT},
            "line 1: 'chosen' and 'rejected' must both be text or both be lists of messages",
        ),
        (
            {"prompt": [CHAT[0]], "chosen": [CHAT[0]], "rejected": [CHAT[1]]},
            "line 1: field 'chosen' has no assistant turn to learn from",
        ),
    ],
)
def test_bad_preference_records_are_named(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        read_examples(_file(tmp_path, [record]))


def test_conversational_and_implicit_prompt_preferences_are_read(tmp_path):
    prompt = [CHAT[0]]
    chosen, rejected = [CHAT[1]], [{"role": "assistant", "content": "Go away."}]
    conversational = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    implicit = {"chosen": CHAT, "rejected": [CHAT[0], rejected[0]]}
    assert read_examples(_file(tmp_path, [conversational])) == [conversational]
    assert read_examples(_file(tmp_path, [implicit], "implicit.jsonl")) == [implicit]


def test_supervised_methods_refuse_preference_records_with_the_reason(tmp_path):
    path = _file(tmp_path, [EXAMPLES["preference"][0]] * 2)
    config = run_config(tmp_path, data=str(path), validation_data=None)
    with pytest.raises(
        DataError, match=r"data.jsonl: these are preference records .* learns one reply"
    ):
        load_examples(config)


TOOL_CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}


def test_a_tool_calling_chat_is_accepted_and_its_mistakes_named(tmp_path):
    chat = [
        CHAT[0],
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Rain."},
    ]
    tools = [{"type": "function", "function": {"name": "weather"}}]
    record = {"messages": chat, "tools": tools}
    assert read_examples(_file(tmp_path, [record])) == [record]
    # The tools as a JSON string (LLaMA-Factory's; Arrow columns), and OpenAI's exports'
    # empty tool_calls on every turn.
    exported = [{**message, "tool_calls": message.get("tool_calls", [])} for message in chat]
    as_text = {"messages": exported, "tools": json.dumps(tools)}
    assert read_examples(_file(tmp_path, [as_text], "text.jsonl")) == [
        {"messages": exported, "tools": tools}
    ]
    bad = [
        (
            {"messages": [*chat[:1], {"role": "user", "tool_calls": [TOOL_CALL], "content": ""}]},
            r"messages\[1\]: only an assistant turn calls tools",
        ),
        (
            {"messages": [chat[0], {"role": "assistant", "content": None}]},
            r"messages\[1\] needs a string 'content' \(or tool_calls",
        ),
        (
            {"messages": [chat[0], {"role": "assistant", "tool_calls": [{"name": "w"}]}]},
            r"messages\[1\].tool_calls\[0\] must be \{type: function",
        ),
        ({"messages": chat, "tools": "weather"}, r"field 'tools' is a string but not JSON"),
        ({"messages": chat, "tools": {"a": 1}}, r"field 'tools' must be a list of tool schemas"),
    ]
    for index, (record, message) in enumerate(bad):
        with pytest.raises(DataError, match=rf"bad{index}.jsonl, line 1: {message}"):
            read_examples(_file(tmp_path, [record], f"bad{index}.jsonl"))


def test_the_runs_copy_of_records_given_in_memory_is_read_as_it_was_written(tmp_path):
    """Alpaca records given to train() are kept converted: the copy is read in auto."""
    from loralab.training.examples import with_data_copy

    alpaca = [EXAMPLES["alpaca"][0]] * 2
    config = run_config(tmp_path, data=None, validation_data=None, data_format="alpaca")
    examples = load_examples(config, alpaca)
    (tmp_path / "run").mkdir()
    copied = with_data_copy(config, tmp_path / "run", examples)
    assert copied.data_format == "auto"
    assert load_examples(copied).train == examples.train == [EXAMPLES["alpaca"][1]] * 2
