"""PreEmbed, PreLayer and LoRA+PE: prompt tokens past the vocabulary, placed in every input."""

import copy

import pytest
import torch

from conftest import char_tokenizer, make_model, randomize_lora, token_batch
from loralab.data.encoding import IGNORE_INDEX, PromptTokens, encode_causal, encode_dataset
from loralab.evaluate import perplexity
from loralab.files.adapter_dir import WEIGHTS_FILE
from loralab.generate import generate
from loralab.lora.architectures import transformer_blocks
from loralab.lora.config import ConfigError, LoraConfig
from loralab.lora.inject import trainable_parameters
from loralab.methods import METHODS, MethodSettings, get_method
from loralab.methods.method_files import METHOD_WEIGHTS, load_method, save_method
from loralab.methods.prefix import PromptEmbedding, prompt_tokens

SETTINGS = MethodSettings(prefix_length=3, infix_length=2)
LORA = LoraConfig(r=2, target_modules=["q", "v"])
PREFIX_METHODS = ("preembed", "prelayer", "lora-pe")


def shapes(config) -> tuple[int, int]:
    """(d_model, L) from a config of any of the tiny families."""
    return config.hidden_size, config.num_hidden_layers


def formula(name: str, config) -> int:
    """|Θ| by hand: d·(l_p + l_i), L·d·(l_p + l_i) or LoRA's Σ r·(d + k) plus the table;
    a classifier's head trains in full beside each."""
    d, layers = shapes(config)
    tokens = SETTINGS.prompt_tokens
    head = d * config.num_labels + config.num_labels if config.model_type == "bert" else 0
    if name == "preembed":
        return d * tokens + head
    if name == "prelayer":
        return layers * d * tokens + head
    r = LORA.r
    if config.model_type == "llama":  # W_q is d×d, W_v is (kv heads · head size)×d
        kv = config.num_key_value_heads * (d // config.num_attention_heads)
        per_layer = r * (d + d) + r * (d + kv)
    else:  # GPT-2's fused c_attn gives q and v a d×d pair each, like BERT's query and value
        per_layer = 2 * r * (d + d)
    return layers * per_layer + head + d * tokens


def applied(kind: str, name: str, settings: MethodSettings = SETTINGS, model=None):
    model = model if model is not None else make_model(kind)
    method = get_method(name)
    method.apply(model, settings, LORA if method.uses_lora else None)
    return model


def with_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """prefix + ids + infix, for every row."""
    tokens = prompt_tokens(model)
    rows = ids.shape[0]
    prefix = torch.tensor([tokens.prefix] * rows, dtype=torch.long).reshape(rows, -1)
    infix = torch.tensor([tokens.infix] * rows, dtype=torch.long).reshape(rows, -1)
    return torch.cat([prefix, ids, infix], dim=1)


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_registered():
    for name in PREFIX_METHODS:
        method = METHODS[name]
        assert (method.mergeable, method.adds_depth) == (False, False)
    assert METHODS["lora-pe"].uses_lora and METHODS["lora-pe"].companion.name == "preembed"
    assert not METHODS["preembed"].uses_lora and not METHODS["prelayer"].uses_lora


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_trainable_count_is_the_formula(model_kind, name):
    model = make_model(model_kind)
    method = get_method(name)
    lora = LORA if method.uses_lora else None
    expected = method.expected_parameters(model, SETTINGS, lora)
    method.apply(model, SETTINGS, lora)
    assert trainable_parameters(model).trainable == expected == formula(name, model.config)


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_count_on_the_meta_device(model_kind, name):
    config = make_model(model_kind).config
    cls = type(make_model(model_kind))
    with torch.device("meta"):
        model = cls(config)
    method = get_method(name)
    lora = LORA if method.uses_lora else None
    expected = method.expected_parameters(model, SETTINGS, lora)
    method.apply(model, SETTINGS, lora)
    assert trainable_parameters(model).trainable == expected == formula(name, config)
    assert all(p.is_meta for p in model.parameters())


def test_the_tokens_are_ids_past_the_vocabulary():
    model = applied("llama", "preembed")
    vocab = model.config.vocab_size
    assert prompt_tokens(model) == PromptTokens(
        prefix=(vocab, vocab + 1, vocab + 2), infix=(vocab + 3, vocab + 4)
    )
    assert prompt_tokens(make_model("llama")) is None
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, PromptEmbedding)
    assert embedding.weight is model.lm_head.weight or not model.config.tie_word_embeddings
    assert model.lm_head.out_features == vocab  # the head is untouched


@pytest.mark.parametrize("name", ["preembed", "lora-pe"])
def test_a_table_of_real_embeddings_computes_what_those_tokens_do(model_kind, name):
    # The plumbing: special ids looked up in the table = the real ids looked up as usual.
    base = make_model(model_kind)
    model = applied(model_kind, name, model=copy.deepcopy(base))
    real = torch.tensor([5, 17, 33, 60, 81])  # l_p + l_i real tokens
    with torch.no_grad():
        model.get_input_embeddings().prompt.copy_(base.get_input_embeddings()(real))
    ids = token_batch()
    special = with_tokens(model, ids)
    rows = ids.shape[0]
    plain = torch.cat([real[:3].expand(rows, 3), ids, real[3:].expand(rows, 2)], dim=1)
    torch.testing.assert_close(outputs(model, special), outputs(base, plain))


def test_the_table_starts_from_real_token_embeddings():
    base = make_model("gpt2")
    table = applied("gpt2", "preembed", model=copy.deepcopy(base)).get_input_embeddings().prompt
    vocabulary = base.get_input_embeddings().weight
    for row in table:
        assert any(torch.equal(row, word) for word in vocabulary)
    assert len({tuple(row.tolist()) for row in table}) == len(table)  # distinct tokens


def _block_outputs(model, ids) -> list[torch.Tensor]:
    seen = []

    def record(block, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    blocks = [block for _, block in transformer_blocks(model)]
    handles = [block.register_forward_hook(record) for block in blocks]
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_prelayer_replaces_every_block_input_at_the_prompt_positions(model_kind):
    model = applied(model_kind, "prelayer")
    blocks = [block for _, block in transformer_blocks(model)]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    special = with_tokens(model, token_batch())
    seen = _block_outputs(model, special)
    is_prompt = special >= model.config.vocab_size  # (B, T)
    rows = special[is_prompt] - model.config.vocab_size  # the table row at each such position
    embedding = model.get_input_embeddings()
    torch.testing.assert_close(embedding(special)[is_prompt], embedding.prompt[rows])
    for block, output in zip(blocks[:-1], seen, strict=False):
        torch.testing.assert_close(output[is_prompt], block.prompt_output.activations[rows])
    assert not hasattr(blocks[-1], "prompt_output")  # its output feeds no block
    assert not torch.equal(seen[0][~is_prompt], seen[1][~is_prompt])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prelayer_starts_as_the_real_tokens_it_was_initialised_from(kind):
    # A prefix comes first, so a causal block computes for it what it computes for the
    # real tokens alone: the learned activations start exactly there.
    settings = MethodSettings(prefix_length=4, infix_length=0)
    base = make_model(kind)
    model = applied(kind, "prelayer", settings, copy.deepcopy(base))
    embedding = model.get_input_embeddings()
    vocabulary = base.get_input_embeddings().weight
    real = torch.tensor([int((vocabulary == row).all(-1).nonzero()) for row in embedding.prompt])
    ids = token_batch()
    plain = torch.cat([real.expand(ids.shape[0], 4), ids], dim=1)
    torch.testing.assert_close(outputs(model, with_tokens(model, ids)), outputs(base, plain))


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_a_training_step_changes_only_the_method_parameters(model_kind, name):
    model = applied(model_kind, name)
    randomize_lora(model)  # so that A gets a gradient too (B starts at zero)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.cat([with_tokens(model, token_batch()), token_batch(seed=2)], dim=1)
    model(input_ids=ids).logits.pow(2).mean().backward()  # a completion after the infix
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained  # and every trained tensor got a gradient
    for key, parameter in model.named_parameters():
        if key.endswith(("prompt", "activations")):
            # every token's row of every learned activation gets a gradient
            assert (parameter.grad != 0).any(-1).all(), key


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_save_and_load_restore_the_outputs(model_kind, name, tmp_path):
    model = applied(model_kind, name)
    randomize_lora(model)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if parameter.requires_grad and ".lora." not in f".{key}":
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    ids = token_batch()
    special = with_tokens(model, ids)
    expected = outputs(model, special)
    save_method(model, tmp_path)
    assert (tmp_path / METHOD_WEIGHTS).exists()
    assert (tmp_path / WEIGHTS_FILE).exists() == (name == "lora-pe")
    loaded = load_method(make_model(model_kind), tmp_path)
    assert prompt_tokens(loaded) == prompt_tokens(model)
    assert torch.equal(outputs(loaded, special), expected)
    counted = trainable_parameters(loaded).trainable
    assert counted == formula(name, loaded.config)


def _greedy_without_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    new: list[int] = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits
        new.append(int(logits[0, -1].argmax()))
        if new[-1] == eos:
            break
    return new


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_batched_generation_equals_a_loop_without_kv_cache(kind, name):
    tokenizer = char_tokenizer()
    model = make_model(kind)
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model = applied(kind, name, model=model)
    randomize_lora(model)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():  # the prompt tokens matter: move them off their start
        for key, parameter in model.named_parameters():
            if key.endswith(("prompt", "activations")):
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    prompts = ["Say cat:", "A much longer prompt:", "x"]
    batched = generate(model, tokenizer, prompts, 6, batch_size=3, stop_at_newline=False)
    tokens = prompt_tokens(model)
    for prompt, text in zip(prompts, batched, strict=True):
        ids = [*tokens.prefix, *tokenizer(prompt)["input_ids"], *tokens.infix]
        new = _greedy_without_cache(model, ids, 6, tokenizer.eos_token_id)
        assert text == tokenizer.decode(new, skip_special_tokens=True)


def test_perplexity_counts_the_same_tokens_with_a_prefix():
    tokenizer = char_tokenizer()
    base = make_model("llama")
    base.resize_token_embeddings(len(tokenizer))
    model = applied("llama", "preembed", model=copy.deepcopy(base))
    real = torch.tensor([40, 41, 42, 43, 44])
    with torch.no_grad():
        model.get_input_embeddings().prompt.copy_(base.get_input_embeddings()(real))
    texts = [{"text": "hello world"}, {"text": "a longer piece"}]
    value = perplexity(model, tokenizer, texts)
    total = count = 0
    for example in texts:
        ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
        labels = torch.tensor([[IGNORE_INDEX] * 4 + ids[1:]])  # as without the prefix
        with torch.no_grad():
            loss = base(input_ids=torch.tensor([real[:3].tolist() + ids]), labels=labels)
        total += loss.loss.item() * (len(ids) - 1)
        count += len(ids) - 1
    assert value == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


# -- where the tokens go -----------------------------------------------------------------------

TOKENS = PromptTokens(prefix=(200, 201), infix=(300,))


def test_prompt_completion_is_prefix_prompt_infix_completion():
    tokenizer = char_tokenizer()
    encoded = encode_causal(tokenizer, {"prompt": "ab", "completion": "c"}, 64, TOKENS)
    a, b, c = (tokenizer.convert_tokens_to_ids(ch) for ch in "abc")
    eos = tokenizer.eos_token_id
    assert encoded.input_ids == [200, 201, a, b, 300, c, eos]
    assert encoded.labels == [IGNORE_INDEX] * 5 + [c, eos]


def test_the_tokens_count_against_max_length():
    tokenizer = char_tokenizer()
    example = {"prompt": "ab", "completion": "cdef"}
    encoded = encode_causal(tokenizer, example, 7, TOKENS)
    assert len(encoded) == 7 and encoded.input_ids[:2] == [200, 201]
    assert encoded.input_ids[4] == 300
    with pytest.raises(ValueError, match="max_length=5"):
        encode_dataset(tokenizer, [example], 5, prompt_tokens=TOKENS)  # no completion left
    assert len(encode_dataset(tokenizer, [example], 6, prompt_tokens=TOKENS)[0]) == 6


def test_text_gets_the_prefix_and_the_loss_counts_the_same_tokens():
    tokenizer = char_tokenizer()
    plain = encode_causal(tokenizer, {"text": "abc"}, 64)
    encoded = encode_causal(tokenizer, {"text": "abc"}, 64, TOKENS)
    assert encoded.input_ids == [200, 201, *plain.input_ids]  # no infix in plain text
    assert encoded.labels[:3] == [IGNORE_INDEX] * 3  # the first text token stays unpredicted
    assert encoded.labels[3:] == plain.labels[1:]


def test_a_chat_gets_the_prefix_first_and_the_infix_before_each_reply():
    tokenizer = char_tokenizer()
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "no"},
    ]
    plain = encode_causal(tokenizer, {"messages": messages}, 256)
    encoded = encode_causal(tokenizer, {"messages": messages}, 256, TOKENS)
    text = tokenizer.decode(plain.input_ids)
    ids = encoded.input_ids
    assert ids[:2] == [200, 201] and ids.count(300) == 2
    assert [t for t in ids if t < 200] == plain.input_ids
    for place in (i for i, t in enumerate(ids) if t == 300):
        assert tokenizer.decode(ids[place - 11 : place]).endswith("<assistant>")
        assert encoded.labels[place] == IGNORE_INDEX and encoded.labels[place + 1] != IGNORE_INDEX
    assert "<assistant>yo" in text
    counted = [t for t, label in zip(ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert counted == [
        t for t, label in zip(plain.input_ids, plain.labels, strict=True) if label != IGNORE_INDEX
    ]


def _bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


def test_classification_keeps_cls_first_and_puts_the_infix_before_the_last_sep(tmp_path):
    tokenizer = _bert_tokenizer(tmp_path)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    example = {"text": "a b", "text_pair": "c", "label": 1}
    plain = encode_dataset(tokenizer, [example], 64, ("x", "y"))[0]
    [encoded] = encode_dataset(tokenizer, [example], 64, ("x", "y"), prompt_tokens=TOKENS)
    a, b, c = plain.input_ids[1:3] + plain.input_ids[4:5]
    assert encoded.input_ids == [cls, 200, 201, a, b, sep, c, 300, sep]
    assert encoded.token_type_ids == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert encoded.labels == 1
    [short] = encode_dataset(tokenizer, [{"text": "a b c d e", "label": 0}], 6, ("x",), TOKENS)
    assert len(short) == 6 and short.input_ids[:3] == [cls, 200, 201]
    assert short.input_ids[-2:] == [300, sep]


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PREFIX_METHODS)
def test_refusals_name_the_fields(name):
    model = make_model("gpt2")  # 64 positions
    method = get_method(name)
    lora = LORA if method.uses_lora else None
    with pytest.raises(ConfigError, match=r"prefix_length=0 \+ infix_length=0"):
        method.check(model, MethodSettings(prefix_length=0), lora, 0)
    with pytest.raises(ConfigError, match="longer than the context: the model has 64"):
        method.check(model, MethodSettings(prefix_length=60, infix_length=4), lora, 0)
    with pytest.raises(ConfigError, match="longer than the context: max_length=32"):
        method.check(model, MethodSettings(prefix_length=32), lora, 32)
    method.check(model, MethodSettings(prefix_length=31), lora, 32)
    applied("gpt2", name, model=model)
    with pytest.raises(ConfigError, match="already carries"):
        method.check(model, SETTINGS, lora, 0)


def test_lora_pe_refuses_lora_on_the_input_embedding():
    model = make_model("llama")
    lora = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ConfigError, match="embed_tokens"):
        get_method("lora-pe").check(model, SETTINGS, lora, 0)
