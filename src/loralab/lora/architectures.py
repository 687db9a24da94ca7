"""What each family of models calls its parts: the q/k/v/o/MLP matrices by short name,
the fused projections, the stack of transformer blocks, the hidden size and the heads.

Every module that needs to find a part of a model asks here, so supporting a new family
is an entry in these tables, not a search through the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import ConfigError

# -- the weight matrices, by short name -------------------------------------------------------


@dataclass(frozen=True)
class FusedPart:
    """A short name that means one part of a fused projection, e.g. q of GPT-2's c_attn."""

    module_pattern: str
    part: str


@dataclass(frozen=True)
class Architecture:
    """How one family of models names its weight matrices."""

    name: str
    short_names: dict[str, str | FusedPart]

    def detects(self, module_names: list[str]) -> bool:
        # A family is recognised by its query projection.
        pattern = self.short_names["q"]
        regex = pattern.module_pattern if isinstance(pattern, FusedPart) else pattern
        return any(re.fullmatch(regex, name) for name in module_names)


ARCHITECTURES = (
    Architecture(
        "llama-style (q_proj, k_proj, …)",
        {
            "q": r"(.*\.)?q_proj",
            "k": r"(.*\.)?k_proj",
            "v": r"(.*\.)?v_proj",
            "o": r"(.*\.)?o_proj",
            "gate": r"(.*\.)?gate_proj",
            "up": r"(.*\.)?up_proj",
            "down": r"(.*\.)?down_proj",
        },
    ),
    Architecture(
        "bert-style (query, key, value)",
        {
            "q": r"(.*\.)?attention\.self\.query",
            "k": r"(.*\.)?attention\.self\.key",
            "v": r"(.*\.)?attention\.self\.value",
            "o": r"(.*\.)?attention\.output\.dense",
            "up": r"(.*\.)?intermediate\.dense",
            "down": r"(.*\.)?layer\.\d+\.output\.dense",
        },
    ),
    Architecture(
        "gpt2-style (fused c_attn)",
        {
            "q": FusedPart(r"(.*\.)?attn\.c_attn", "q"),
            "k": FusedPart(r"(.*\.)?attn\.c_attn", "k"),
            "v": FusedPart(r"(.*\.)?attn\.c_attn", "v"),
            "o": r"(.*\.)?attn\.c_proj",
            "up": r"(.*\.)?mlp\.c_fc",
            "down": r"(.*\.)?mlp\.c_proj",
        },
    ),
)

# Fused projections whose output is several matrices side by side, in equal parts.
FUSED_LAYOUTS: dict[str, tuple[str, ...]] = {r"(.*\.)?attn\.c_attn": ("q", "k", "v")}


def detect_architecture(module_names: list[str]) -> Architecture | None:
    """The family whose query projection appears in the model, if any."""
    return next((arch for arch in ARCHITECTURES if arch.detects(module_names)), None)


def fused_layout(module_name: str) -> tuple[str, ...] | None:
    """The parts of the fused projection called ``module_name`` (q, k, v), if it is one."""
    return next(
        (parts for rx, parts in FUSED_LAYOUTS.items() if re.fullmatch(rx, module_name)), None
    )


# -- the blocks, the width, the heads -------------------------------------------------------

# The stack of transformer blocks, by family: Llama/Mistral, GPT-2, BERT-likes.
_BLOCK_LISTS = (r"(.*\.)?layers", r"(.*\.)?h", r"(.*\.)?encoder\.layer")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks in order, as (module name, block)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(re.fullmatch(p, name) for p in _BLOCK_LISTS):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise ConfigError(
        f"cannot find the transformer blocks of {type(model).__name__}: expected a module list "
        "named layers, h or encoder.layer"
    )


def hidden_size(model: nn.Module) -> int:
    """d_model, from the model's config."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot read the hidden size of {type(model).__name__} from its config")


def classifier_head(model: nn.Module) -> nn.Module | None:
    """A classification model's new head (``classifier`` or ``score``), which always trains."""
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """A language model's output projection (``lm_head``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
