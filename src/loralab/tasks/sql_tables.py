"""The tables behind the ``sql`` task: their columns, how questions name them, their rows.

Rows are drawn from a seed with realistic values (a product's category fits the product,
salaries are whole thousands); text values never hold a quote, so the SQL literals stay
plain. ``phrases`` say a condition in English, as a phrase after a plural noun:
"employees" + "in the Sales department" + "and older than 40".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple


class Column(NamedTuple):
    name: str
    label: str  # the column in a question: "salary"
    plural: str  # "salaries"
    numeric: bool
    phrases: dict[str, tuple[str, ...]]  # operator → phrasings of "<column> <op> {v}"
    thresholds: tuple[int, ...] = ()  # round numbers that ">" and "<" compare with
    additive: bool = True  # False where a SUM means nothing (years)


class Table(NamedTuple):
    name: str
    entities: str  # what a row is, plural: "employees"
    columns: tuple[Column, ...]
    rows: Callable[[random.Random], list[tuple[Any, ...]]]


FIRST_NAMES = (
    "Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Jones", "Garcia", "Chen", "Novak", "Patel", "Kim", "Silva", "Berg", "Costa",
    "Meyer", "Rossi", "Khan", "Lopez", "Ward", "Young",
)  # fmt: skip


def _people(rng: random.Random, count: int) -> list[str]:
    pairs = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    return rng.sample(pairs, count)


def _employees(rng: random.Random) -> list[tuple]:
    departments = ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal")
    return [
        (name, rng.choice(departments), rng.randrange(30, 121) * 1000, rng.randint(22, 64))
        for name in _people(rng, 24)
    ]


PRODUCTS = {
    "Furniture": ("Oak Desk", "Office Chair", "Bookshelf", "Sofa", "Coffee Table", "Wardrobe"),
    "Electronics": ("Laptop", "Headphones", "Monitor", "Keyboard", "Tablet", "Smartwatch"),
    "Kitchen": ("Kettle", "Toaster", "Blender", "Frying Pan", "Chef Knife", "Coffee Maker"),
    "Garden": ("Lawn Mower", "Garden Hose", "Rake", "Wheelbarrow", "Plant Pot", "Shears"),
    "Toys": ("Puzzle", "Kite", "Toy Train", "Board Game", "Teddy Bear", "Yo-yo"),
}
PRICE_RANGES = {
    "Furniture": (40, 900),
    "Electronics": (20, 1500),
    "Kitchen": (8, 250),
    "Garden": (5, 400),
    "Toys": (3, 80),
}


def _products(rng: random.Random) -> list[tuple]:
    catalogue = [(item, category) for category, items in PRODUCTS.items() for item in items]
    return [
        (item, category, rng.randint(*PRICE_RANGES[category]), rng.randint(0, 300))
        for item, category in rng.sample(catalogue, 22)
    ]


CITIES = (
    ("Lyon", "France"), ("Nantes", "France"), ("Lille", "France"), ("Porto", "Portugal"),
    ("Braga", "Portugal"), ("Seville", "Spain"), ("Valencia", "Spain"), ("Bilbao", "Spain"),
    ("Turin", "Italy"), ("Bologna", "Italy"), ("Naples", "Italy"), ("Leipzig", "Germany"),
    ("Dresden", "Germany"), ("Bremen", "Germany"), ("Graz", "Austria"), ("Linz", "Austria"),
    ("Ghent", "Belgium"), ("Bruges", "Belgium"), ("Utrecht", "Netherlands"),
    ("Leiden", "Netherlands"), ("Krakow", "Poland"), ("Gdansk", "Poland"),
)  # fmt: skip


def _cities(rng: random.Random) -> list[tuple]:
    return [
        (
            city,
            country,
            rng.randrange(50, 2500) * 1000,
            rng.randrange(8, 20) * 100 + rng.randrange(100),
        )
        for city, country in rng.sample(CITIES, 20)
    ]


TITLE_WORDS = (
    ("Silent", "Hidden", "Last", "Golden", "Broken", "Distant", "Winter", "Secret"),
    ("River", "Garden", "Letter", "Harbour", "Mountain", "Promise", "Map", "Orchard"),
)
AUTHORS = ("Ana Reyes", "Tom Fischer", "Lena Park", "Omar Haddad", "Ruth Okafor", "Ivan Petrov")


def _books(rng: random.Random) -> list[tuple]:
    titles = [f"The {adjective} {noun}" for adjective in TITLE_WORDS[0] for noun in TITLE_WORDS[1]]
    return [
        (title, rng.choice(AUTHORS), rng.randint(1950, 2023), rng.randrange(12, 90) * 10)
        for title in rng.sample(titles, 24)
    ]


def _players(rng: random.Random) -> list[tuple]:
    teams = ("Lions", "Tigers", "Eagles", "Sharks", "Wolves")
    positions = ("Guard", "Forward", "Center")
    return [
        (name, rng.choice(teams), rng.choice(positions), rng.randint(0, 60))
        for name in _people(rng, 24)
    ]


def _key(label: str) -> dict[str, tuple[str, ...]]:
    """How a question pins the key column: "named Alice Smith", "titled The Last Map"."""
    return {"=": ("named {v}", "called {v}")} if label == "name" else {"=": ("titled {v}",)}


TABLES = (
    Table(
        "employees",
        "employees",
        (
            Column("name", "name", "names", False, _key("name")),
            Column(
                "department",
                "department",
                "departments",
                False,
                {"=": ("in the {v} department", "who work in {v}", "whose department is {v}")},
            ),
            Column(
                "salary",
                "salary",
                "salaries",
                True,
                {
                    "=": ("earning exactly {v}", "with a salary of {v}"),
                    ">": ("earning more than {v}", "with a salary above {v}"),
                    "<": ("earning less than {v}", "with a salary below {v}"),
                },
                tuple(range(40_000, 120_000, 10_000)),
            ),
            Column(
                "age",
                "age",
                "ages",
                True,
                {
                    "=": ("aged {v}", "who are {v} years old"),
                    ">": ("older than {v}", "aged over {v}"),
                    "<": ("younger than {v}", "aged under {v}"),
                },
                tuple(range(25, 65, 5)),
            ),
        ),
        _employees,
    ),
    Table(
        "products",
        "products",
        (
            Column("name", "name", "names", False, _key("name")),
            Column(
                "category",
                "category",
                "categories",
                False,
                {"=": ("in the {v} category", "whose category is {v}")},
            ),
            Column(
                "price",
                "price",
                "prices",
                True,
                {
                    "=": ("priced at {v}", "costing {v}"),
                    ">": ("priced above {v}", "costing more than {v}"),
                    "<": ("priced below {v}", "costing less than {v}"),
                },
                (10, 25, 50, 100, 200, 300, 500, 1000),
            ),
            Column(
                "stock",
                "stock",
                "stock levels",
                True,
                {
                    "=": ("with exactly {v} in stock", "with a stock of {v}"),
                    ">": ("with more than {v} in stock", "with a stock above {v}"),
                    "<": ("with fewer than {v} in stock", "with a stock below {v}"),
                },
                (10, 25, 50, 100, 150, 200, 250),
            ),
        ),
        _products,
    ),
    Table(
        "cities",
        "cities",
        (
            Column("name", "name", "names", False, _key("name")),
            Column(
                "country",
                "country",
                "countries",
                False,
                {"=": ("in {v}", "located in {v}", "whose country is {v}")},
            ),
            Column(
                "population",
                "population",
                "populations",
                True,
                {
                    "=": ("with a population of {v}",),
                    ">": ("with a population above {v}", "with more than {v} inhabitants"),
                    "<": ("with a population below {v}", "with fewer than {v} inhabitants"),
                },
                (100_000, 250_000, 500_000, 1_000_000, 1_500_000, 2_000_000),
            ),
            Column(
                "founded",
                "founding year",
                "founding years",
                True,
                {
                    "=": ("founded in {v}",),
                    ">": ("founded after {v}",),
                    "<": ("founded before {v}",),
                },
                tuple(range(900, 2000, 100)),
                additive=False,
            ),
        ),
        _cities,
    ),
    Table(
        "books",
        "books",
        (
            Column("title", "title", "titles", False, _key("title")),
            Column(
                "author",
                "author",
                "authors",
                False,
                {"=": ("written by {v}", "by {v}", "whose author is {v}")},
            ),
            Column(
                "year",
                "publication year",
                "publication years",
                True,
                {
                    "=": ("published in {v}",),
                    ">": ("published after {v}",),
                    "<": ("published before {v}",),
                },
                tuple(range(1960, 2030, 10)),
                additive=False,
            ),
            Column(
                "pages",
                "page count",
                "page counts",
                True,
                {
                    "=": ("with {v} pages", "with exactly {v} pages"),
                    ">": ("with more than {v} pages", "longer than {v} pages"),
                    "<": ("with fewer than {v} pages", "shorter than {v} pages"),
                },
                tuple(range(200, 900, 100)),
            ),
        ),
        _books,
    ),
    Table(
        "players",
        "players",
        (
            Column("name", "name", "names", False, _key("name")),
            Column(
                "team",
                "team",
                "teams",
                False,
                {"=": ("on the {v}", "playing for the {v}", "whose team is the {v}")},
            ),
            Column(
                "position",
                "position",
                "positions",
                False,
                {"=": ("who play as {v}", "whose position is {v}")},
            ),
            Column(
                "points",
                "points total",
                "points totals",
                True,
                {
                    "=": ("with {v} points", "scoring exactly {v} points"),
                    ">": ("with more than {v} points", "scoring over {v} points"),
                    "<": ("with fewer than {v} points", "scoring under {v} points"),
                },
                tuple(range(10, 60, 10)),
            ),
        ),
        _players,
    ),
)


@lru_cache(maxsize=8)
def table_rows(seed: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows for ``seed``; a cached value, so treat it as read-only."""
    return {
        table.name: table.rows(random.Random(f"sql-rows:{seed}:{table.name}")) for table in TABLES
    }
