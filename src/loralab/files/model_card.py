"""The adapter's model card (``README.md``), written where the base it was trained over is
not the plain dense model: the card says how that base was stored, so that a user of the
adapter knows what it was trained against. ``adapter_config.json`` stays PEFT's own, with
no extra key.

For a packed GGUF base: the file's name, its sha256, and the types its packed weights had.
For a base quantized by bitsandbytes: its ``BitsAndBytesConfig``, one ``- key: value`` line
each under the heading PEFT itself wrote it under ("Training procedure"), which readers of
QLoRA adapters' cards look for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
MARKER = "<!-- written by loralab: the base this adapter was trained over -->"


def model_card(quantization: dict[str, Any] | None, base_model: str | None) -> str | None:
    """The card's text for a base stored as ``quantization`` records it, or None (dense)."""
    if quantization is None:
        return None
    sections = {"gguf": _gguf_section, "bitsandbytes": _bnb_section}
    backend = quantization.get("backend")
    if backend not in sections:
        raise ValueError(f"no model card for a {backend!r} base")
    return "\n".join(
        [
            MARKER,
            "---",
            "library_name: peft",
            *([f"base_model: {base_model}"] if base_model else []),
            "---",
            "",
            "# LoRA adapter trained over a quantized base",
            "",
            *sections[backend](quantization),
            "",
        ]
    )


def _gguf_section(quantization: dict[str, Any]) -> list[str]:
    path = Path(quantization["file"])
    types = ", ".join(f"{count} × {name}" for name, count in quantization["packed"].items())
    return [
        "## Base quantization",
        "",
        "The frozen base was the GGUF file's own packed weights, unpacked inside each "
        "forward and backward pass (loralab's `--quantized-base gguf`), not a dense copy:",
        "",
        f"- file: `{path.name}`",
        f"- sha256: `{_sha256(path)}`",
        f"- packed linear weights: {types}",
        "",
        "The unpacked values are the dense load's bit for bit, so the adapter runs on "
        "the dense model (PEFT, vLLM) as trained.",
    ]


def _bnb_section(quantization: dict[str, Any]) -> list[str]:
    return [
        "## Training procedure",
        "",
        "The following `bitsandbytes` quantization config was used during training:",
        *(f"- {key}: {value}" for key, value in quantization["config"].items()),
    ]


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a card loralab wrote (and may replace or remove)."""
    try:
        with path.open(encoding="utf-8") as file:
            return file.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def base_quantization_lines(path: Path) -> list[str]:
    """What a card of ours says of the base (``file: …``, ``sha256: …``, ``packed linear
    weights: …``), for ``loralab info``; none for another card or none at all."""
    if not is_ours(path):
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.removeprefix("- ") for line in lines if line.startswith("- ")]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
