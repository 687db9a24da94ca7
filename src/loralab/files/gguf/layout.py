"""What the adapter export and the merged-model export share: how a tensor is stored in
each ``--outtype``, and one atomic GGUF writer. Where each tensor goes is
``models/gguf_layout.py``'s (loading a packed GGUF needs it too).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from ...models.gguf_layout import ARCHITECTURES, GgufLayout, UnknownArchitecture
from ..atomic_write import write_files_atomically

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# The GGUF file types llama.cpp records in general.file_type for a whole-file outtype.
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


class ExportError(ValueError):
    """Something llama.cpp's format cannot hold, or a bad export setting (one line)."""


def export_layout(config) -> GgufLayout:
    """The GGUF layout of a model to export, or an ``ExportError`` naming what is known."""
    try:
        return GgufLayout(config)
    except UnknownArchitecture:
        raise ExportError(
            f"exporting to GGUF supports the architectures {sorted(ARCHITECTURES)}; the "
            f"base is {getattr(config, 'model_type', None)!r}"
        ) from None


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
    if outtype == "bf16":  # fp32's range, 8 bits of mantissa: llama.cpp's bf16 kernels
        kind = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array, kind), kind
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
