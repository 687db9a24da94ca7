"""MNLI analogue: does the premise entail, leave open, or contradict the hypothesis?

Both sentences are quantified statements over one kind of thing at one place, sharing a
predicate: "All dogs in the park are sleeping." / "Some animals in the park are not
sleeping.". Four forms: ``all`` (every N is P), ``some`` (some N is P), ``some-not``
(some N is not P) and ``no`` (no N is P). Nouns sit in small hypernym trees (a dog is
an animal, an oak is a tree and a plant), so a noun can be narrower than, wider than,
equal to, or disjoint from the other sentence's noun; things at different places are
different things.

The label is decided by checking every model, not by hand-written rules: split the
things the two sentences talk about into at most two classes (shared; only one
sentence's), let each class be empty, all P, all not-P or mixed, and keep the models
where the premise holds. The hypothesis true in all of them: entailment; false in all:
contradiction; otherwise neutral. English is unsure whether "all dogs …" says that dogs
exist (existential import), so the check runs twice, with and without assuming that
each sentence's things exist, and a pair whose label differs ("All dogs are sleeping." /
"Some dogs are sleeping.") is never generated. Labels are balanced in every split.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from itertools import product
from typing import Any, NamedTuple

from .splits import Candidate, GeneratedTask
from .task import Example, check_lengths, label_index, percent

LABELS = ("entailment", "neutral", "contradiction")
ENTAILMENT, NEUTRAL, CONTRADICTION = range(3)
FORMS = ("all", "some", "some-not", "no")


class Kind(NamedTuple):
    """One hypernym tree with what its members can do and where they can be."""

    parents: dict[str, str | None]  # noun → its hypernym; None at the root
    plurals: dict[str, str]
    predicates: tuple[str, ...]
    places: tuple[str, ...]


KINDS = (
    Kind(
        parents={
            "animal": None,
            **dict.fromkeys(("dog", "cat", "horse", "cow", "bird"), "animal"),
            "puppy": "dog",
            "kitten": "cat",
            "pony": "horse",
            "calf": "cow",
            **dict.fromkeys(("sparrow", "eagle", "owl", "crow"), "bird"),
        },
        plurals={"puppy": "puppies", "calf": "calves"},
        predicates=(
            "sleeping",
            "running",
            "eating",
            "resting",
            "hiding",
            "playing",
            "drinking",
            "standing",
        ),
        places=(
            "in the park",
            "in the field",
            "near the river",
            "in the garden",
            "on the farm",
            "in the barn",
        ),
    ),
    Kind(
        parents={
            "plant": None,
            **dict.fromkeys(("tree", "flower", "bush", "fern"), "plant"),
            **dict.fromkeys(("oak", "pine", "maple", "birch"), "tree"),
            **dict.fromkeys(("rose", "tulip", "daisy", "lily"), "flower"),
        },
        plurals={"bush": "bushes", "birch": "birches", "daisy": "daisies", "lily": "lilies"},
        predicates=(
            "growing",
            "blooming",
            "wilting",
            "swaying",
            "budding",
            "drooping",
            "thriving",
            "fading",
        ),
        places=(
            "in the park",
            "in the garden",
            "near the river",
            "on the hill",
            "by the wall",
            "in the meadow",
        ),
    ),
    Kind(
        parents={
            "vehicle": None,
            **dict.fromkeys(("car", "bus", "truck", "van", "bicycle", "scooter"), "vehicle"),
            **dict.fromkeys(("taxi", "sports car"), "car"),
            "minibus": "bus",
            "pickup truck": "truck",
        },
        plurals={"bus": "buses", "minibus": "minibuses"},
        predicates=("parked", "moving", "waiting", "locked", "empty", "blocked", "full", "damaged"),
        places=(
            "on the street",
            "at the station",
            "near the bridge",
            "in the square",
            "by the market",
            "outside the school",
        ),
    ),
)
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
MAXIMA = {"train": 10_000, "validation": 1_000, "test": 1_000}


class Statement(NamedTuple):
    """``form`` ∈ FORMS of ``noun``s at ``place`` and ``predicate``."""

    form: str
    noun: str
    predicate: str
    place: str


class NliTask(GeneratedTask):
    """Premise/hypothesis → entailment, neutral or contradiction; accuracy (0–100)."""

    name = "nli"
    kind = "classification"
    primary_metric = "accuracy"
    higher_is_better = True
    labels = LABELS
    max_new_tokens = 4  # a label word is one or two tokens

    default_sizes = DEFAULT_SIZES
    maxima = MAXIMA
    num_labels = len(LABELS)

    def candidates(self, seed: int) -> Iterable[Candidate]:
        return _candidates(seed)

    def score(self, predictions: Sequence[Any], examples: Sequence[Example]) -> dict[str, float]:
        """Accuracy; a prediction is a label id or text starting with the label word."""
        check_lengths(self.name, predictions, examples)
        hits = sum(
            label_index(prediction, LABELS) == example["label"]
            for prediction, example in zip(predictions, examples, strict=True)
        )
        return {"accuracy": percent(hits, len(examples))}


# -- the logic ------------------------------------------------------------------------------


def entailment_label(premise: Statement, hypothesis: Statement) -> int | None:
    """The label of the pair, or None where it hangs on existential import."""
    if premise.predicate != hypothesis.predicate:
        raise ValueError("nli: both sentences must share the predicate")
    return _label(premise.form, hypothesis.form, _classes(premise, hypothesis))


@cache
def _label(premise_form: str, hypothesis_form: str, classes: tuple) -> int | None:
    labels = {
        _label_by_models(premise_form, hypothesis_form, classes, assume) for assume in (True, False)
    }
    return labels.pop() if len(labels) == 1 else None


def _label_by_models(
    premise_form: str, hypothesis_form: str, classes: tuple, assume_members: bool
) -> int:
    # a class state: (has a member that is P, has a member that is not P)
    states = ((False, False), (True, False), (False, True), (True, True))
    verdicts = set()
    for model in product(states, repeat=len(classes)):
        premise_things = [s for s, (in_p, _) in zip(model, classes, strict=True) if in_p]
        hypothesis_things = [s for s, (_, in_h) in zip(model, classes, strict=True) if in_h]
        if assume_members and not (_exists(premise_things) and _exists(hypothesis_things)):
            continue
        if _holds(premise_form, premise_things):
            verdicts.add(_holds(hypothesis_form, hypothesis_things))
    if verdicts == {True}:
        return ENTAILMENT
    if verdicts == {False}:
        return CONTRADICTION
    return NEUTRAL


def _classes(premise: Statement, hypothesis: Statement) -> tuple[tuple[bool, bool], ...]:
    """The kinds of things in play: (in the premise's set, in the hypothesis's set)."""
    if premise.place != hypothesis.place:
        return ((True, False), (False, True))
    if premise.noun == hypothesis.noun:
        return ((True, True),)
    if hypothesis.noun in hypernyms(premise.noun):  # premise's things are some of the others
        return ((True, True), (False, True))
    if premise.noun in hypernyms(hypothesis.noun):
        return ((True, True), (True, False))
    return ((True, False), (False, True))


def _exists(things: list[tuple[bool, bool]]) -> bool:
    return any(is_p or is_not_p for is_p, is_not_p in things)


def _holds(form: str, things: list[tuple[bool, bool]]) -> bool:
    some_p = any(is_p for is_p, _ in things)
    some_not_p = any(is_not_p for _, is_not_p in things)
    return {"all": not some_not_p, "some": some_p, "some-not": some_not_p, "no": not some_p}[form]


@cache
def hypernyms(noun: str) -> tuple[str, ...]:
    """The nouns above ``noun`` in its tree, nearest first (puppy → dog, animal)."""
    parents = _kind_of(noun).parents
    above, parent = [], parents[noun]
    while parent is not None:
        above.append(parent)
        parent = parents[parent]
    return tuple(above)


@cache
def hyponyms(noun: str) -> tuple[str, ...]:
    """The nouns below ``noun`` in its tree, in sorted order (dog → puppy)."""
    return tuple(n for n in sorted(_kind_of(noun).parents) if noun in hypernyms(n))


def _kind_of(noun: str) -> Kind:
    for kind in KINDS:
        if noun in kind.parents:
            return kind
    raise ValueError(f"nli: unknown noun {noun!r}")


# -- the words ------------------------------------------------------------------------------


def sentence(statement: Statement, variant: int = 0) -> str:
    """The statement in English; ``variant`` picks one of three equivalent phrasings."""
    form, noun, predicate, place = statement
    one, many = noun, plural(noun)
    phrasings = {
        "all": (
            f"All {many} {place} are {predicate}.",
            f"Every {one} {place} is {predicate}.",
            f"Each {one} {place} is {predicate}.",
        ),
        "some": (
            f"Some {many} {place} are {predicate}.",
            f"At least one {one} {place} is {predicate}.",
            f"There is {_article(one)} {one} {place} that is {predicate}.",
        ),
        "some-not": (
            f"Some {many} {place} are not {predicate}.",
            f"Not all {many} {place} are {predicate}.",
            f"Not every {one} {place} is {predicate}.",
        ),
        "no": (
            f"No {many} {place} are {predicate}.",
            f"No {one} {place} is {predicate}.",
            f"None of the {many} {place} are {predicate}.",
        ),
    }[form]
    return phrasings[variant % len(phrasings)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(noun: str) -> str:
    return _kind_of(noun).plurals.get(noun, noun + "s")


def prompt(premise: str, hypothesis: str) -> str:
    """The causal-LM form: the completion is the label word after "Answer:"."""
    return (
        f"Premise: {premise}\nHypothesis: {hypothesis}\n"
        "Entailment, neutral or contradiction?\nAnswer:"
    )


# -- the generator --------------------------------------------------------------------------


def _candidates(seed: int) -> Iterator[Candidate]:
    rng = random.Random(f"nli:{seed}")
    while True:
        kind = rng.choice(KINDS)
        nouns = sorted(kind.parents)
        predicate, place = rng.choice(kind.predicates), rng.choice(kind.places)
        premise = Statement(rng.choice(FORMS), rng.choice(nouns), predicate, place)
        related = (premise.noun, *hypernyms(premise.noun), *hyponyms(premise.noun))
        # mostly related nouns, same place, same form: the pairs whose label takes reasoning
        # (entailment needs all three, so without the bias it would be rare)
        noun = rng.choice(related if rng.random() < 0.85 else nouns)
        form = premise.form if rng.random() < 0.4 else rng.choice(FORMS)
        other_place = place if rng.random() < 0.9 else rng.choice(kind.places)
        hypothesis = Statement(form, noun, predicate, other_place)
        label = entailment_label(premise, hypothesis)
        if label is None or hypothesis == premise:
            continue
        yield Candidate(
            group="|".join(premise),  # held-out premises: no test premise is seen in training
            key="|".join(premise) + "/" + "|".join(hypothesis),
            build=lambda p=premise, h=hypothesis, y=label: _example(p, h, y),
            label=label,
        )


def _example(premise: Statement, hypothesis: Statement, label: int) -> Example:
    rng = random.Random(f"nli-words:{'|'.join(premise)}/{'|'.join(hypothesis)}")
    premise_text = sentence(premise, rng.randrange(3))
    hypothesis_text = sentence(hypothesis, rng.randrange(3))
    return {
        "premise": premise_text,
        "hypothesis": hypothesis_text,
        "label": label,
        "text": premise_text,
        "text_pair": hypothesis_text,
        "prompt": prompt(premise_text, hypothesis_text),
        "completion": " " + LABELS[label],
        "logic": {"premise": list(premise), "hypothesis": list(hypothesis)},
    }
