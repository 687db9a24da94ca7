"""The e2e task's slots in a text, and preference pairs built from them.

``mentioned`` reads which (slot, value) pairs a description mentions: every value but
familyFriendly's appears verbatim (case aside) in the texts the task writes, and the
price and the rating share their words (``high``) only inside their own phrases. A
greedy output's *slot errors* are the MR's slots it drops plus the slots it invents (E2E's
slot error rate without its "wrong value" class, which is one of each).

A preference pair keeps the example's prompt; ``chosen`` is its reference text and
``rejected`` a text of the same MR with one slot dropped, altered or invented, drawn with
the split's seed (so a seed gives the same pairs everywhere).
"""

from __future__ import annotations

import random
import re
from functools import cache

from .e2e_text import EAT_TYPES, FAMILY_FRIENDLY_PHRASES, FOODS, NAMES, SLOT_VALUES, realise
from .task import Example

SLOTS = {"name": NAMES, "eatType": EAT_TYPES, "food": FOODS, **SLOT_VALUES}
CORRUPTIONS = ("drop", "alter", "invent")
ALWAYS = ("name", "eatType")  # every MR has them: dropped or altered, never invented


@cache
def _pattern(slot: str, value: str) -> re.Pattern:
    """How ``slot[value]`` shows in a text the task writes."""
    if slot == "priceRange" and value == "high":
        return re.compile(r"\bhigh price", re.I)
    if slot == "priceRange" and value == "moderate":
        return re.compile(r"\bmoderate(ly priced)?\b", re.I)
    if slot == "customer rating" and value in ("low", "average", "high"):
        return re.compile(rf"\b{value} (customer )?rating|\brated {value}\b", re.I)
    if slot == "familyFriendly":
        phrases = FAMILY_FRIENDLY_PHRASES[value]
        if value == "no":
            phrases = (*phrases, "allows no children")
            return re.compile("|".join(re.escape(p) for p in phrases), re.I)
        return re.compile(r"(?<!not )(?<!no )\b(" + "|".join(map(re.escape, phrases)) + ")", re.I)
    if slot == "food" and value == "Fast food":
        return re.compile(r"\bfast food\b", re.I)
    return re.compile(rf"(?<![\w-]){re.escape(value)}(?![\w-])", re.I)


def mentioned(text: str) -> set[tuple[str, str]]:
    """Every (slot, value) of the task's vocabulary that ``text`` mentions. Longer values
    are read first and their words used up, so "Indian" inside near[Raja Indian Cuisine]
    is not a food."""
    found = set()
    for slot, value in _LONGEST_FIRST:
        pattern = _pattern(slot, value)
        if pattern.search(text):
            found.add((slot, value))
            text = pattern.sub(" ", text)
    return found


_LONGEST_FIRST = sorted(
    ((slot, value) for slot, values in SLOTS.items() for value in values),
    key=lambda pair: -len(pair[1]),
)


def slot_errors(text: str, slots: dict[str, str]) -> tuple[int, int]:
    """(dropped, invented): the MR's slots ``text`` leaves out, and the slots it mentions
    that the MR does not have (a wrong value is one of each)."""
    found, wanted = mentioned(text), set(slots.items())
    return len(wanted - found), len(found - wanted)


def corrupted(slots: dict[str, str], rng: random.Random) -> tuple[str, dict[str, str]]:
    """(what was done, the slots with one dropped, altered or invented)."""
    kind = rng.choice(CORRUPTIONS)
    optional = [slot for slot in slots if slot not in ALWAYS]
    absent = [slot for slot in SLOT_VALUES if slot not in slots]
    if kind == "invent" and not absent:
        kind = "alter"
    changed = dict(slots)
    if kind == "drop":
        del changed[rng.choice(optional)]
    elif kind == "alter":
        slot = rng.choice(sorted(slots))
        changed[slot] = rng.choice([v for v in SLOTS[slot] if v != slots[slot]])
    else:
        slot = rng.choice(absent)
        changed[slot] = rng.choice(SLOT_VALUES[slot])
    return kind, changed


def preference_pair(example: Example, seed: int) -> Example:
    """``example`` as a preference pair: its reference against a corrupted description."""
    rng = random.Random(f"e2e-pair:{seed}:{example['meaning_representation']}")
    kind, slots = corrupted(example["slots"], rng)
    return {
        "prompt": example["prompt"],
        "chosen": example["completion"],
        "rejected": " " + realise(slots, rng),
        "corruption": kind,
        "meaning_representation": example["meaning_representation"],
        "slots": example["slots"],
    }
