"""The package's shape: what two modules share is public, and the imports between
loralab's modules (lazy ones inside functions included) run one way, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loralab"


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return found


def _imports(name: str, path: Path, tree: ast.Module, known: set[str]):
    """(module imported, the names taken from it) for every relative import of ``name``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}"
                yield (child, []) if child in known else (target, [alias.name])


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [
        f"{name} imports {taken} from {target}"
        for name, (path, tree) in modules.items()
        for target, names in _imports(name, path, tree, set(modules))
        for taken in names
        if taken.startswith("_")
    ]
    assert not private


def test_the_imports_between_modules_have_no_cycle():
    modules = _modules()
    graph = {
        name: {t for t, _ in _imports(name, path, tree, set(modules)) if t in modules and t != name}
        for name, (path, tree) in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# The floors of the architecture, lowest first: a module may import from its own floor
# and the floors below it, never from one above (the LoRA core imports nothing else).
FLOORS = (
    ("lora",),
    ("models", "data"),
    ("files", "tasks"),
    ("methods",),
    ("training", "engine"),
    ("generate", "evaluate"),
    ("serve", "experiments", "demo"),
    ("cli", "__main__"),
)


def _floor(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_every_module_is_on_a_floor_and_imports_only_down_or_across():
    modules = _modules()
    up = sorted(
        {
            f"{name} (floor {_floor(name)}) imports {target} (floor {_floor(target)})"
            for name, (path, tree) in modules.items()
            if name != "loralab"  # the package's names load lazily, by name
            for target, _ in _imports(name, path, tree, set(modules))
            if _floor(target) > _floor(name)
        }
    )
    assert not up, "\n".join(up)


def test_the_top_holds_only_the_entry_points_and_the_packages():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__", "__main__", "cli", "demo", "evaluate", "generate"]


def test_the_tests_mirror_the_packages():
    """Each package of the source has its folder of tests, and each folder of tests is a
    package of the source."""
    tests = PACKAGE.parents[1] / "tests"
    packages = {
        p.parent.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("__init__.py")
        if p.parent != PACKAGE
    }
    folders = {
        p.parent.relative_to(tests).as_posix()
        for p in tests.rglob("test_*.py")
        if p.parent != tests
    }
    assert folders <= packages
    assert packages - folders <= {"methods/adalora"}  # tests/methods/test_adalora.py
