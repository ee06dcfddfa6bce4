"""Pure core: parsing property definitions and checking values and property sets against them."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from worker.definitions import AllowedValue, Definition, Violation, check, parse, rejected, violations
from worker.errors import BadDefinition


def test_a_full_definition_parses_and_round_trips() -> None:
    body = {
        "key": "shift",
        "scopes": ["version", "dataset"],
        "type": "string",
        "allowed_values": ["day", {"value": "night", "description": "22-06"}],
        "required": True,
        "description": "which shift recorded it",
        "display_name": "Shift",
        "enforcement": "reject",
    }
    d = parse(body)
    assert d.scopes == ("dataset", "version")  # canonical order
    assert d.allowed_values == (AllowedValue("day"), AllowedValue("night", "22-06"))
    assert parse(d.as_json()) == d
    assert parse({}, "free") == Definition("free")  # everything has a default but the key


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "definition"),
        ({"key": "k", "type": "uuid"}, "type"),
        ({"key": "k", "scopes": ["execution"]}, "scopes"),
        ({"key": "k", "scopes": []}, "scopes"),
        ({"key": "k", "type": "integer", "allowed_values": [1, "two"]}, "allowed_values[1]"),
        ({"key": "k", "description": None}, "description"),
        ({"key": "k", "allowed_values": [None]}, "allowed_values[0]"),
        ({"key": "k", "allowed_values": ["a", {"a": 1}]}, "allowed_values[1]"),
        ({"key": "k", "type": "array", "allowed_values": [[1]]}, "allowed_values[0]"),
        ({"key": "k", "type": "date", "allowed_values": ["yesterday"]}, "allowed_values[0]"),
        ({"key": "k", "allowed_values": "a"}, "allowed_values"),
        ({"key": "k", "enforcement": "block"}, "enforcement"),
        ({"key": "k", "required": "yes"}, "required"),
        ({"key": "k", "description": 3}, "description"),
        ({"key": "k", "colour": "red"}, "colour"),
        ({"key": ""}, "key"),
        ({"key": "valohai.tags"}, "key"),
        ({"key": "other"}, "key"),  # not the URL's key
        ({"key": "k", "display_name": "a\x00b"}, "display_name"),
    ],
)
def test_a_bad_definition_names_the_field(body: Any, field: str) -> None:
    with pytest.raises(BadDefinition) as caught:
        parse(body, "k" if isinstance(body, dict) and body.get("key") == "other" else None)
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")
    assert pickle.loads(pickle.dumps(caught.value)).field == field  # survives Celery


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("string", ["", "x"], [1, True, [], {}]),
        ("number", [1, 1.5, -3], [True, "1", [], float("nan")]),
        ("integer", [1, 2.0, -7], [1.5, False, "3"]),
        ("boolean", [True, False], [0, 1, "true"]),
        ("object", [{}, {"a": 1}], [[], "x"]),
        ("array", [[], [1]], [{}, "x"]),
        (
            "date",
            ["2026-01-15", "2026-01-15T08:00:00Z", "2026-01-15T08:00:00+02:00"],
            ["15.1.2026", 20260115],
        ),
    ],
)
def test_types(kind: str, good: list[Any], bad: list[Any]) -> None:
    d = Definition("k", type=kind)
    assert all(check(d, v) == [] for v in good)
    for value in bad:
        assert check(d, value) == [Violation("k", "type", value)], value


def test_allowed_values_and_null() -> None:
    d = parse({"key": "n", "type": "number", "allowed_values": [1, 2.5]})
    assert check(d, 1.0) == [] and check(d, 2.5) == []
    assert [v.rule for v in check(d, 3)] == ["allowed_values"]
    assert [v.rule for v in check(d, "1")] == ["type"]  # the type first, and only it
    assert check(d, None) == []  # a delete breaks nothing but `required`
    free = parse({"key": "tag", "allowed_values": [1, "x", True]})
    assert check(free, 1.0) == [] and check(free, "x") == [] and check(free, True) == []
    assert [v.rule for v in check(free, False)] == ["allowed_values"]
    assert [v.rule for v in check(free, {"a": 1})] == ["allowed_values"]
    (broke,) = check(d, 3)
    assert "'n'" in broke.reason() and "allowed_values" in broke.reason()


def test_a_whole_set_by_scope_with_required_on_completion() -> None:
    defs = {
        "count": parse({"key": "count", "type": "integer", "scopes": ["version"], "required": True}),
        "camera": parse({"key": "camera", "allowed_values": ["top"], "scopes": ["datum"]}),
    }
    props = {"camera": "side", "free": 1}
    assert violations(defs, "version", props, complete=False) == []
    assert violations(defs, "version", props, complete=True) == [Violation("count", "required")]
    assert violations(defs, "version", {"count": "x"}, complete=True) == [Violation("count", "type", "x")]
    assert violations(defs, "datum", props, complete=True) == [Violation("camera", "allowed_values", "side")]
    assert violations(defs, "dataset", props, complete=True) == []
    assert Violation("count", "required").as_json() == {"key": "count", "rule": "required", "value": None}


def test_rejected_counts_only_reject_definitions_of_the_scope() -> None:
    defs = {
        "a": parse({"key": "a", "type": "string", "enforcement": "reject"}),
        "b": parse({"key": "b", "type": "string"}),
        "c": parse({"key": "c", "type": "string", "enforcement": "reject", "scopes": ["datum"]}),
    }
    found = rejected(defs, "version", {"a": 1, "b": 1, "c": 1, "d": 1})
    assert [(v.key, v.rule) for v in found] == [("a", "type")]
    assert rejected(defs, "version", {"a": None}) == []  # deleting is always allowed


def test_a_value_listed_twice_is_kept_once() -> None:
    d = parse({"key": "k", "type": "integer", "allowed_values": [1, {"value": 1.0, "description": "x"}, 2]})
    assert [a.value for a in d.allowed_values] == [1, 2]
