"""The loss of a chat counts exactly the assistant's tokens, for SmolLM2's template, a
Llama-3-style and a Qwen-style one (with tools), each with and without ``{% generation
%}`` markers; multi-turn chats with a system prompt; tool calls learnt, tool results not;
a template that rewrites earlier turns (Qwen3's reasoning) through its markers; a chat the
template refuses named with its record. Checked by decoding the tokens that carry loss."""

from __future__ import annotations

import pytest

from conftest import char_tokenizer
from loralab.data.encoding import IGNORE_INDEX, encode_causal, encode_dataset
from loralab.data.records import DataError

SMOLLM2 = (  # SmolLM2-135M-Instruct's own, as its GGUF carries it (checked below, slow)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endgeneration %}{% else %}{{ m['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN = (  # Qwen2.5's shape: tools in the system turn, calls as <tool_call> JSON
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% else %}You are Qwen.{% endif %}"
    "{{ '\n\n# Tools\n<tools>' }}{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}"
    "{% endfor %}{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not tools %}"
    "{{ '<|im_start|>system\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% elif m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for call in m['tool_calls'] or [] %}{{ '<tool_call>\n' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson }}{{ '\n</tool_call>' }}{% endfor %}{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content']"
    " + '\n</tool_response><|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3_THINKING = (  # earlier turns lose their reasoning: not a prefix of the next render
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{% if not loop.last %}"
    "{{ m['content'].split('</think>')[-1] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ok"},
]
# What each template's assistant turns are, as the loss should count them.
# (Qwen's markers leave the newline after <|im_end|> out; without them a turn is all the
# template adds after the generation prompt, that newline too.)
TURNS = {
    "smollm2": ["Yo<|im_end|>\n", "Ok<|im_end|>\n"],
    "llama3": ["Yo<|eot_id|>", "Ok<|eot_id|>"],
    "qwen": ["Yo<|im_end|>", "Ok<|im_end|>"],
    "qwen-unmarked": ["Yo<|im_end|>\n", "Ok<|im_end|>\n"],
}
MARKED = {"llama3": LLAMA3, "qwen": QWEN}


def _unmarked(template: str) -> str:
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _marked_smollm2() -> str:
    return SMOLLM2.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}",
    )


TEMPLATES = {
    ("smollm2", False): SMOLLM2,
    ("smollm2", True): _marked_smollm2(),
    **{(name, True): template for name, template in MARKED.items()},
    **{(name, False): _unmarked(template) for name, template in MARKED.items()},
}


def _tokenizer(template: str):
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["\n"])  # the character tokenizer's alphabet lacks it
    tokenizer.chat_template = template
    return tokenizer


def _counted_pieces(tokenizer, encoded) -> list[str]:
    """The runs of tokens that carry loss, decoded, in order."""
    pieces, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                pieces.append(tokenizer.decode(run))
            run = []
        else:
            assert label == token
            run.append(token)
    return [*pieces, tokenizer.decode(run)] if run else pieces


@pytest.mark.parametrize(("name", "marked"), sorted(TEMPLATES))
def test_the_loss_counts_each_assistant_turn_exactly(name, marked):
    assert ("{% generation %}" in TEMPLATES[name, marked]) == marked
    tokenizer = _tokenizer(TEMPLATES[name, marked])
    encoded = encode_causal(tokenizer, {"messages": CHAT}, 1024)
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
    turns = TURNS["qwen-unmarked" if (name, marked) == ("qwen", False) else name]
    assert _counted_pieces(tokenizer, encoded) == turns
    last = encode_causal(tokenizer, {"messages": CHAT}, 1024, train_on="last-turn")
    assert last.input_ids == encoded.input_ids
    assert _counted_pieces(tokenizer, last) == turns[-1:]


@pytest.mark.parametrize("name", ["llama3", "smollm2"])
def test_markers_and_prefixes_agree_token_for_token(name):
    marked = encode_causal(_tokenizer(TEMPLATES[name, True]), {"messages": CHAT}, 1024)
    plain = encode_causal(_tokenizer(TEMPLATES[name, False]), {"messages": CHAT}, 1024)
    assert marked == plain


def test_a_template_that_rewrites_earlier_turns_needs_its_markers():
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>add</think>4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>add again</think>6"},
    ]
    with pytest.raises(DataError, match="does not render conversations as prefixes"):
        encode_causal(_tokenizer(_unmarked(QWEN3_THINKING)), {"messages": chat}, 1024)
    tokenizer = _tokenizer(QWEN3_THINKING)
    encoded = encode_causal(tokenizer, {"messages": chat}, 1024)
    # The conversation as the template renders it, the earlier reasoning gone.
    assert _counted_pieces(tokenizer, encoded) == [
        "4<|im_end|>",
        "<think>add again</think>6<|im_end|>",
    ]


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Rain in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
        ],
    },
    {"role": "tool", "content": "rain, 4C"},
    {"role": "assistant", "content": "Yes: rain."},
]


@pytest.mark.parametrize("marked", [True, False], ids=["markers", "prefixes"])
def test_tool_calls_are_learnt_and_tool_results_are_not(marked):
    tokenizer = _tokenizer(QWEN if marked else _unmarked(QWEN))
    encoded = encode_causal(tokenizer, {"messages": TOOL_CHAT, "tools": TOOLS}, 1024)
    text = tokenizer.decode(encoded.input_ids)
    assert '"name": "weather"' in text and "<tool_response>\nrain, 4C" in text  # tools rendered
    end = "<|im_end|>" if marked else "<|im_end|>\n"
    assert _counted_pieces(tokenizer, encoded) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' + end,
        "Yes: rain." + end,
    ]


def test_a_chat_the_template_refuses_is_named_by_its_record():
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    good = {"messages": CHAT[1:3]}
    with pytest.raises(
        DataError,
        match=r"chats.jsonl: training record 2: the model's chat template refuses this chat: "
        "Conversation roles must alternate",
    ):
        encode_dataset(
            _tokenizer(strict),
            [good, {"messages": [CHAT[1], CHAT[3], CHAT[2]]}],  # user, user, assistant
            1024,
            where="chats.jsonl: training record",
        )


@pytest.mark.slow
def test_the_smollm2_template_here_is_the_models_own():
    import gguf

    from loralab.models.embedded import embedded_gguf

    field = gguf.GGUFReader(str(embedded_gguf("smollm2-135m"))).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == SMOLLM2
