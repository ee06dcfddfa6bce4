"""The JSON Schemas in `schemas/`, the single source of truth for what a line may hold.

Two validators read the same files. `jsonschema-rs` (compiled) answers "valid?" for every line in
about a microsecond; the reference `jsonschema` runs only for a line that fails, to word the reject
(its `best_match` messages). tests/test_schemas.py checks on generated good and bad documents that
the two always agree.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
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


@cache
def fast_validator(name: str) -> jsonschema_rs.Validator:
    """The compiled validator for `schemas/<name>.schema.json`, with the other files as its registry."""
    registry = _registry()
    resources = [(uri, registry.contents(uri)) for uri in registry]
    return jsonschema_rs.Draft202012Validator(
        registry.contents(_BASE + name + ".schema.json"), registry=jsonschema_rs.Registry(resources)
    )


def first_error(name: str, document: Any) -> str | None:
    """The most relevant schema violation as one line (with its JSON path), or None if valid."""
    fast = fast_validator(name)
    try:
        valid = fast.is_valid(document)
    except (ValueError, OverflowError, TypeError):  # a value it cannot take: the reference decides
        return reference_error(name, document)
    if valid:
        return None
    # The compiled validator decides; should the reference ever see no error where it sees one,
    # the line is still refused, with the compiled validator's own words.
    return reference_error(name, document) or f"{name}: {next(iter(fast.iter_errors(document))).message}"


def reference_error(name: str, document: Any) -> str | None:
    """`first_error` through the reference validator only."""
    error = best_match(validator(name).iter_errors(document))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message
    if len(message) > 200:
        # The middle goes: jsonschema quotes the offending value first and says why last.
        message = message[:100] + "..." + message[-80:]
    return f"{name}{where}: {message}" if where else f"{name}: {message}"
