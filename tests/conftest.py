"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging

logging.set_verbosity_error()  # tiny configs trip Transformers' token-id range warnings

VOCAB = 97


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``loralab ARGV`` (argparse's exits included)."""
    from loralab.cli import main

    try:
        status = main(argv)
    except SystemExit as stopped:
        status = stopped.code
    return status, capsys.readouterr().err.splitlines()


def assert_one_line_error(status: int, lines: list[str], message: str) -> None:
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("loralab: error: "), lines
    assert message in lines[0]


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(hidden_size: int = 32) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


TINY_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert}

LLAMA_SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# The Llama family's members, each built from a tiny config (Qwen2 with biases, Qwen3 with
# per-head norms, Mistral with a sliding window shorter than most tests' sequences).
LLAMA_FAMILY = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_SIZES)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**LLAMA_SIZES, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_SIZES, sliding_window=5)),
}


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY_MODELS[kind]()


def token_batch(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def randomize_lora(model: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every A and B random values, so that ΔW ≠ 0 and tests can see it: loralab's
    factors (``….lora.<adapter>.A``) and PEFT's (``….lora_A.<adapter>.weight``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if any(part in f".{name}" for part in (".lora.", ".lora_A.", ".lora_B.")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def assert_same_logits(ours, theirs, tokens: torch.Tensor, what: str) -> None:
    """Both models' logits on ``tokens`` (in eval mode, without gradients) agree to 1e-5;
    the gap is printed as ``what`` (the figure a closing note quotes)."""
    with torch.no_grad():
        logits, expected = ours.eval()(tokens).logits, theirs.eval()(tokens).logits
    gap = (logits - expected).abs().max().item()
    print(f"{what}: max |Δlogits| {gap:.1e}")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def saved_for_backward(model: torch.nn.Module, tokens: torch.Tensor) -> list[tuple]:
    """(dtype, shape) of every tensor autograd saves for one training step's backward."""
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens).loss.backward()
    return saved


def adamw_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """``steps`` AdamW steps on ``token_batch()`` over the trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tokens = token_batch()
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save_random_adalora(model: torch.nn.Module, directory, targets: list[str]) -> None:
    """AdaLoRA on ``targets`` with large random P, Λ, Q (ΔW far from zero), saved in PEFT's
    ADALORA files at ``directory``; the model keeps it, unmerged."""
    from loralab.methods.adalora.config import AdaLoraConfig
    from loralab.methods.adalora.files import save_adalora
    from loralab.methods.adalora.layers import apply_adalora, svd_factors

    apply_adalora(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for factors in svd_factors(model).values():
            for parameter in (factors.P, factors.E, factors.Q):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    save_adalora(model, directory)


@pytest.fixture(params=sorted(TINY_MODELS))
def model_kind(request) -> str:
    return request.param


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer built offline (100 ids), with a tiny chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in [*string.printable[:95], "£", "é"]:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_causal_lm(directory) -> None:
    """A tiny Llama and its character tokenizer, saved as a normal model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)


def load_tiny_causal_lm(directory):
    """The model and tokenizer ``save_tiny_causal_lm`` wrote, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_causal_lm(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    """A tiny BERT classifier of three labels and its character tokenizer, saved as a normal
    model directory (positions for 64 tokens)."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_bert()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level BPE alphabet: each of the 256 bytes as one printable character,
    in byte order (printable bytes stand for themselves, the rest map past U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def save_tiny_gguf(
    path,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    tied: bool = False,
    linear_type: str = "F32",
    embedding_type: str = "F32",
) -> None:
    """A tiny Llama as a llama.cpp GGUF file (a byte-level BPE tokenizer with ChatML
    specials and a chat template), in the layout of the embedded SmolLM2's file (whose
    output is its embedding, as with ``tied``). The linear weights are stored as
    ``linear_type`` and the embedding as ``embedding_type`` (``packed_bytes``); norms F32."""
    import gguf
    import numpy as np

    heads, kv_heads, ffn = 4, 2, 2 * hidden_size
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden_size // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    tokens = add_tiny_tokenizer(writer)
    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int, kind: str = linear_type) -> None:
        values = (0.02 * rng.standard_normal(shape)).astype(np.float32)  # (out, in)
        if kind == "F32":
            writer.add_tensor(name, values)
        else:
            raw = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, packed_bytes(values, kind, rng), raw_dtype=raw)

    kv = kv_heads * hidden_size // heads
    add("token_embd.weight", len(tokens), hidden_size, kind=embedding_type)
    for block in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(hidden_size, np.float32))
        add(f"blk.{block}.attn_q.weight", hidden_size, hidden_size)
        add(f"blk.{block}.attn_k.weight", kv, hidden_size)
        add(f"blk.{block}.attn_v.weight", kv, hidden_size)
        add(f"blk.{block}.attn_output.weight", hidden_size, hidden_size)
        add(f"blk.{block}.ffn_gate.weight", ffn, hidden_size)
        add(f"blk.{block}.ffn_up.weight", ffn, hidden_size)
        add(f"blk.{block}.ffn_down.weight", hidden_size, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden_size, np.float32))
    if not tied:
        add("output.weight", len(tokens), hidden_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY_GGUF_VOCAB = 3 + 256 + 3  # the specials, the byte alphabet, three merges


def add_tiny_tokenizer(writer, pre: str = "smollm") -> list[str]:
    """A byte-level BPE tokenizer with ChatML specials and a chat template, in ``writer``'s
    metadata; its tokens (``TINY_GGUF_VOCAB`` of them)."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *_byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control] * len(specials) + [normal] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tokens


def packed_bytes(values, kind: str, rng):
    """``values`` (out, in) as GGUF ``kind`` blocks, uint8 (out, row bytes): quantized by the
    ``gguf`` package where it can (Q4_0, Q4_1, Q8_0); the k-quants, which it only reads, as
    random bytes whose fp16 scales are small finite numbers (a valid file all the same)."""
    import gguf
    import numpy as np

    raw = gguf.GGMLQuantizationType[kind]
    try:
        return gguf.quants.quantize(values, raw)
    except NotImplementedError:
        pass
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[raw]
    rows, columns = values.shape
    blocks = rng.integers(0, 256, (rows * columns // block_values, block_bytes), dtype=np.uint8)
    scales = (0.01 * rng.random((len(blocks), 2))).astype(np.float16).view(np.uint8)
    where = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}[kind]
    blocks[:, where] = scales[:, : where.stop - where.start]
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    save_tiny_gguf(path)
    return path


@pytest.fixture
def three(tmp_path):
    """A Llama with adapters a, b, c loaded from files, and each file's own output."""
    from loralab import load_adapter
    from several_adapters import logits_alone, saved_adapter

    kind = "llama"
    dirs = {name: saved_adapter(tmp_path, kind, name, seed) for seed, name in enumerate("abc", 1)}
    model = make_model(kind)
    for name, directory in dirs.items():
        load_adapter(model, directory, adapter_name=name)
    tokens = token_batch(batch=4)
    alone = {name: logits_alone(kind, d, tokens) for name, d in dirs.items()}
    with torch.no_grad():
        alone[None] = make_model(kind)(tokens).logits
    return model, dirs, tokens, alone
