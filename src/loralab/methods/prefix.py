"""Prefix-embedding tuning (PreEmbed), prefix-layer tuning (PreLayer) and LoRA+PE (Sec. 5.1).

The paper's prefix methods add l_p prefix and l_i infix special tokens (Li & Liang, 2021).
Here they are real token ids past the vocabulary, ``vocab … vocab + l_p + l_i − 1``: the
model's input embedding is wrapped by ``PromptEmbedding``, which looks those ids up in a
small table of its own, and ``data/encoding.py`` puts them into every example (``PromptTokens``,
which the model carries: ``prompt_tokens(model)``). The output head is untouched: the
tokens are never predicted, and the loss never counts them.

- PreEmbed trains the table: |Θ| = d·(l_p + l_i).
- PreLayer learns, at those positions, the input of every block: |Θ| = L·d·(l_p + l_i).
- LoRA+PE trains LoRA and PreEmbed's table together.

Prefixes take positions from the usable sequence length: l_p + l_i of ``max_length`` and
of the model's context go to them, in training and in evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.encoding import PromptTokens
from ..lora.architectures import hidden_size, transformer_blocks
from ..lora.config import ConfigError, LoraConfig
from ..lora.inject import lora_layers, plan_targets
from .lora import Lora, with_head
from .method import MethodSettings, PlainMethod, record_method
from .trained_weights import freeze, head_parameters, unfreeze_head

PROMPT_SEED = 0
"""Seeds the choice of real tokens whose embeddings the table starts from."""


class PromptEmbedding(nn.Module):
    """The input embedding with l_p + l_i tokens more: ids ≥ ``vocab_size`` index ``prompt``.

    The table starts as the embeddings of real tokens (a seeded choice of ids): Li & Liang
    (2021) found that a prefix initialised from real words trains much better than one of
    random values, most of all with little data.
    """

    def __init__(self, base: nn.Module, vocab_size: int, tokens: PromptTokens, init: Tensor):
        super().__init__()
        self.base = base  # the frozen embedding of the vocabulary
        self.vocab_size = vocab_size
        self.tokens = tokens
        self.prompt = nn.Parameter(init)  # (l_p + l_i, d)
        self.embedding_dim = init.shape[-1]
        self.prompt_index: Tensor | None = None  # (B, T) of the last forward: table row or -1

    @property
    def weight(self) -> Tensor:
        """The vocabulary's embedding matrix, for code that reads ``.weight``."""
        return self.base.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        index = (input_ids - self.vocab_size).clamp(min=-1)  # (B, T)
        self.prompt_index = index  # PreLayer's blocks read where the tokens are
        is_prompt = index >= 0
        embedded = self.base(input_ids.masked_fill(is_prompt, 0))  # (B, T, d)
        prompt = self.prompt[index.clamp(min=0)].to(embedded.dtype)  # (B, T, d)
        return torch.where(is_prompt.unsqueeze(-1), prompt, embedded)


class PromptActivations(nn.Module):
    """PreLayer: one block's output at the prompt positions, learned (a forward hook).

    The decode steps of a generation with a KV cache carry no prompt token, so there the
    block's output passes through unchanged; the cache holds what the prefill computed
    from the learned activations.
    """

    def __init__(self, embedding: PromptEmbedding, init: Tensor):
        super().__init__()
        self.activations = nn.Parameter(init)  # (l_p + l_i, d)
        self.__dict__["embedding"] = embedding  # not a submodule: the model owns it

    def replace(self, block: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        index = self.embedding.prompt_index  # (B, T)
        if index is None or index.shape != hidden.shape[:2]:
            raise RuntimeError(
                "PreLayer finds the prompt positions from the input ids: call the model "
                "with input_ids, not inputs_embeds"
            )
        learned = self.activations[index.clamp(min=0)].to(hidden.dtype)  # (B, T, d)
        hidden = torch.where((index >= 0).unsqueeze(-1), learned, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def prompt_tokens(model: nn.Module) -> PromptTokens | None:
    """The prefix method's tokens that ``model`` carries (None without a prefix method)."""
    embedding = _input_embedding(model)
    return embedding.tokens if isinstance(embedding, PromptEmbedding) else None


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def context_length(model: nn.Module) -> int | None:
    """How many positions the model has (None when its config does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _embedding_dim(model: nn.Module) -> int:
    embedding = _input_embedding(model)
    dim = getattr(embedding, "embedding_dim", None)
    return dim if isinstance(dim, int) else hidden_size(model)


def prompt_table_parameters(model: nn.Module, settings: MethodSettings) -> int:
    """d·(l_p + l_i): the prompt tokens' input embeddings."""
    return _embedding_dim(model) * settings.prompt_tokens


def _check_prompt(model: nn.Module, settings: MethodSettings, max_length: int) -> None:
    count = settings.prompt_tokens
    lengths = f"prefix_length={settings.prefix_length} + infix_length={settings.infix_length}"
    if count == 0:
        raise ConfigError(f"{lengths} = 0: a prefix method needs at least one token")
    context = context_length(model)
    if context is not None and count >= context:
        raise ConfigError(
            f"{lengths} = {count} is a prefix longer than the context: the model has "
            f"{context} positions"
        )
    if max_length > 0 and count >= max_length:
        raise ConfigError(
            f"{lengths} = {count} is a prefix longer than the context: max_length="
            f"{max_length} leaves no position for the text"
        )
    embedding = _input_embedding(model)
    if embedding is None:
        raise ConfigError(f"{type(model).__name__} has no input embedding to add tokens to")
    if isinstance(embedding, PromptEmbedding):
        raise ConfigError("the model already carries a prefix method's tokens")


def _add_prompt_embedding(
    model: nn.Module, settings: MethodSettings
) -> tuple[PromptEmbedding, Tensor]:
    """Wrap the input embedding; return it with the real ids its table started from."""
    base = _input_embedding(model)
    vocab_size = getattr(base, "num_embeddings", None) or base.weight.shape[0]
    count = settings.prompt_tokens
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    ids = torch.randperm(vocab_size, generator=generator).repeat(count // vocab_size + 1)[:count]
    ids = ids.to(next(base.parameters()).device)
    with torch.no_grad():
        init = base(ids).detach().clone()  # (l_p + l_i, d): through base, so any scaling holds
    first_infix = vocab_size + settings.prefix_length
    tokens = PromptTokens(
        prefix=tuple(range(vocab_size, first_infix)),
        infix=tuple(range(first_infix, vocab_size + count)),
    )
    embedding = PromptEmbedding(base, vocab_size, tokens, init)
    model.set_input_embeddings(embedding)
    return embedding, ids


class PreEmbed(PlainMethod):
    """Prefix-embedding tuning: only the prompt tokens' input embeddings train.

    Beside LoRA (LoRA+PE, or a model that already has LoRA layers) it adds only its table:
    the model is then frozen LoRA's way, with its factors, biases and head copies.
    """

    name = "preembed"
    summary = "PreEmbed: l_p prefix and l_i infix tokens whose input embeddings train"
    mergeable = False  # the tokens stay in every input, taking positions
    adds_depth = False
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        _check_prompt(model, settings, max_length)

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        if not lora_layers(model):
            freeze(model)
            unfreeze_head(model)  # a classifier's new head always trains
        embedding, _ = _add_prompt_embedding(model, settings)
        embedding.prompt.requires_grad_(True)
        record_method(model, self.name, settings, lora)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        return prompt_table_parameters(model, settings) + head_parameters(model)


class PreLayer(PlainMethod):
    """Prefix-layer tuning: at the prompt positions every block's input is learned.

    The paper learns "the activations after every Transformer layer", L·d·(l_p + l_i)
    numbers. Those after the last block feed nothing but a prediction no loss counts, so
    they would never get a gradient; the ones learned here are the input of each block
    instead: the embedding table (what block 1 reads) and the outputs of blocks 1…L−1
    (what the next block reads). The count is the paper's, every number is used, and
    PreLayer extends PreEmbed, as the paper describes it. The activations start as what
    the blocks compute for the table's real tokens.
    """

    name = "prelayer"
    summary = "PreLayer: the prompt tokens' activations at every block are learned"
    mergeable = False
    adds_depth = False
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        _check_prompt(model, settings, max_length)
        transformer_blocks(model)  # raises when there are none to find

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        freeze(model)
        blocks = [block for _, block in transformer_blocks(model)][:-1]
        embedding, ids = _add_prompt_embedding(model, settings)
        for block, init in zip(blocks, _block_outputs(model, blocks, ids), strict=True):
            block.prompt_output = PromptActivations(embedding, init)
            block.register_forward_hook(block.prompt_output.replace)
        embedding.prompt.requires_grad_(True)
        unfreeze_head(model)
        record_method(model, self.name, settings, None)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        blocks = len(transformer_blocks(model))
        inner = (blocks - 1) * hidden_size(model) * settings.prompt_tokens
        return prompt_table_parameters(model, settings) + inner + head_parameters(model)


def _block_outputs(model: nn.Module, blocks: list[nn.Module], ids: Tensor) -> list[Tensor]:
    """What each block outputs for the tokens ``ids`` alone, in eval mode: (len(ids), d) each."""
    if ids.is_meta:  # a model without weights: shapes only
        dtype = _input_embedding(model).prompt.dtype
        shape = (len(ids), hidden_size(model))
        return [torch.empty(shape, dtype=dtype, device="meta") for _ in blocks]
    outputs: list[Tensor] = []

    def record(block, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        outputs.append(hidden[0].detach().clone())

    handles = [block.register_forward_hook(record) for block in blocks]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return outputs


class LoraPrefixEmbedding(PlainMethod):
    """LoRA+PE: LoRA together with prefix-embedding tuning (Sec. 5.1)."""

    name = "lora-pe"
    summary = "LoRA+PE: LoRA together with prefix-embedding tuning"
    mergeable = False  # LoRA's part merges; the prompt tokens stay in every input
    adds_depth = False
    uses_lora = True
    companion = PreEmbed()

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        self.companion.check(model, settings, None, max_length)
        Lora().check(model, settings, lora, max_length)
        embedding = _input_embedding(model)
        for target in plan_targets(model, with_head(model, lora)):
            if model.get_submodule(target.name) is embedding:
                raise ConfigError(
                    f"target_modules={lora.target_modules!r} adapts the input embedding "
                    f"({target.name}), which LoRA+PE's prefix wraps; leave it out"
                )

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        Lora().apply(model, settings, lora)
        self.companion.apply(model, settings, None)
        record_method(model, self.name, settings, lora)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        # LoRA's count holds a classifier's head already; the prefix adds its table alone.
        lora_count = Lora().expected_parameters(model, settings, lora)
        return lora_count + prompt_table_parameters(model, settings)
