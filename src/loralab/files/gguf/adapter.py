"""An adapter as llama.cpp's LoRA file: ``loralab export --format gguf``.

llama.cpp (and Ollama, built on it) loads a LoRA adapter as a GGUF file beside the base's
GGUF: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
the base's ``general.architecture``, and for each adapted weight the pair
``<the base tensor's GGUF name>.lora_a`` / ``.lora_b`` holding PEFT's ``A`` (r, in) and
``B`` (out, r) as they are. llama.cpp scales each pair by ``alpha / r``, ``r`` read from
``lora_b``. The GGUF names come from the ``gguf`` package's own tables for the
architecture (``gguf_layout``). Four facts of llama.cpp's layout are applied here:

- an embedding's ``lora_a`` is PEFT's ``A`` transposed, (vocab, r): llama.cpp looks its
  rows up by token;
- its converter permutes the rows of Llama's q and k projections (heads' rotary halves
  interleaved); a ``B`` on q or k is permuted the same way, so ``B A`` matches the base;
- its scale is one ``alpha`` for the file: a module whose own scale (rsLoRA's α/√r, a
  ``rank_pattern`` or ``alpha_pattern`` entry) is not ``alpha / r`` has the difference
  folded into its ``B`` (exact up to rounding), and the result says which;
- a mixture of experts' stacked weight takes stacked factors, ``lora_a`` (experts, r, in)
  and ``lora_b`` (experts, out, r), each token's expert picking its own pair as the base
  picks its weight; a fused ``gate_up_proj`` is llama.cpp's gate and up tensors, which
  share ``A`` and take ``B``'s halves.

What the format cannot hold is refused with the reason: a ΔW that is not B·A (DoRA's),
modules trained in full (``modules_to_save``), trained biases, a LoRA on part of a fused
projection, and a LoRA on the embedding or the head of a base that ties the two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from torch import Tensor

from ...lora.expert_targets import holds_stacked_factors
from ...lora.experts import LoraExperts
from ...lora.layers import LoraFactors
from ...lora.variants import variant_for
from ..adapter_dir import LORALAB_FILE, factor_tensors_by_module, read_adapter
from ..peft_config import expert_weight_name
from .layout import ExportError, check_export_target, encode, export_layout, write_gguf

# With tied embeddings llama.cpp has one tensor, token_embd, for the input and the output.
TIED = ("token_embd.weight", "output.weight")


@dataclass
class ExportedAdapter:
    path: Path
    architecture: str
    alpha: float
    tensors: int
    rescaled: list[str]  # modules whose scale went into B
    kept_f16: list[str]  # tensors q8_0 cannot hold (rows not a multiple of 32)


def export_adapter_gguf(
    adapter_dir: str | os.PathLike,
    base_config,
    output: str | os.PathLike,
    outtype: str = "f32",
    extra_files: dict | None = None,
    experts: Mapping[str, LoraExperts] | None = None,
) -> ExportedAdapter:
    """Write ``adapter_dir`` (PEFT's files) as llama.cpp's LoRA GGUF at ``output``.

    ``base_config`` is the base model's Transformers config (its architecture and head
    counts). ``experts``: the adapter's modules that hold stacked expert factors, and the
    layers they load into (which weight each is, PEFT's nesting decides; the base with
    the adapter loaded knows it). The file is written whole or not at all, together with
    ``extra_files`` (name → writer, beside it: the Ollama Modelfile).
    """
    output = check_export_target(output, outtype)
    layout = export_layout(base_config)
    adapter_dir = Path(adapter_dir)
    files = read_adapter(adapter_dir)
    _refuse_what_gguf_cannot_hold(adapter_dir, files)
    by_module, _ = factor_tensors_by_module(files.tensors)
    tied = getattr(base_config, "tie_word_embeddings", False)
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}
    for module, factors in sorted(by_module.items()):
        if factors.factors_class is not LoraFactors:
            raise ExportError(
                f"{adapter_dir}: {module} has "
                f"{getattr(factors.factors_class, '__name__', 'unrecognised')} factors, which "
                "llama.cpp's LoRA format does not hold"
            )
        if module in (experts or {}):
            pairs.update(_expert_pairs(module, experts[module], factors, files.config, layout))
        else:
            pairs.update(_matrix_pair(adapter_dir, module, factors, files.config, layout, tied))
    if not pairs:
        raise ExportError(f"{adapter_dir}: the adapter holds no LoRA factors")
    alpha = _file_alpha(files.config, pairs)
    rescaled = []
    kept_f16: list[str] = []
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    for gguf_name, (A, B, wanted) in pairs.items():
        if not math.isclose(wanted, alpha, rel_tol=1e-9):  # α/r·r is α up to rounding
            B = B * (wanted / alpha)
            rescaled.append(gguf_name.removesuffix(".weight"))
        for suffix, tensor in (("lora_a", A), ("lora_b", B)):
            key = f"{gguf_name}.{suffix}"
            tensors[key] = encode(tensor, outtype, key, kept_f16)

    def start(path: str) -> gguf.GGUFWriter:
        writer = gguf.GGUFWriter(path, layout.architecture_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        return writer

    write_gguf(output, start, tensors, extra_files)
    return ExportedAdapter(
        output, layout.architecture_name, alpha, len(tensors), sorted(rescaled), kept_f16
    )


def _matrix_pair(adapter_dir: Path, module: str, factors, config, layout, tied: bool) -> dict:
    """The pair of a 2-D weight (a linear layer's, an embedding's) under its GGUF name, and
    the alpha that gives it its scale (``tied``: the base's head is its embedding)."""
    if holds_stacked_factors(module, config.target_parameters or []):
        raise ExportError(
            f"{adapter_dir}: {module} holds stacked expert factors; which weight each "
            "is, the base with the adapter loaded knows: pass its expert layers as "
            "`experts` (loralab export does)"
        )
    gguf_name = layout.name(module + ".weight")
    if gguf_name is None:
        raise ExportError(
            f"{adapter_dir}: {module} has no tensor in llama.cpp's {layout.model_type} layout"
        )
    if tied and gguf_name in TIED:
        raise ExportError(
            f"{adapter_dir}: {module} is adapted, but the base ties its head to its "
            "embedding, and llama.cpp applies a token_embd adapter to both (its graph "
            "then fails): this adapter cannot run in llama.cpp on this base"
        )
    A, B = factors.tensors["A"].float(), factors.tensors["B"].float()
    r = A.shape[0]
    scale = config.scale(r, config.alpha_for(module))
    if factors.embedding:
        # llama.cpp looks an embedding's rows up in lora_a: (vocab, r), PEFT's A (r,
        # vocab) transposed; lora_b stays (dim, r)
        A = A.T
    else:
        B = layout.rows(gguf_name, B)
    return {gguf_name: (A, B, scale * r)}  # llama.cpp's alpha that gives this scale


def _expert_pairs(module: str, layer: LoraExperts, factors, config, layout) -> dict:
    """The stacked pairs of an expert weight: ``lora_a`` (E, r, in), ``lora_b`` (E, out, r)
    for each of its GGUF tensors, and the alpha that gives each its scale."""
    stacked = layer.from_peft(factors.tensors, module)  # A (E, r, in), B (E, out, r)
    A, B = stacked["A"].float(), stacked["B"].float()
    r = A.shape[1]
    weight = expert_weight_name(module, layer)
    parts = layout.parts(weight)
    if not parts:
        raise ExportError(f"{weight} has no tensor in llama.cpp's {layout.model_type} layout")
    wanted = config.scale(r, config.alpha_for(weight)) * r
    return {part.gguf_name: (A, part.of_tensor(B), wanted) for part in parts}


def _refuse_what_gguf_cannot_hold(adapter_dir: Path, files) -> None:
    config = files.config
    reasons = []
    variant = variant_for(config)
    if not variant.factors_class.is_product:  # DoRA's rescales W0's rows
        reasons.append(f"{variant.name}'s ΔW, not a product B·A (llama.cpp applies B·A alone)")
    if config.modules_to_save:
        reasons.append(f"modules trained in full ({', '.join(config.modules_to_save)})")
    if config.bias != "none":
        reasons.append(f"trained biases (bias={config.bias!r})")
    if (adapter_dir / LORALAB_FILE).exists():
        reasons.append("a LoRA on part of a fused projection (GPT-2's c_attn q and v)")
    if reasons:
        raise ExportError(
            f"{adapter_dir}: llama.cpp's LoRA format cannot hold {'; '.join(reasons)}; "
            "merge the adapter into the base instead (loralab merge)"
        )


def _file_alpha(config, pairs: dict) -> float:
    """The file's one alpha: the config's ``lora_alpha`` when it gives some module its
    scale exactly, else the first module's (so that as few B as possible are rescaled)."""
    wanted = [w for _, _, w in pairs.values()]
    if any(math.isclose(w, config.lora_alpha, rel_tol=1e-9) for w in wanted):
        return float(config.lora_alpha)
    return float(max(set(wanted), key=wanted.count))
