"""llama.cpp's GGUF layout, shared by the adapter export and the merged-model export.

Facts of llama.cpp's converter that both need: which GGUF architecture a Transformers
``model_type`` becomes, each tensor's GGUF name (from the ``gguf`` package's own tables),
the row order of Llama's q and k projections, and how a tensor is stored in each
``--outtype``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from ..atomic_write import write_files_atomically

OUTTYPES = ("f32", "f16", "q8_0")

# Transformers' model_type → the GGUF architecture llama.cpp's converter writes for it, and
# whether that converter permutes the q and k rows (its Llama family does; Qwen2 does not).
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}

# The GGUF file types llama.cpp records in general.file_type for a whole-file outtype.
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


class ExportError(ValueError):
    """Something llama.cpp's format cannot hold, or a bad export setting (one line)."""


class GgufLayout:
    """Where a Transformers model's tensors go in llama.cpp's GGUF, and in which row order."""

    def __init__(self, config) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ExportError(
                f"exporting to GGUF supports the architectures {sorted(ARCHITECTURES)}; the "
                f"base is {model_type!r}"
            )
        self.model_type = model_type
        self.architecture, self._permutes = ARCHITECTURES[model_type]
        self.architecture_name = gguf.MODEL_ARCH_NAMES[self.architecture]
        self._names = gguf.get_tensor_name_map(self.architecture, config.num_hidden_layers)
        self._heads = config.num_attention_heads
        self._kv_heads = getattr(config, "num_key_value_heads", None) or self._heads

    def name(self, hf_name: str) -> str | None:
        """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (None when
        llama.cpp's layout has no such tensor)."""
        return self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def rows(self, gguf_name: str, rows: Tensor) -> Tensor:
        """A weight (or a LoRA ``B``) in llama.cpp's row order: q and k are permuted for its
        rotary embedding in the Llama family, everything else is as Transformers has it."""
        tensor = gguf_name.split(".")[-2]  # attn_q in blk.3.attn_q.weight
        if not self._permutes or tensor not in ("attn_q", "attn_k"):
            return rows
        return rotary_rows(rows, self._heads if tensor == "attn_q" else self._kv_heads)


def rotary_rows(rows: Tensor, heads: int) -> Tensor:
    """The rows of a q or k projection (or of its ``B``) in llama.cpp's order: within each
    head, Transformers keeps the two rotary halves apart, llama.cpp interleaves them."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def check_export_target(output: str | os.PathLike, outtype: str) -> Path:
    """Refuse an unknown ``outtype`` or an ``output`` that is a directory (the commands ask
    before the model loads)."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    output = Path(output)
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory; give the .gguf file to write")
    return output


def encode(
    tensor: Tensor | np.ndarray, outtype: str, name: str, kept_f16: list[str]
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as ``outtype`` stores it. q8_0 blocks are 32 values of a row: a tensor whose
    rows are not a multiple of 32 is kept in f16 and its name added to ``kept_f16``.
    Vectors (norms, biases) stay f32, as llama.cpp's converter keeps them."""
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().to(torch.float32).contiguous().numpy()
    array = np.ascontiguousarray(tensor, dtype=np.float32)
    if outtype == "f32" or array.ndim == 1:
        return array, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0":
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(array, kind), kind
        kept_f16.append(name)
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(
    output: Path,
    start: Callable[[str], gguf.GGUFWriter],
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
    extra_files: dict | None = None,
) -> None:
    """Write a GGUF file whole or not at all: ``start(path)`` opens the writer with its
    metadata, then come ``tensors`` (name → array and type), and ``extra_files`` (name →
    writer) are written beside it in the same atomic step."""

    def write(path: str) -> None:
        writer = start(path)
        for name, (array, kind) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    output.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomically(output.parent, {output.name: write, **(extra_files or {})})
