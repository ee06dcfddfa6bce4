"""The layers as drawn (docs/design.md, "Modules"), read from the source with `ast`: no import
is executed, so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "worker"

# What the store must not reach: Redis, the staging area, or the modules built on both.
NOT_FROM_STORE = (
    "redis",
    "worker.staging",
    "worker.applying",
    "worker.connections",
    "worker.tasks",
    "celery",
)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in one source file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]  # the package a relative import is relative to (also for __init__)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join((*base, node.module) if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from . import staging` names a module too
                yield node.lineno, f"{module}.{alias.name}"


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_relative_imports_resolve_to_the_modules_they_name() -> None:
    """Else the checks below would pass on names they never compare (`..staging` from store/)."""
    found = {m for _, m in imports(PACKAGE / "store" / "apply.py")}
    assert {"worker.store.index", "worker.records", "sqlalchemy"} <= found  # `.index`, `..records`
    assert "worker.staging.area" in {m for _, m in imports(PACKAGE / "staging" / "__init__.py")}


def test_the_store_speaks_sql_only() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in sources(PACKAGE / "store")
        for line, module in imports(path)
        if any(under(module, banned) for banned in NOT_FROM_STORE)
    ]
    assert found == []


def test_only_the_staging_package_imports_redis() -> None:
    staging = PACKAGE / "staging"
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in sources(PACKAGE)
        if staging not in path.parents
        for line, module in imports(path)
        if under(module, "redis")
    ]
    assert found == []
