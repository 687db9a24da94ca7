"""An adapter as llama.cpp's LoRA file: ``loralab export --format gguf``.

llama.cpp (and Ollama, built on it) loads a LoRA adapter as a GGUF file beside the base's
GGUF: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
the base's ``general.architecture``, and for each adapted weight the pair
``<the base tensor's GGUF name>.lora_a`` / ``.lora_b`` holding PEFT's ``A`` (r, in) and
``B`` (out, r) as they are. llama.cpp scales each pair by ``alpha / r``, ``r`` read from
``lora_b``. The GGUF names come from the ``gguf`` package's own tables for the
architecture. Two facts of llama.cpp's layout are applied here:

- its converter permutes the rows of Llama's q and k projections (heads' rotary halves
  interleaved); a ``B`` on q or k is permuted the same way, so ``B A`` matches the base;
- its scale is one ``alpha`` for the file: a module whose own scale (rsLoRA's α/√r, a
  ``rank_pattern`` or ``alpha_pattern`` entry) is not ``alpha / r`` has the difference
  folded into its ``B`` (exact up to rounding), and the result says which.

What the format cannot hold is refused with the reason: DoRA magnitudes, modules trained
in full (``modules_to_save``), trained biases, a LoRA on part of a fused projection, and
embedding adapters (not written yet).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from .atomic_write import write_files_atomically
from .io import LORALAB_FILE, factor_tensors_by_module, read_adapter
from .layers import LoraFactors

OUTTYPES = ("f32", "f16", "q8_0")

# Transformers' model_type → the GGUF architecture llama.cpp's converter writes for it, and
# whether that converter permutes the q and k rows (its Llama family does; Qwen2 does not).
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}


class ExportError(ValueError):
    """An adapter or setting that llama.cpp's format cannot hold (one line, the reason)."""


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
) -> ExportedAdapter:
    """Write ``adapter_dir`` (PEFT's files) as llama.cpp's LoRA GGUF at ``output``.

    ``base_config`` is the base model's Transformers config (its architecture and head
    counts). The file is written whole or not at all.
    """
    output = check_export_target(output, outtype)
    model_type = getattr(base_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"exporting to GGUF supports the architectures {sorted(ARCHITECTURES)}; the base "
            f"is {model_type!r}"
        )
    architecture, permutes = ARCHITECTURES[model_type]
    adapter_dir = Path(adapter_dir)
    files = read_adapter(adapter_dir)
    _refuse_what_gguf_cannot_hold(adapter_dir, files)
    by_module, _ = factor_tensors_by_module(files.tensors)
    names = gguf.get_tensor_name_map(architecture, base_config.num_hidden_layers)
    pairs: dict[str, tuple[Tensor, Tensor, float]] = {}
    for module, factors in sorted(by_module.items()):
        if factors.factors_class is not LoraFactors:
            kind = "an embedding's" if factors.embedding else "these"
            raise ExportError(
                f"{adapter_dir}: {module} has {kind} factors, which llama.cpp's LoRA format "
                "does not take from loralab yet"
            )
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(
                f"{adapter_dir}: {module} has no tensor in llama.cpp's {model_type} layout"
            )
        A, B = factors.tensors["A"].float(), factors.tensors["B"].float()
        r = A.shape[0]
        scale = files.config.scale(r, files.config.alpha_for(module))
        tensor = gguf_name.split(".")[-2]  # attn_q in blk.3.attn_q.weight; output …
        if permutes and tensor in ("attn_q", "attn_k"):
            heads = base_config.num_attention_heads
            if tensor == "attn_k":
                heads = getattr(base_config, "num_key_value_heads", None) or heads
            B = rotary_rows(B, heads)
        pairs[gguf_name] = (A, B, scale * r)  # llama.cpp's alpha that gives this scale
    if not pairs:
        raise ExportError(f"{adapter_dir}: the adapter holds no LoRA factors")
    alpha = _file_alpha(files.config, pairs)
    rescaled = []
    kept_f16: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    kinds: dict[str, gguf.GGMLQuantizationType] = {}
    for gguf_name, (A, B, wanted) in pairs.items():
        if not math.isclose(wanted, alpha, rel_tol=1e-9):  # α/r·r is α up to rounding
            B = B * (wanted / alpha)
            rescaled.append(gguf_name.removesuffix(".weight"))
        for suffix, tensor in (("lora_a", A), ("lora_b", B)):
            key = f"{gguf_name}.{suffix}"
            tensors[key], kinds[key] = _encoded(tensor, outtype, key, kept_f16)

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[architecture])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key, array in tensors.items():
            writer.add_tensor(key, array, raw_dtype=kinds[key])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    output.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomically(output.parent, {output.name: write})
    return ExportedAdapter(
        output,
        gguf.MODEL_ARCH_NAMES[architecture],
        alpha,
        len(tensors),
        sorted(rescaled),
        kept_f16,
    )


def check_export_target(output: str | os.PathLike, outtype: str) -> Path:
    """Refuse an unknown ``outtype`` or an ``output`` that is a directory (the command
    asks before the model loads)."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory; give the .gguf file to write")
    return output


def rotary_rows(rows: Tensor, heads: int) -> Tensor:
    """The rows of a q or k projection (or of its ``B``) in llama.cpp's order: within each
    head, Transformers keeps the two rotary halves apart, llama.cpp interleaves them."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _refuse_what_gguf_cannot_hold(adapter_dir: Path, files) -> None:
    config = files.config
    reasons = []
    if config.use_dora:
        reasons.append("DoRA magnitudes (llama.cpp applies B·A alone)")
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


def _encoded(tensor: Tensor, outtype: str, key: str, kept_f16: list[str]):
    array = tensor.detach().to(torch.float32).contiguous().numpy()
    if outtype == "f32":
        return array, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0":
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(array, kind), kind
        kept_f16.append(key)  # q8_0 blocks are 32 values of a row
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16
