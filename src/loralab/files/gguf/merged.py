"""A merged model as one GGUF file: ``loralab merge --format gguf``.

The base must have come from a GGUF file (the embedded default, or ``--model x.gguf``):
that file's metadata (architecture, hyper-parameters, tokenizer, chat template) is
carried over as it is, every tensor the merge did not change is copied byte for byte in
its own type, and the changed ones are written in the chosen ``--outtype``, in
llama.cpp's layout (q and k permuted, a mixture of experts' fused ``gate_up_proj`` split
into its gate and up tensors). Which tensors changed is read from the merged
model itself, against the source's own values, so any mergeable method works. Without an
adapter, every tensor is written in ``--outtype`` (the base in F32, for instance).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ...models.embedded import EMBEDDED_MODELS, embedded_gguf
from ...models.errors import ModelLoadError
from .layout import (
    FILE_TYPES,
    ExportError,
    check_export_target,
    encode,
    export_layout,
    write_gguf,
)

# Header fields the writer writes itself.
_WRITTEN_BY_WRITER = ("GGUF.", gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT)


@dataclass
class MergedGguf:
    path: Path
    architecture: str
    tensors: int
    replaced: list[str] = field(default_factory=list)  # written in --outtype
    kept_f16: list[str] = field(default_factory=list)  # q8_0 could not block their rows


def source_gguf(model: str) -> Path:
    """The GGUF file a ``--model`` came from, or a message saying what to do instead."""
    if model in EMBEDDED_MODELS:
        try:
            return embedded_gguf(model)
        except ModelLoadError as error:
            raise ExportError(f"--model {model}: {error}; {_CONVERT_FIRST}") from None
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ExportError(
        f"--model {model} did not come from a GGUF file; merge --format gguf rewrites a GGUF "
        f"base (the embedded smollm2-135m, or --model FILE.gguf): {_CONVERT_FIRST}"
    )


_CONVERT_FIRST = (
    "merge into a Transformers directory (loralab merge without --format gguf) and convert "
    "it with llama.cpp's convert_hf_to_gguf.py, or export the adapter alone (loralab export "
    "--format gguf) for a GGUF base"
)


@dataclass(frozen=True)
class SourceGguf:
    """A GGUF file, read once (its metadata alone takes seconds: SmolLM2's 49k tokens)."""

    path: Path
    reader: gguf.GGUFReader

    @property
    def chat_template(self) -> str | None:
        found = self.reader.fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        return found.contents() if found is not None else None


def read_gguf(path: str | os.PathLike) -> SourceGguf:
    """Open a GGUF file, or say in one line that it is not one."""
    try:
        return SourceGguf(Path(path), gguf.GGUFReader(path))
    except (ValueError, OSError, IndexError) as error:  # bad magic, a truncated file …
        raise ExportError(f"{path} is not a readable GGUF file: {error}") from None


def write_merged_gguf(
    source: str | os.PathLike | SourceGguf,
    output: str | os.PathLike,
    outtype: str = "f32",
    merged: nn.Module | None = None,
    extra_files: dict | None = None,
) -> MergedGguf:
    """Write ``source`` (a path, or the file already read) again at ``output`` with the
    tensors of ``merged`` (a plain model, its adapter merged) that differ from the
    source's; without ``merged``, every tensor in ``outtype``. Written whole or not at all,
    with ``extra_files`` beside it."""
    output = check_export_target(output, outtype)
    path = source.path if isinstance(source, SourceGguf) else Path(source)
    if output.resolve() == path.resolve():
        raise ExportError(f"--output {output} is the source GGUF itself; write a new file")
    reader = (source if isinstance(source, SourceGguf) else read_gguf(source)).reader
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    kept_f16: list[str] = []
    if merged is None:
        tensors = {
            tensor.name: encode(
                gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                outtype,
                tensor.name,
                kept_f16,
            )
            for tensor in reader.tensors
        }
        replaced = []
    else:
        tensors, replaced = _with_merged(reader, merged, architecture, outtype, kept_f16)
    retyped = outtype if merged is None else None
    write_gguf(output, _header_writer(reader, architecture, retyped), tensors, extra_files)
    return MergedGguf(output, architecture, len(tensors), replaced, kept_f16)


def _with_merged(
    reader, merged: nn.Module, architecture: str, outtype: str, kept_f16: list[str]
) -> tuple[dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], list[str]]:
    """The source's tensors with those ``merged`` changed in ``outtype`` (the rest byte for
    byte, in their own types), and the names of those replaced."""
    ours = _changed_candidates(merged, architecture)
    replaced: list[str] = []
    tensors = {}
    for tensor in reader.tensors:
        new = ours.pop(tensor.name, None)
        if new is None or _unchanged(new, tensor):
            tensors[tensor.name] = (tensor.data, tensor.tensor_type)
        else:
            tensors[tensor.name] = encode(new, outtype, tensor.name, kept_f16)
            replaced.append(tensor.name)
    for name, new in ours.items():  # a tensor the source did not have (an untied head)
        tensors[name] = encode(new, outtype, name, kept_f16)
        replaced.append(name)
    return tensors, replaced


def _header_writer(
    reader, architecture: str, retyped: str | None
) -> Callable[[str], gguf.GGUFWriter]:
    """Starts a writer with the source's metadata; ``retyped``: every tensor is now that
    type, and the file type says so."""

    def start(path: str) -> gguf.GGUFWriter:
        writer = gguf.GGUFWriter(path, architecture)
        alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.add_custom_alignment(int(alignment.contents()))
        for key, part in reader.fields.items():
            if key.startswith(_WRITTEN_BY_WRITER):
                continue
            value = part.contents()
            if key == gguf.Keys.General.FILE_TYPE and retyped is not None:
                value = int(FILE_TYPES[retyped])
            sub_type = part.types[1] if part.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, part.types[0], sub_type)
        if retyped is not None and gguf.Keys.General.FILE_TYPE not in reader.fields:
            writer.add_file_type(int(FILE_TYPES[retyped]))
        return writer

    return start


def _changed_candidates(merged: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """The merged model's tensors under their GGUF names, in llama.cpp's row order."""
    layout = export_layout(merged.config)
    if layout.architecture_name != architecture:
        raise ExportError(
            f"the model is {layout.model_type!r} ({layout.architecture_name} in GGUF), the "
            f"source GGUF is {architecture!r}"
        )
    tied = getattr(merged.config, "tie_word_embeddings", False)
    candidates = {}
    for key, tensor in merged.state_dict().items():
        parts = layout.tensors(key, tensor.detach().float())  # a fused gate_up: two
        if not parts:
            raise ExportError(f"{key} has no tensor in llama.cpp's {layout.model_type} layout")
        if tied:
            parts.pop("output.weight", None)  # the embedding's own, which llama.cpp reads for both
        candidates.update(parts)
    return candidates


def _unchanged(new: torch.Tensor, tensor) -> bool:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array_equal(values.astype(np.float32, copy=False), new.numpy())
