"""E2E NLG analogue: a restaurant's meaning representation → a fluent description.

The slots and values are the E2E challenge's (Novikova et al., 2017), the paper's main
NLG benchmark (Sec. 5.4). A meaning representation (MR) always has a name and an
eatType, often a food, and one to three of the other slots. Texts come from phrase
templates: every slot has several phrasings and several places in the text (before the
noun, after it, or in a second sentence), and the sentence frames vary.

Held out: the split is by the (name, eatType, food) triple, so every test MR describes
a restaurant that never occurs in training. Each example carries three different
reference texts (``references``; ``completion`` is the first) and is scored as E2E is,
with multi-reference BLEU and ROUGE-L.

Every slot value appears verbatim (case aside) in the text, except familyFriendly,
whose yes/no is phrased as one of ``FAMILY_FRIENDLY_PHRASES``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any

from .splits import Candidate, GeneratedTask
from .task import Example, TaskError, as_text, check_lengths
from .text_metrics import bleu_rouge

NAMES = (
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns",
    "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers",
    "The Dumpling Tree", "The Eagle", "The Golden Curry", "The Golden Palace", "The Mill",
    "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat",
    "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers",
    "Travellers Rest Beefeater", "Wildwood", "Zizzi",
)  # fmt: skip
NEAR = (
    "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Café Sicilia", "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Rainbow Vegetarian Café", "Raja Indian Cuisine", "Ranch", "The Bakers",
    "The Portland Arms", "The Six Bells", "The Sorrento", "Yippee Noodle Bar",
)  # fmt: skip
EAT_TYPES = ("coffee shop", "pub", "restaurant")
FOODS = ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese")
PRICES = ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30")
RATINGS = ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5")
AREAS = ("city centre", "riverside")
SLOT_VALUES = {
    "priceRange": PRICES,
    "customer rating": RATINGS,
    "area": AREAS,
    "familyFriendly": ("yes", "no"),
    "near": NEAR,
}
# the E2E data's order of attributes in an MR
SLOT_ORDER = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)
FAMILY_FRIENDLY_PHRASES = {
    "yes": ("family-friendly", "kid-friendly", "child-friendly", "welcomes children"),
    "no": ("not family-friendly", "not kid-friendly", "not child-friendly", "no children"),
}

PER_TRIPLE = 24  # MRs drawn per (name, eatType, food) triple
# A split gets about a tenth (held out) or 8/10 (train) of the 816 triples; the maxima sit
# well below PER_TRIPLE times that, so that every seed reaches them.
REFERENCES = 3
# What an instruction-tuned model is told through its chat template, to score it as its
# makers intend (the demo's baseline). Chosen on 64 validation examples with SmolLM2-135M-
# Instruct, greedy: BLEU 4.7 on the raw prompt, 12.7 with this instruction alone, 32.0 with
# it and one worked example as an earlier user/assistant turn (20.5 with the example inside
# the one user message); a longer variant of the instruction scored 8.9 and 29.3.
INSTRUCTION = (
    "Describe the restaurant below in one or two sentences, mentioning every attribute and "
    "nothing more."
)
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
MAXIMA = {"train": 12_000, "validation": 1_200, "test": 1_200}


class E2ETask(GeneratedTask):
    """Meaning representation → description, scored by BLEU and ROUGE-L (0–100)."""

    name = "e2e"
    kind = "generation"
    primary_metric = "bleu"
    higher_is_better = True
    labels = None
    max_new_tokens = 64  # references run to ~50 SmolLM2 tokens

    default_sizes = DEFAULT_SIZES
    maxima = MAXIMA

    def candidates(self, seed: int) -> Iterable[Candidate]:
        return _candidates(seed)

    def chat_messages(self, example: Example, shots: Sequence[Example] = ()) -> list[dict]:
        """``example`` as a chat for an instruction-tuned model: the instruction and its
        meaning representation as the user's turn, after each of ``shots`` (worked
        examples) as a user turn answered by its reference."""
        messages: list[dict] = []
        for shot in shots:
            messages.append({"role": "user", "content": _request(shot)})
            messages.append({"role": "assistant", "content": shot["completion"].strip()})
        return [*messages, {"role": "user", "content": _request(example)}]

    def preference_splits(
        self, seed: int = 0, train_size: int | None = None
    ) -> dict[str, list[Example]]:
        """The splits as preference pairs (``e2e_slots.preference_pair``): each example's
        reference chosen over a description with one slot dropped, altered or invented."""
        from .e2e_slots import preference_pair

        splits = self.splits(seed=seed, train_size=train_size)
        return {name: [preference_pair(e, seed) for e in split] for name, split in splits.items()}

    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """Corpus BLEU (sacrebleu) and mean best-reference ROUGE-L F1, both 0–100."""
        check_lengths(self.name, predictions, examples)
        hypotheses = [as_text(p) for p in predictions]
        references = [list(e.get("references") or [e["completion"].strip()]) for e in examples]
        return bleu_rouge(hypotheses, references)


def _request(example: Example) -> str:
    return f"{INSTRUCTION}\n\n{example['meaning_representation']}"


def meaning_representation(slots: dict[str, str]) -> str:
    """E2E's notation: ``name[The Vaults], eatType[pub], near[Café Adriatic]``."""
    return ", ".join(f"{slot}[{slots[slot]}]" for slot in SLOT_ORDER if slot in slots)


def _candidates(seed: int) -> Iterator[Candidate]:
    rng = random.Random(f"e2e:{seed}")
    open_triples = [(n, e, f) for n in NAMES for e in EAT_TYPES for f in (*FOODS, None)]
    drawn = dict.fromkeys(open_triples, 0)
    while open_triples:
        index = rng.randrange(len(open_triples))
        triple = open_triples[index]
        slots = _draw_slots(triple, rng)
        drawn[triple] += 1
        if drawn[triple] == PER_TRIPLE:
            open_triples.pop(index)
        mr = meaning_representation(slots)
        yield Candidate(group=repr(triple), key=mr, build=lambda s=slots, m=mr: _example(s, m))


def _draw_slots(triple: tuple[str, str, str | None], rng: random.Random) -> dict[str, str]:
    name, eat_type, food = triple
    slots = {"name": name, "eatType": eat_type}
    if food is not None:
        slots["food"] = food
    # 1–3 more slots keep prompt + completion under ~80 tokens
    for slot in rng.sample(sorted(SLOT_VALUES), rng.choice((1, 2, 2, 3))):
        slots[slot] = rng.choice(SLOT_VALUES[slot])
    return slots


def _example(slots: dict[str, str], mr: str) -> Example:
    rng = random.Random(f"e2e-text:{mr}")  # the texts depend on the MR alone
    references: list[str] = []
    for _ in range(50):  # short MRs have fewer phrasings; stop at what exists
        text = realise(slots, rng)
        if text not in references:
            references.append(text)
        if len(references) == REFERENCES:
            break
    return {
        "prompt": f"{mr}\nDescription:",
        "completion": " " + references[0],
        "references": references,
        "meaning_representation": mr,
        "slots": dict(slots),
    }


# -- realisation --------------------------------------------------------------------------


def realise(slots: dict[str, str], rng: random.Random) -> str:
    """One description of ``slots``: every value mentioned once, in a random phrasing."""
    name, noun = slots["name"], slots["eatType"]
    pre: dict[str, str] = {}  # slot → adjective before the noun
    post: list[str] = []  # phrases after the noun
    predicates: list[str] = []  # verb phrases of a sentence with the place as subject
    for slot in rng.sample([s for s in SLOT_ORDER[2:] if s in slots], k=len(slots) - 2):
        phrasebook = _phrasebook(slot, slots[slot])
        roles = [role for role in ("pre", "post", "predicate") if role in phrasebook]
        # more than two of a kind, or two "with …" phrases in a row, read badly
        if len(pre) == 2:
            roles = [r for r in roles if r != "pre"] or roles
        if len(post) == 2 or (slot in WITH_SLOTS and any(p.startswith("with ") for p in post)):
            roles = [r for r in roles if r != "post"] or roles
        role = rng.choice(roles)
        phrase = rng.choice(phrasebook[role])
        if role == "pre":
            pre[slot] = phrase
        elif role == "post":
            post.append(phrase)
        else:
            predicates.append(phrase)
    adjectives = [pre[s] for s in ("priceRange", "familyFriendly", "food") if s in pre]
    noun_phrase = _with_article(" ".join([*adjectives, noun]))
    tail = "".join(" " + p for p in post)
    frames = [f"{name} is {noun_phrase}{tail}."]
    if len(post) <= 1:
        frames.append(f"There is {noun_phrase}{tail} called {name}.")
    if predicates:
        frames = [
            f + f" {rng.choice(('It', f'The {noun}', name))} {_join(predicates)}." for f in frames
        ]
        frames.append(f"{name}, {noun_phrase}{tail}, {_join(predicates)}.")
    return rng.choice(frames)


WITH_SLOTS = ("priceRange", "customer rating")  # their post phrases start with "with"


@cache
def _phrasebook(slot: str, value: str) -> dict[str, tuple[str, ...]]:
    """Role → phrasings of one slot value: "pre" (adjective), "post", "predicate"."""
    if slot == "food":
        food = "fast food" if value == "Fast food" else f"{value} food"
        return {
            "pre": ("fast food",) if value == "Fast food" else (value,),
            "post": (f"serving {food}", f"that serves {food}", f"offering {food}"),
            "predicate": (f"serves {food}", f"offers {food}"),
        }
    if slot == "priceRange":
        if value in ("cheap", "moderate", "high"):
            nouns = (f"{value} prices", f"a {value} price range")
        else:
            nouns = (f"prices of {value}", f"a price range of {value}")
        book = {
            "post": tuple(f"with {n}" for n in nouns),
            "predicate": tuple(f"has {n}" for n in nouns),
        }
        adjective = {"cheap": "cheap", "moderate": "moderately priced"}.get(value)
        return {"pre": (adjective,), **book} if adjective else book
    if slot == "customer rating":
        if value in ("low", "average", "high"):
            nouns = (
                f"{_with_article(value)} customer rating",
                f"{_with_article(value)} rating from customers",
            )
        else:
            nouns = (f"a customer rating of {value}", f"a rating of {value} from customers")
        return {
            "post": tuple(f"with {n}" for n in nouns),
            "predicate": (*(f"has {n}" for n in nouns), f"is rated {value}"),
        }
    if slot == "area":
        places = ("in the city centre", "in the city centre area")
        if value == "riverside":
            places = ("in the riverside area", "by the riverside")
        return {
            "post": places,
            "predicate": (*(f"is {p}" for p in places), f"is located {places[0]}"),
        }
    if slot == "familyFriendly":
        yes, no = FAMILY_FRIENDLY_PHRASES["yes"], FAMILY_FRIENDLY_PHRASES["no"]
        if value == "yes":
            return {"pre": yes[:3], "predicate": (*(f"is {p}" for p in yes[:3]), yes[3])}
        return {"predicate": (*(f"is {p}" for p in no[:3]), "allows no children")}
    if slot == "near":
        return {
            "post": (f"near {value}", f"close to {value}", f"next to {value}"),
            "predicate": (f"is near {value}", f"is located near {value}", f"is close to {value}"),
        }
    raise TaskError(f"e2e: no phrasing for slot {slot!r}")


def _with_article(noun_phrase: str) -> str:
    article = "an" if noun_phrase[0].lower() in "aeiou" else "a"
    return f"{article} {noun_phrase}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]
