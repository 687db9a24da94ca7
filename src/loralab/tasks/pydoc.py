"""Language modelling on the Python documentation that ships with CPython.

``pydoc_data.topics.topics`` holds the language reference's topics (``assert``,
``assignment``, ``atom-identifiers`` …) as plain text: real technical English, present
in every Python install, so nothing is downloaded. Topics, not chunks, are split: the
seed shuffles the sorted topic names, and each topic in turn goes to test if test stays
within a tenth of all the text, else to validation on the same terms, else to train, so
test perplexity is measured on topics the model never trained on. Each topic is cut into
chunks of at most ``chunk_chars`` characters at paragraph breaks (at line breaks, then
spaces, inside a paragraph that is too long).

The metric is perplexity, which the evaluator computes from the model's loss on the
``{"text"}`` examples; ``score()`` has no predictions to compare and refuses. The text
differs a little between Python versions, so splits are reproducible per version.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pydoc_data.topics import topics as TOPICS
from typing import Any

from .splits import HELD_OUT_FRACTION, SPLIT_NAMES, resolve_sizes
from .task import Example, TaskError


class PydocTask:
    """Chunks of CPython's documentation topics; perplexity, lower is better."""

    name = "pydoc"
    kind = "lm"
    primary_metric = "perplexity"
    higher_is_better = False
    labels = None
    max_new_tokens = 0  # nothing is generated

    def __init__(self, chunk_chars: int = 600) -> None:
        if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 50:
            raise TaskError(f"pydoc: chunk_chars must be an integer ≥ 50, got {chunk_chars!r}")
        self.chunk_chars = chunk_chars

    def splits(
        self,
        seed: int = 0,
        train_size: int | None = None,
        validation_size: int | None = None,
        test_size: int | None = None,
    ) -> dict[str, list[Example]]:
        """Each split's chunks in a seeded order; by default all of them."""
        chunks: dict[str, list[Example]] = {}
        for split, names in split_topics(seed).items():
            examples = [
                {"text": chunk, "topic": topic}
                for topic in names
                for chunk in chunk_text(TOPICS[topic], self.chunk_chars)
            ]
            random.Random(f"pydoc:{seed}:{split}").shuffle(examples)
            chunks[split] = examples
        maxima = {split: len(examples) for split, examples in chunks.items()}
        requested = {"train": train_size, "validation": validation_size, "test": test_size}
        sizes = resolve_sizes(self.name, requested, maxima, maxima)
        return {split: chunks[split][: sizes[split]] for split in SPLIT_NAMES}

    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """Refused: perplexity comes from the model's loss (``evaluate.perplexity``)."""
        raise TaskError(
            "pydoc: perplexity is computed from the model's loss on the text examples "
            "(loralab.evaluate), not from predictions; score() has nothing to compare"
        )


def split_topics(seed: int) -> dict[str, list[str]]:
    """Topic names per split: whole topics, about a tenth of the text each held out."""
    names = sorted(TOPICS)
    random.Random(f"pydoc:{seed}").shuffle(names)
    target = HELD_OUT_FRACTION * sum(len(TOPICS[name]) for name in names)
    split_names: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    filled = {"test": 0, "validation": 0}
    for name in names:
        size = len(TOPICS[name])
        # a held-out split takes a topic while it stays within its tenth of the text
        split = next((s for s in filled if filled[s] + size <= target), "train")
        split_names[split].append(name)
        if split != "train":
            filled[split] += size
    return split_names


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut into pieces of at most ``chunk_chars``, at the largest break that fits."""
    pieces = _pieces(text.strip("\n"), chunk_chars, separators=("\n\n", "\n", " "))
    return [piece for piece in pieces if piece.strip()]


def _pieces(text: str, limit: int, separators: tuple[str, ...]) -> list[str]:
    if len(text) <= limit:
        return [text]
    if not separators:
        return [text[i : i + limit] for i in range(0, len(text), limit)]
    separator, finer = separators[0], separators[1:]
    chunks: list[str] = []
    current = ""
    for part in text.split(separator):
        candidate = f"{current}{separator}{part}" if current else part
        if len(candidate) <= limit:
            current = candidate
            continue
        if current:
            chunks.append(current)
        if len(part) <= limit:
            current = part
        else:  # cut at the next finer break; the last cut may still take the next part
            *whole, current = _pieces(part, limit, finer)
            chunks += whole
    if current:
        chunks.append(current)
    return [chunk.strip("\n") for chunk in chunks]
