"""The JSON Schemas in `schemas/`, the single source of truth for what a line may hold."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

_BASE = "https://sidecar.invalid/schemas/"


def schema_dir() -> Path:
    """`worker/schemas` in an installed wheel, else the repository's `schemas/`."""
    packaged = Path(__file__).parent / "schemas"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "schemas"


@cache
def _registry() -> Registry:
    resources = []
    for path in sorted(schema_dir().glob("*.schema.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


@cache
def validator(name: str) -> Draft202012Validator:
    """A compiled, reusable validator for `schemas/<name>.schema.json`."""
    registry = _registry()
    schema = registry.contents(_BASE + name + ".schema.json")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry)


def first_error(name: str, document: Any) -> str | None:
    """The most relevant schema violation as one line (with its JSON path), or None if valid."""
    error = best_match(validator(name).iter_errors(document))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{name}{where}: {message}" if where else f"{name}: {message}"
