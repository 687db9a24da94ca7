"""The e2e task's language: the E2E challenge's slots and values (Novikova et al., 2017)
and the phrase templates that describe a meaning representation (``realise``).

Every slot value appears verbatim (case aside) in a description, except familyFriendly,
whose yes/no is phrased as one of ``FAMILY_FRIENDLY_PHRASES``.
"""

from __future__ import annotations

import random
from functools import cache

from .task import TaskError

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
