"""A GGUF model loaded with its quantized linear weights kept packed (``PackedLinear``):
the frozen base LoRA trains over takes the file's own bytes, not a dense fp32 copy.

The model is built from the file's config without allocating its weights (pages never
touched are never resident), every linear weight stored in a format loralab computes with
becomes a ``PackedLinear`` holding the file's bytes (q and k rows put back in
Transformers' order), and every other tensor (the embedding, the norms) is dequantized as
the dense load does. ``pack_linears`` quantizes a model in memory the same way, for tests
and benchmarks of models no file exists for.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.initialization import no_init_weights

from ..lora.quantized import FORMATS, PackedLinear, format_named, format_of_ggml_type
from ..lora.quantized.packed_linear import packed_from
from ..lora.state import model_state
from .errors import ModelLoadError
from .gguf_layout import GgufLayout
from .gguf_source import read_missing_config_fields

DENSE_TYPES = ("F32", "F16", "BF16")  # stored as numbers: a linear weight in one stays dense


def load_packed_gguf(auto_class, path: Path, options: dict, converted: Path | None = None):
    """The model in ``path`` with its quantized linear weights packed, and its tokenizer.

    ``converted`` is a directory holding the same model converted (an embedded model's
    cache): its config and tokenizer are read from there, which is faster than parsing
    the file's metadata again."""
    dtype = options.get("dtype", torch.float32)
    if dtype == "auto":
        dtype = torch.float32  # the packed weights are unpacked to fp32 unless told otherwise
    where = {} if converted else {"gguf_file": path.name}
    read_missing_config_fields()
    try:
        tensors = _tensors_of(path)
        config = AutoConfig.from_pretrained(converted or path.parent, **where)
        layout = GgufLayout(config)
        tokenizer = AutoTokenizer.from_pretrained(converted or path.parent, **where)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load GGUF file {path} packed: {error}") from error
    extra = {k: v for k, v in options.items() if k != "dtype"}
    with no_init_weights():  # every weight is read from the file below
        model = auto_class.from_config(config, dtype=dtype, **extra)
    model.tie_weights()  # a tied head is the embedding's tensor, filled once
    packed = _fill(model, tensors, layout, path, dtype)
    counts = dict(sorted(Counter(packed).items()))
    types = ", ".join(f"{count} {name}" for name, count in counts.items())
    model_state(model).base_quantization = {
        "backend": "gguf",
        "summary": f"linear weights packed as in the GGUF ({types})",
        "file": str(path),
        "packed": counts,
    }
    return model, tokenizer


@dataclass(frozen=True)
class FileTensor:
    """One tensor of the file: its name, its GGML type, and where its bytes lie."""

    name: str
    type_name: str
    ggml_type: int
    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        """The tensor's bytes (as the reader shapes them: rows of packed bytes, or numbers),
        read into memory of their own. Read, not mapped: pages of a mapped file count in
        the process's RSS while the map lives, which doubled a 7B model's peak."""
        count = int(np.prod(self.shape))
        values = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset)
        if values.size != count:
            raise ModelLoadError(f"{self.path} ends inside tensor {self.name}: a cut file")
        return values.reshape(self.shape)


def _tensors_of(path: Path) -> list[FileTensor]:
    """The file's tensors, the reader's parsed metadata let go at once: it is some 150 MB
    of small arrays for a 49k-token vocabulary, which would count in the load's peak."""
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as error:  # the reader's own words for a short or garbled file
        raise ModelLoadError(
            f"{path} is not a whole GGUF file (cut or damaged?): {error}"
        ) from None
    tensors = [
        FileTensor(
            t.name,
            t.tensor_type.name,
            int(t.tensor_type),
            path,
            int(t.data_offset),
            t.data.dtype,
            tuple(t.data.shape),
        )
        for t in reader.tensors
    ]
    del reader
    gc.collect()
    return tensors


def _fill(
    model: nn.Module, file_tensors: list[FileTensor], layout: GgufLayout, path: Path, dtype
) -> list[str]:
    """Every tensor of the model from the file; the types of the weights kept packed."""
    packed_types = []
    tensors = dict(model.state_dict(keep_vars=True))
    by_gguf = {part.gguf_name: (name, part) for name in tensors for part in layout.parts(name)}
    filled = set()  # the GGUF tensors read: a fused experts tensor is whole with all its parts
    for tensor in file_tensors:
        name, part = by_gguf.get(tensor.name, (None, None))
        if name is None:
            continue  # a tensor Transformers computes itself (llama.cpp's rope_freqs)
        module_name, attribute = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if _packable(module, attribute, tensor):
            block_format = _format(tensor, path)
            packed = torch.from_numpy(tensor.read())  # (out, row bytes)
            _check_finite(block_format, packed, module.in_features, tensor.name, path)
            linear = PackedLinear(
                layout.hf_rows(tensor.name, packed).contiguous(),
                block_format,
                module.in_features,
                module.out_features,
                None if module.bias is None else module.bias.detach(),
                dtype,
            )
            model.set_submodule(module_name, linear)
            packed_types.append(block_format.name)
            filled.add(tensor.name)
            continue
        _copy_dense(part.of_tensor(tensors[name]), tensor, layout, path, name)
        filled.add(tensor.name)
    tied = {name for name in tensors if _is_tied(model, name, tensors)}
    unread = {name for gguf_name, (name, _) in by_gguf.items() if gguf_name not in filled}
    unmapped = set(tensors) - {name for name, _ in by_gguf.values()}
    missing = sorted((unread | unmapped) - tied - _computed(model))
    if missing:
        raise ModelLoadError(f"{path} has no tensor for {missing[:3]} ({len(missing)} in all)")
    return packed_types


ROWS_AT_ONCE = 4096  # an embedding table is unpacked into the model this many rows at a time


def _copy_dense(target: torch.Tensor, tensor: FileTensor, layout: GgufLayout, path, name) -> None:
    """The file's tensor as numbers into ``target``, as the dense load reads it (loralab's
    own unpacking where it has the format, the ``gguf`` package's bit for bit). A large
    table goes in by blocks of rows, so that no second dense copy of it is ever whole."""
    shape = tensor.shape
    block_format = format_of_ggml_type(tensor.ggml_type)
    if block_format is not None:  # bytes per row → values per row
        shape = (*shape[:-1], block_format.columns(shape[-1]))
    if shape != tuple(target.shape):
        raise ModelLoadError(
            f"{path}: {tensor.name} is {shape}, the model's {name} is {tuple(target.shape)}"
        )
    rows = layout.hf_rows(tensor.name, torch.arange(target.shape[0])) if target.dim() > 1 else None
    data = tensor.read()  # packed bytes, or the numbers of a small tensor
    with torch.no_grad():
        if rows is None:
            target.copy_(_values(tensor, data))
            return
        for start in range(0, target.shape[0], ROWS_AT_ONCE):
            chunk = rows[start : start + ROWS_AT_ONCE].numpy()
            target[start : start + len(chunk)].copy_(_values(tensor, data[chunk]))


def _values(tensor: FileTensor, data: np.ndarray) -> torch.Tensor:
    """Rows of the file's tensor (``data``, a part of its bytes) as fp32 numbers."""
    block_format = format_of_ggml_type(tensor.ggml_type)
    if block_format is None:
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(tensor.ggml_type))
        return torch.from_numpy(np.array(values, dtype=np.float32))
    packed = torch.from_numpy(np.ascontiguousarray(data))
    columns = block_format.columns(packed.shape[-1])
    rows = packed.reshape(-1, packed.shape[-1])  # stacked experts' rows, one matrix of them
    return block_format.dequantize(rows, columns).reshape(*packed.shape[:-1], columns)


def _packable(module: nn.Module, attribute: str, tensor: FileTensor) -> bool:
    return (
        isinstance(module, nn.Linear)
        and attribute == "weight"
        and tensor.type_name not in DENSE_TYPES
    )


def _format(tensor: FileTensor, path: Path):
    block_format = format_of_ggml_type(tensor.ggml_type)
    if block_format is None:
        raise ModelLoadError(
            f"{path}: {tensor.name} is {tensor.type_name}, which loralab cannot keep "
            f"packed (it computes with {', '.join(FORMATS)}); load it without "
            "--quantized-base to dequantize the whole model"
        )
    return block_format


def _check_finite(block_format, packed: torch.Tensor, in_features: int, name: str, path: Path):
    """A block whose scale is NaN or infinite (a damaged file) is refused at load, not
    found as a NaN loss later. Unpacked one weight at a time: the memory is transient."""
    if not torch.isfinite(block_format.dequantize(packed, in_features)).all():
        raise ModelLoadError(
            f"{path}: {name} holds a non-finite value once unpacked (a damaged "
            f"{block_format.name} block)"
        )


def _is_tied(model: nn.Module, name: str, tensors: dict) -> bool:
    """Whether ``name`` is the same tensor as another one (a head tied to the embedding)."""
    tensor = tensors[name]
    return any(other is tensor and key != name for key, other in tensors.items())


def _computed(model: nn.Module) -> set[str]:
    """Persistent buffers the model computes itself (none in the Llama family)."""
    return {name for name, _ in model.named_buffers()}


def pack_linears(model: nn.Module, format_name: str, names: list[str] | None = None) -> int:
    """Replace every ``nn.Linear`` (or those in ``names``) whose rows fit the format by a
    ``PackedLinear`` holding its weight quantized with the ``gguf`` package's quantizer;
    returns how many were packed. A head tied to the embedding is left dense."""
    block_format = format_named(format_name)
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (names is not None and name not in names):
            continue
        if id(module.weight) in tied or block_format.refusal(module.in_features):
            continue
        model.set_submodule(name, packed_from(module, block_format))
        count += 1
    return count
