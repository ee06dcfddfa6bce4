"""Pure core: property definitions (a key's scopes, type, allowed values, `required`) and the
check of a value or a whole property set against them. No database, no clock.

A key without a definition stays free-form. A definition's `enforcement` says what a break does:
`warn` (the value is stored, the owner carries the violation) or `reject` (the change is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from .errors import BadDefinition
from .limits import KEY_MAX, value_problem
from .merge import same_json

SCOPES = ("dataset", "version", "datum")
TYPES = ("string", "number", "integer", "boolean", "object", "array", "date")
ENFORCEMENTS = ("warn", "reject")
FIELDS = (
    "key",
    "scopes",
    "type",
    "allowed_values",
    "required",
    "description",
    "display_name",
    "enforcement",
)
TEXT_MAX = 10_000
MAX_ALLOWED = 1_000


@dataclass(frozen=True)
class AllowedValue:
    """One value a key may hold, with what it means."""

    value: Any
    description: str = ""


@dataclass(frozen=True)
class Definition:
    """What a key's values must be, on which owners, and what happens when one is not."""

    key: str
    scopes: tuple[str, ...] = SCOPES
    type: str | None = None  # None: any JSON type
    allowed_values: tuple[AllowedValue, ...] = ()
    required: bool = False
    description: str = ""
    display_name: str = ""
    enforcement: str = "warn"

    def as_json(self) -> dict[str, Any]:
        """The definition as the API shows it and `sidecar definitions export` writes it."""
        return {
            "key": self.key,
            "scopes": list(self.scopes),
            "type": self.type,
            "allowed_values": [{"value": a.value, "description": a.description} for a in self.allowed_values],
            "required": self.required,
            "description": self.description,
            "display_name": self.display_name,
            "enforcement": self.enforcement,
        }


@dataclass(frozen=True)
class Violation:
    """A value (None: missing) of `key` that breaks its definition's `rule`."""

    key: str
    rule: str  # "type", "allowed_values" or "required"
    value: Any = None
    detail: str = field(default="", compare=False)

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "rule": self.rule, "value": self.value}

    def reason(self) -> str:
        """The reject reason or 400 detail: names the key and the rule."""
        return f"property {self.key!r} breaks its definition ({self.rule}): {self.detail}"


def parse(body: Any, key: str | None = None) -> Definition:
    """A definition from a JSON/YAML object; `key` is the one in the URL, if any (the body's
    `key` may be left out, else must match). BadDefinition naming the first bad field."""
    if not isinstance(body, dict):
        raise BadDefinition("definition", "expected an object")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise BadDefinition(unknown[0], f"unknown field; the fields are {', '.join(FIELDS)}")
    name = _key(body.get("key", key), key)
    kind = body.get("type")
    if kind is not None and kind not in TYPES:
        raise BadDefinition("type", f"unknown type {str(kind)[:50]!r}; one of {', '.join(TYPES)}")
    return Definition(
        key=name,
        scopes=_scopes(body.get("scopes", list(SCOPES))),
        type=kind,
        allowed_values=_allowed(body.get("allowed_values") or [], kind),
        required=_flag(body.get("required", False), "required"),
        description=_text(body.get("description", ""), "description"),
        display_name=_text(body.get("display_name", ""), "display_name"),
        enforcement=_enforcement(body.get("enforcement", "warn")),
    )


def _key(given: Any, expected: str | None) -> str:
    if not isinstance(given, str) or not 0 < len(given) <= KEY_MAX or value_problem(given):
        raise BadDefinition("key", f"a string of 1..{KEY_MAX} characters")
    if given.startswith("valohai."):
        raise BadDefinition("key", "'valohai.' keys are platform-managed")
    if expected is not None and given != expected:
        raise BadDefinition("key", f"the body's key {given[:100]!r} is not the URL's {expected[:100]!r}")
    return given


def _scopes(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise BadDefinition("scopes", f"a non-empty list of {', '.join(SCOPES)}")
    for scope in value:
        if scope not in SCOPES:
            raise BadDefinition("scopes", f"unknown scope {str(scope)[:50]!r}; any of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in value)


def _allowed(value: Any, kind: str | None) -> tuple[AllowedValue, ...]:
    if not isinstance(value, list) or len(value) > MAX_ALLOWED:
        raise BadDefinition("allowed_values", f"a list of at most {MAX_ALLOWED} items")
    found: list[AllowedValue] = []
    for i, item in enumerate(value):
        where = f"allowed_values[{i}]"
        if isinstance(item, dict) and "value" in item and set(item) <= {"value", "description"}:
            allowed = AllowedValue(item["value"], _text(item.get("description", ""), f"{where}.description"))
        else:
            allowed = AllowedValue(item)
        problem = _scalar_problem(allowed.value)
        if problem is None and kind is not None and not type_ok(kind, allowed.value):
            problem = f"not of the definition's type {kind}"
        if problem:
            raise BadDefinition(where, problem)
        if not any(_same(a.value, allowed.value) for a in found):  # a value listed twice: the first
            found.append(allowed)
    return tuple(found)


def _scalar_problem(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return "an allowed value is a string, number or boolean"
    return value_problem(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadDefinition(name, "true or false")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) > TEXT_MAX or value_problem(value):
        raise BadDefinition(name, f"a string of at most {TEXT_MAX} characters")
    return value


def _enforcement(value: Any) -> str:
    if value not in ENFORCEMENTS:
        raise BadDefinition("enforcement", f"one of {', '.join(ENFORCEMENTS)}")
    return str(value)


def type_ok(kind: str, value: Any) -> bool:
    """Whether `value` is of the definition type `kind` (a JSON boolean is no number)."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "number":
        return _number(value)
    if kind == "integer":
        return _number(value) and float(value).is_integer()
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, str) and _iso_date(value)


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _iso_date(text: str) -> bool:
    """An ISO-8601 date (`2026-01-15`) or date-time (`2026-01-15T08:00:00Z`, with an offset)."""
    for read in (date.fromisoformat, datetime.fromisoformat):
        try:
            read(text.upper())  # RFC 3339 allows `t` and `z`
            return True
        except ValueError:
            continue
    return False


def _same(a: Any, b: Any) -> bool:
    """Allowed-value equality: numbers by value (1 is 1.0), everything else as JSON values."""
    if _number(a) and _number(b):
        return bool(a == b)
    return same_json(a, b)


def check(definition: Definition, value: Any) -> list[Violation]:
    """What `value` breaks of `definition` (type first; allowed values only for a value of the
    right type). A null value deletes the key and breaks nothing here (`required` is separate)."""
    if value is None:
        return []
    if definition.type is not None and not type_ok(definition.type, value):
        return [Violation(definition.key, "type", value, f"expected {definition.type}")]
    allowed = definition.allowed_values
    if allowed and not any(_same(a.value, value) for a in allowed):
        shown = ", ".join(_short(a.value) for a in allowed[:10])
        return [Violation(definition.key, "allowed_values", value, f"expected one of {shown}")]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def applies(definition: Definition, scope: str) -> bool:
    """Whether the definition covers owners of `scope` (`dataset`, `version`, `datum`)."""
    return scope in definition.scopes


def violations(
    definitions: Mapping[str, Definition], scope: str, properties: Mapping[str, Any], *, complete: bool
) -> list[Violation]:
    """Every violation of a whole property set of an owner of `scope`, in key order; `required`
    keys count only when `complete` (a version: once it completed)."""
    found: list[Violation] = []
    for key in sorted(definitions):
        definition = definitions[key]
        if not applies(definition, scope):
            continue
        if key in properties:
            found.extend(check(definition, properties[key]))
        elif definition.required and complete:
            found.append(Violation(key, "required", None, "the key is missing"))
    return found


def rejected(
    definitions: Mapping[str, Definition], scope: str, changes: Mapping[str, Any]
) -> list[Violation]:
    """The violations of a change set's keys whose definitions `reject` (those keys' changes are
    to be dropped, the rest applied)."""
    found: list[Violation] = []
    for key, value in changes.items():
        definition = definitions.get(key)
        if definition is not None and definition.enforcement == "reject" and applies(definition, scope):
            found.extend(check(definition, value))
    return found


def split(
    definitions: Mapping[str, Definition], scope: str, changes: dict[str, Any]
) -> tuple[dict[str, Any], list[Violation]]:
    """(the changes a `reject` definition lets through, the violations of those it drops)."""
    broken = rejected(definitions, scope, changes) if definitions else []
    if not broken:
        return changes, []
    dropped = {v.key for v in broken}
    return {k: v for k, v in changes.items() if k not in dropped}, broken


def as_json(found: Iterable[Violation]) -> list[dict[str, Any]]:
    """Violations as stored in an owner's `violations` column and shown by the API."""
    return [v.as_json() for v in found]
