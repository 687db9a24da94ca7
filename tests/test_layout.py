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
