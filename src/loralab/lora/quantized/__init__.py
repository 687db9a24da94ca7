"""A frozen base kept quantized: its weights stay packed in blocks and are unpacked
inside the forward and the backward, never held dense (``packed_linear.py``).

The formats are registered by name, one file per family: a new one is a file that
registers its ``BlockFormat`` and one line in ``FORMAT_MODULES``.
"""

import importlib

from .block_format import FORMATS, BlockFormat, format_named, format_of_ggml_type
from .packed_linear import PackedLinear

# Each family's file registers its formats when imported: one line per family.
FORMAT_MODULES = (
    "gguf_legacy",
    "gguf_k",
)
for _module in FORMAT_MODULES:
    importlib.import_module(f".{_module}", __name__)

__all__ = ["FORMATS", "BlockFormat", "PackedLinear", "format_named", "format_of_ggml_type"]
