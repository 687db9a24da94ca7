"""The built-in tasks: deterministic held-out splits, correct labels, honest metrics."""

from __future__ import annotations

import inspect
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from functools import cache
from itertools import chain
from pathlib import Path
from pydoc_data.topics import topics as cpython_topics

import pytest

import loralab.tasks
from loralab.tasks import TASK_NAMES, Task, TaskError, e2e, e2e_text, get_task, nli, pydoc, sql
from loralab.tasks.nli import CONTRADICTION, ENTAILMENT, NEUTRAL, Statement, entailment_label
from loralab.tasks.sql_tables import table_rows

GENERATED = ("e2e", "sql", "nli")
SMALL = {"train_size": 300, "validation_size": 60, "test_size": 60}


@cache
def splits_of(name: str, seed: int = 0) -> dict[str, list[dict]]:
    """Splits shared by the tests (treat as read-only)."""
    return get_task(name).splits(seed=seed, **({} if name == "pydoc" else SMALL))


# -- the registry and the contract ------------------------------------------------------------


def test_registry_names_the_four_tasks_and_each_keeps_the_interface():
    assert TASK_NAMES == ("e2e", "sql", "nli", "pydoc")
    expected = {
        "e2e": ("generation", "bleu", True, None),
        "sql": ("generation", "execution_accuracy", True, None),
        "nli": ("classification", "accuracy", True, ("entailment", "neutral", "contradiction")),
        "pydoc": ("lm", "perplexity", False, None),
    }
    for name in TASK_NAMES:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert (task.kind, task.primary_metric, task.higher_is_better, task.labels) == (
            expected[name]
        )


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(TaskError) as error:
        get_task("glue")
    assert "'glue'" in str(error.value)
    assert all(name in str(error.value) for name in TASK_NAMES)


@pytest.mark.parametrize("name", GENERATED)
def test_default_sizes(name):
    sizes = {split: len(examples) for split, examples in get_task(name).splits().items()}
    assert sizes == {"train": 2000, "validation": 200, "test": 200}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_splits_other_seed_other_splits(name):
    task = get_task(name)
    small = {} if name == "pydoc" else {"train_size": 40, "validation_size": 10, "test_size": 10}
    first = task.splits(seed=5, **small)
    assert task.splits(seed=5, **small) == first
    assert task.splits(seed=6, **small) != first


def _digests() -> dict[str, str]:
    import hashlib
    import json

    from loralab.tasks import TASK_NAMES, get_task

    sizes = {"train_size": 30, "validation_size": 10, "test_size": 10}
    digests = {}
    for name in TASK_NAMES:
        splits = get_task(name).splits(seed=3, **({} if name == "pydoc" else sizes))
        text = json.dumps(splits, sort_keys=True, ensure_ascii=False)
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
    return digests


def test_splits_are_identical_in_another_process_with_another_hash_seed():
    # loralab/__init__ imports torch (seconds); the tasks need none of it, so the child
    # process loads loralab as a bare namespace and imports only loralab.tasks
    package_dir = str(Path(loralab.tasks.__file__).parents[1])
    script = "\n".join(
        [
            "import json, sys, types",
            "package = types.ModuleType('loralab')",
            f"package.__path__ = [{package_dir!r}]",
            "sys.modules['loralab'] = package",
            inspect.getsource(_digests),
            "print(json.dumps(_digests()))",
        ]
    )
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        child = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
        )
        assert json.loads(child.stdout) == _digests()


@pytest.mark.parametrize("name", GENERATED)
def test_sizes_are_honoured_and_each_split_ignores_the_others_sizes(name):
    task = get_task(name)
    splits = task.splits(seed=2, train_size=37, validation_size=0, test_size=11)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [37, 0, 11]
    other = task.splits(seed=2, train_size=37, validation_size=5, test_size=3)
    assert other["train"] == splits["train"]
    if name != "nli":  # nli balances labels within each size, so it is no prefix
        assert other["test"] == splits["test"][:3]


@pytest.mark.parametrize("module", [e2e, sql, nli], ids=GENERATED)
def test_too_large_a_size_names_the_maximum(module):
    task = get_task(module.__name__.rsplit(".", 1)[-1])
    for split, maximum in module.MAXIMA.items():
        with pytest.raises(TaskError, match=rf"{split}_size={maximum + 1}.*maximum is {maximum}"):
            task.splits(**{f"{split}_size": maximum + 1})


def test_the_maximum_is_reachable():
    maximum = nli.MAXIMA["validation"]
    examples = get_task("nli").splits(seed=1, train_size=0, validation_size=maximum, test_size=0)
    assert len(examples["validation"]) == maximum


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_a_size_that_is_not_a_count_is_refused(bad):
    with pytest.raises(TaskError, match="train_size must be a non-negative integer"):
        get_task("sql").splits(train_size=bad)


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_disjoint_and_prompts_unique(name):
    splits = splits_of(name)
    prompts = {split: [e["prompt"] for e in examples] for split, examples in splits.items()}
    for split, texts in prompts.items():
        assert len(set(texts)) == len(texts), f"duplicate prompt in {split}"
    assert not set(prompts["test"]) & set(prompts["train"])
    assert not set(prompts["validation"]) & set(prompts["train"])
    assert not set(prompts["test"]) & set(prompts["validation"])


@pytest.mark.parametrize("name", ("e2e", "sql"))
def test_generation_examples_are_prompt_and_a_clean_completion(name):
    for example in splits_of(name)["train"]:
        assert example["prompt"].endswith(":") and not example["prompt"].endswith(" ")
        completion = example["completion"]
        assert completion.startswith(" ") and completion == completion.rstrip()
        assert "\n" not in completion and "<|" not in completion and "</s>" not in completion


def test_score_refuses_predictions_that_do_not_pair_with_examples():
    examples = splits_of("sql")["test"][:3]
    with pytest.raises(TaskError, match="2 predictions for 3 examples"):
        get_task("sql").score(["SELECT 1", "SELECT 1"], examples)


# -- e2e --------------------------------------------------------------------------------------


def _triple(example: dict) -> tuple:
    slots = example["slots"]
    return slots["name"], slots["eatType"], slots.get("food")


def test_e2e_test_restaurants_never_occur_in_training():
    splits = splits_of("e2e")
    train_triples = {_triple(e) for e in splits["train"]}
    train_mrs = {e["meaning_representation"] for e in splits["train"]}
    for example in splits["test"] + splits["validation"]:
        assert _triple(example) not in train_triples
        assert example["meaning_representation"] not in train_mrs


def test_e2e_meaning_representation_is_the_e2e_notation_of_the_slots():
    for example in splits_of("e2e")["test"]:
        mr = example["meaning_representation"]
        assert example["prompt"] == f"{mr}\nDescription:"
        parsed = dict(part[:-1].split("[", 1) for part in mr.split(", "))
        assert parsed == example["slots"]
        assert list(parsed)[:2] == ["name", "eatType"]
        assert 3 <= len(parsed) <= 6


def test_e2e_every_reference_mentions_every_slot_value():
    yes, no = e2e_text.FAMILY_FRIENDLY_PHRASES["yes"], e2e_text.FAMILY_FRIENDLY_PHRASES["no"]
    for example in splits_of("e2e")["train"]:
        references = example["references"]
        assert len(set(references)) == e2e.REFERENCES
        assert example["completion"] == " " + references[0]
        for text in references:
            lower = text.lower()
            for slot, value in example["slots"].items():
                if slot == "familyFriendly":  # the one slot said in other words
                    said_no = any(p in lower for p in no)
                    said_yes = any(p in lower for p in yes) and not said_no
                    assert said_no if value == "no" else said_yes, text
                else:
                    assert value.lower() in lower, (slot, value, text)


def test_e2e_score_is_100_for_any_reference_and_low_for_unrelated_text():
    task, examples = get_task("e2e"), splits_of("e2e")["test"][:20]
    for pick in (0, 2):
        perfect = task.score([" " + e["references"][pick] for e in examples], examples)
        assert perfect["bleu"] == pytest.approx(100.0)
        assert perfect["rouge_l"] == pytest.approx(100.0)
    unrelated = ["The weather in Paris was mild and dry all week."] * len(examples)
    scores = task.score(unrelated, examples)
    assert scores["bleu"] < 5 and scores["rouge_l"] < 15
    # what a model writes after its first line is a run-on, not part of the answer
    run_on = [" " + e["references"][0] + "\nname[Aromi]" for e in examples]
    assert task.score(run_on, examples)["bleu"] == pytest.approx(100.0)


def test_e2e_chat_messages_ask_with_the_instruction_after_the_worked_examples():
    task = get_task("e2e")
    train, test = splits_of("e2e")["train"], splits_of("e2e")["test"]
    shot, example = train[0], test[0]
    messages = task.chat_messages(example, [shot])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == f"{e2e.INSTRUCTION}\n\n{shot['meaning_representation']}"
    assert messages[1]["content"] == shot["completion"].strip() == shot["references"][0]
    assert messages[2]["content"].endswith("\n\n" + example["meaning_representation"])
    assert task.chat_messages(example) == messages[2:]  # zero-shot: the question alone
    assert "\n" not in e2e.INSTRUCTION  # one line


# -- sql --------------------------------------------------------------------------------------


def _answer_by_hand(example: dict) -> Counter:
    """The gold query's answer computed in Python from the table rows, not by SQLite."""
    columns, rows = example["columns"], table_rows(example["db_seed"])[example["table"]]
    compare = {"=": lambda a, b: a == b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    kept = [
        row
        for row in rows
        if all(compare[op](row[columns.index(c)], v) for c, op, v in example["conditions"])
    ]
    values = [row[columns.index(example["select"])] for row in kept]
    aggregate = {
        "": None,
        "COUNT": len,
        "MAX": max,
        "MIN": min,
        "SUM": sum,
        "AVG": lambda v: round(sum(v) / len(v), 6),
    }[example["aggregation"]]
    return Counter([(aggregate(values),)] if aggregate else [(v,) for v in values])


def test_sql_every_gold_query_runs_and_returns_the_answer_computed_by_hand():
    database = sql.open_database(0)
    for split in ("train", "test"):
        for example in splits_of("sql")[split]:
            assert example["db_seed"] == 0
            expected = _answer_by_hand(example)
            assert sql.run_query(database, example["sql"]) == expected, example["sql"]
            assert expected and (None,) not in expected  # never an empty answer
            assert example["prompt"].startswith(f"Table: {example['table']}(")
            assert example["completion"] == " " + example["sql"]


def test_sql_execution_accuracy_is_100_for_gold_and_0_for_garbage():
    task, examples = get_task("sql"), splits_of("sql")["test"]
    assert task.score([e["completion"] for e in examples], examples) == {
        "execution_accuracy": 100.0,
        "exact_match": 100.0,
    }
    garbage = ["SELECT", "the answer is 42", "", "SELECT nonsense FROM nowhere"] * 15
    assert task.score(garbage, examples) == {"execution_accuracy": 0.0, "exact_match": 0.0}


def test_sql_a_rewritten_but_equal_query_executes_right_without_matching_exactly():
    examples = [e for e in splits_of("sql")["test"] if len(e["conditions"]) == 2][:10]
    assert examples
    recased = ["  " + e["sql"].replace("SELECT ", "select   ").replace(" FROM", " from") + " ;"
               for e in examples]  # fmt: skip
    swapped = []
    for example in examples:
        head, where = example["sql"].split(" WHERE ")
        first, second = where.split(" AND ")
        swapped.append(f"{head} WHERE {second} AND {first}")
    task = get_task("sql")
    assert task.score(recased, examples) == {"execution_accuracy": 100.0, "exact_match": 100.0}
    assert task.score(swapped, examples) == {"execution_accuracy": 100.0, "exact_match": 0.0}


def test_sql_destructive_or_runaway_predictions_are_wrong_and_harm_nothing():
    database = sql.open_database(0)
    rows_before = database.execute("SELECT COUNT(*) FROM employees").fetchone()
    attacks = [
        "DROP TABLE employees",
        "DROP TABLE employees; SELECT COUNT(name) FROM employees",
        "SELECT COUNT(name) FROM employees; DROP TABLE employees",
        "DELETE FROM employees",
        "UPDATE employees SET salary = 0",
        "INSERT INTO employees VALUES ('x', 'y', 1, 2)",
        "ATTACH DATABASE 'stolen.db' AS stolen",
        "PRAGMA writable_schema = ON",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n",
        "SELECT COUNT(*) FROM employees a, employees b, employees c, employees d, employees e",
    ]
    for attack in attacks:
        assert sql.run_query(database, attack) is None, attack
    assert database.execute("SELECT COUNT(*) FROM employees").fetchone() == rows_before
    assert not Path("stolen.db").exists()
    with pytest.raises(sqlite3.DatabaseError):  # the database itself refuses writes too
        database.execute("DELETE FROM employees")
    examples = splits_of("sql")["test"][: len(attacks)]
    assert get_task("sql").score(attacks, examples)["execution_accuracy"] == 0.0


def test_sql_exact_match_ignores_only_whitespace_case_and_a_final_semicolon():
    assert sql.normalise(" SELECT  name\nFROM t ; ") == "select name from t"
    assert sql.normalise("SELECT name FROM t WHERE a = 1") != sql.normalise("SELECT name FROM t")


# -- nli --------------------------------------------------------------------------------------


def _rule(premise: Statement, hypothesis: Statement) -> int:
    """The labels, as hand-written rules (the task derives them by checking models)."""
    if premise.place != hypothesis.place:
        return NEUTRAL
    if premise.noun == hypothesis.noun:
        relation = "same"
    elif hypothesis.noun in nli.hypernyms(premise.noun):
        relation = "narrower"  # the premise talks about some of the hypothesis's things
    elif premise.noun in nli.hypernyms(hypothesis.noun):
        relation = "wider"
    else:
        return NEUTRAL
    forms = premise.form, hypothesis.form
    if forms in (("some", "some"), ("some-not", "some-not")) and relation == "narrower":
        return ENTAILMENT  # "some" is upward monotone in its noun
    if forms in (("all", "all"), ("no", "no")) and relation == "wider":
        return ENTAILMENT  # "all" and "no" are downward monotone in their noun
    opposite = (("all", "some-not"), ("no", "some"))
    if forms in opposite and relation in ("same", "wider"):
        return CONTRADICTION  # a counterexample among the universal's own things
    if forms[::-1] in opposite and relation in ("same", "narrower"):
        return CONTRADICTION
    return NEUTRAL


def _s(form: str, noun: str, place: str = "in the park") -> Statement:
    return Statement(form, noun, "sleeping", place)


@pytest.mark.parametrize(
    "premise, hypothesis, label",
    [
        (_s("all", "dog"), _s("all", "puppy"), ENTAILMENT),
        (_s("some", "puppy"), _s("some", "animal"), ENTAILMENT),
        (_s("no", "bird"), _s("no", "eagle"), ENTAILMENT),
        (_s("some-not", "eagle"), _s("some-not", "bird"), ENTAILMENT),
        (_s("all", "animal"), _s("some-not", "dog"), CONTRADICTION),
        (_s("some", "cat"), _s("no", "animal"), CONTRADICTION),
        (_s("some", "dog"), _s("no", "dog"), CONTRADICTION),
        (_s("some", "animal"), _s("some", "dog"), NEUTRAL),  # the animals may be cats
        (_s("all", "dog"), _s("all", "animal"), NEUTRAL),
        (_s("some", "dog"), _s("some-not", "dog"), NEUTRAL),
        (_s("no", "dog"), _s("some", "animal"), NEUTRAL),
        (_s("all", "dog"), _s("some-not", "cat"), NEUTRAL),
        (_s("all", "dog"), _s("some-not", "dog", "in the field"), NEUTRAL),  # other place
        # these hang on whether "all dogs" says dogs exist, so they are never generated
        (_s("all", "dog"), _s("some", "dog"), None),
        (_s("all", "dog"), _s("no", "dog"), None),
        (_s("no", "animal"), _s("some-not", "dog"), None),
    ],
)
def test_nli_labels_of_hand_checked_pairs(premise, hypothesis, label):
    assert entailment_label(premise, hypothesis) == label


def test_nli_generated_pairs_follow_the_rules_and_read_as_their_logic():
    for example in splits_of("nli")["train"] + splits_of("nli")["test"]:
        premise = Statement(*example["logic"]["premise"])
        hypothesis = Statement(*example["logic"]["hypothesis"])
        assert premise.predicate == hypothesis.predicate
        assert example["label"] == _rule(premise, hypothesis), example
        assert example["premise"] in {nli.sentence(premise, v) for v in range(3)}
        assert example["hypothesis"] in {nli.sentence(hypothesis, v) for v in range(3)}
        assert (example["text"], example["text_pair"]) == (
            example["premise"],
            example["hypothesis"],
        )
        assert example["prompt"].endswith("Answer:")
        assert example["completion"] == " " + nli.LABELS[example["label"]]


def test_nli_the_first_pairs_of_seed_0_read_right_to_a_person():
    # checked by hand; a change to the generator changes them, and they must be rechecked
    expected = [
        (
            "Not all minibuses at the station are moving.",
            "No cars at the station are moving.",
            "neutral",  # a minibus is a bus, not a car
        ),
        (
            "At least one owl on the farm is hiding.",
            "None of the owls on the farm are hiding.",
            "contradiction",
        ),
        (
            "None of the calves near the river are playing.",
            "There is a cow in the garden that is playing.",
            "neutral",  # another place
        ),
        (
            "Every car near the bridge is empty.",
            "Each taxi near the bridge is empty.",
            "entailment",
        ),
        (
            "All maples in the park are swaying.",
            "Not all maples in the park are swaying.",
            "contradiction",
        ),
        (
            "Every vehicle by the market is full.",
            "All scooters by the market are full.",
            "entailment",
        ),
    ]
    examples = get_task("nli").splits(seed=0, train_size=0, validation_size=0, test_size=6)
    got = [(e["premise"], e["hypothesis"], nli.LABELS[e["label"]]) for e in examples["test"]]
    assert got == expected


def test_nli_model_checking_agrees_with_the_hand_written_rules_on_every_pair():
    kind = nli.KINDS[0]
    statements = [
        Statement(form, noun, "sleeping", place)
        for form in nli.FORMS
        for noun in sorted(kind.parents)
        for place in kind.places[:2]
    ]
    dropped = 0
    for premise in statements:
        for hypothesis in statements:
            if hypothesis == premise:
                continue  # never generated
            label = entailment_label(premise, hypothesis)
            if label is None:
                dropped += 1
            else:
                assert label == _rule(premise, hypothesis), (premise, hypothesis)
    assert 0 < dropped < len(statements) ** 2 / 10


def test_nli_labels_are_balanced_in_every_split():
    for examples in splits_of("nli").values():
        counts = Counter(e["label"] for e in examples)
        assert sorted(counts) == [0, 1, 2]
        assert max(counts.values()) - min(counts.values()) <= 1


def test_nli_held_out_premises_are_never_seen_in_training():
    splits = splits_of("nli")
    train = {tuple(e["logic"]["premise"]) for e in splits["train"]}
    assert not train & {tuple(e["logic"]["premise"]) for e in splits["test"]}


def test_nli_score_takes_label_ids_or_generated_words():
    task, examples = get_task("nli"), splits_of("nli")["test"][:6]
    gold = [e["label"] for e in examples]
    assert task.score(gold, examples) == {"accuracy": 100.0}
    words = [f" {nli.LABELS[label].capitalize()}." for label in gold]
    assert task.score(words, examples) == {"accuracy": 100.0}
    wrong = [(label + 1) % 3 for label in gold]
    assert task.score(wrong, examples) == {"accuracy": 0.0}
    nonsense = ["yes", "", "maybe entailment", 7, -1, None]
    assert task.score(nonsense, examples) == {"accuracy": 0.0}
    assert task.score([" entailment"] * 6, examples)["accuracy"] == pytest.approx(
        100 * gold.count(0) / 6
    )


# -- pydoc ------------------------------------------------------------------------------------


def test_pydoc_chunks_are_real_cpython_documentation():
    splits = splits_of("pydoc")
    for examples in splits.values():
        assert examples
        for example in examples:
            assert example["text"].strip()
            assert example["text"] in cpython_topics[example["topic"]]
            assert len(example["text"]) <= 600
    assert any("assert" in e["text"] for e in chain(*splits.values()))


def test_pydoc_held_out_topics_do_not_appear_in_training():
    splits = splits_of("pydoc")
    topics = {split: {e["topic"] for e in examples} for split, examples in splits.items()}
    assert not topics["test"] & topics["train"]
    assert not topics["validation"] & topics["train"]
    assert not topics["test"] & topics["validation"]
    assert topics["train"] | topics["validation"] | topics["test"] == set(cpython_topics)


def test_pydoc_chunking_covers_the_text_at_the_chosen_size():
    text = cpython_topics["assert"] + cpython_topics["with"]
    for size in (80, 200, 600):
        chunks = pydoc.chunk_text(text, size)
        assert all(0 < len(chunk) <= size for chunk in chunks)
        assert "".join("".join(chunks).split()) == "".join(text.split())  # nothing lost
    task = pydoc.PydocTask(chunk_chars=200)
    assert max(len(e["text"]) for e in task.splits(test_size=20)["test"]) <= 200


def test_pydoc_sizes_score_and_settings():
    task = get_task("pydoc")
    everything = splits_of("pydoc")
    assert len(task.splits(train_size=5)["train"]) == 5
    maximum = len(everything["test"])
    with pytest.raises(TaskError, match=f"maximum is {maximum}"):
        task.splits(test_size=maximum + 1)
    with pytest.raises(TaskError, match="perplexity"):
        task.score([], [])
    with pytest.raises(TaskError, match="chunk_chars"):
        pydoc.PydocTask(chunk_chars=0)
