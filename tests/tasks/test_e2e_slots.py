"""The e2e task's slot reader and its preference pairs: the reader finds exactly the
slots of every description the task writes, and each pair's rejected text has exactly the
one slot error its corruption names."""

from __future__ import annotations

from collections import Counter

from loralab.tasks import get_task
from loralab.tasks.e2e_slots import mentioned, slot_errors


def test_every_reference_mentions_exactly_its_slots():
    for example in get_task("e2e").splits(seed=3, train_size=600)["train"]:
        for text in example["references"]:
            assert mentioned(text) == set(example["slots"].items()), text


def test_a_value_inside_a_longer_one_is_not_read_twice():
    text = "Aromi is a pub near Raja Indian Cuisine with high prices and a low customer rating."
    found = mentioned(text)
    assert ("near", "Raja Indian Cuisine") in found and ("food", "Indian") not in found
    assert ("priceRange", "high") in found and ("customer rating", "low") in found
    assert ("customer rating", "high") not in found
    assert mentioned("It is not family-friendly.") == {("familyFriendly", "no")}
    slots = {"name": "Aromi", "eatType": "pub", "food": "Indian"}
    assert slot_errors("Aromi is a pub with high prices.", slots) == (1, 1)


def test_preference_pairs_have_one_corrupted_slot_each_and_depend_on_the_seed():
    task = get_task("e2e")
    splits = task.preference_splits(seed=0, train_size=300)
    expected = {"drop": (1, 0), "alter": (1, 1), "invent": (0, 1)}
    kinds = Counter()
    for pair in splits["train"] + splits["test"]:
        assert slot_errors(pair["chosen"], pair["slots"]) == (0, 0)
        assert slot_errors(pair["rejected"], pair["slots"]) == expected[pair["corruption"]]
        kinds[pair["corruption"]] += 1
    assert min(kinds.values()) > 0.25 * sum(kinds.values())
    assert task.preference_splits(seed=0, train_size=300) == splits
    assert task.preference_splits(seed=1, train_size=300)["train"] != splits["train"]
    # The prompts and chosen texts are the supervised task's own examples.
    plain = task.splits(seed=0, train_size=300)["test"]
    assert [p["prompt"] for p in splits["test"]] == [e["prompt"] for e in plain]
