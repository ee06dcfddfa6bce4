"""Pure core: the shallow merge, with null deletes, against the oracle fold."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import fold
from worker.merge import Change, merge, same_json

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
change_sets = st.lists(st.dictionaries(st.sampled_from("abcde"), values, max_size=4), max_size=8)


def test_a_value_of_another_json_type_is_a_change_at_any_depth() -> None:
    """Python's `1 == True == 1.0` must not hide a change from 1 to true, even inside objects."""
    current = {"a": 1, "b": {"x": 1}, "c": [0], "d": 2.5}
    new, changes = merge(current, {"a": True, "b": {"x": 1.0}, "c": [False], "d": 2.5})
    assert [c.key for c in changes] == ["a", "b", "c"]
    assert new["a"] is True and new["b"] == {"x": 1.0} and new["c"][0] is False
    assert same_json({"x": [1, {"y": "z"}]}, {"x": [1, {"y": "z"}]})
    assert same_json({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not same_json({"x": [1]}, {"x": [1.0]})
    assert same_json(2**70, 2**70) and same_json({"big": 2**70}, {"big": 2**70})


def test_set_replace_delete() -> None:
    new, changes = merge({"a": 1, "b": {"x": 1}}, {"a": 2, "b": {"y": 2}, "c": None, "d": True})
    assert new == {"a": 2, "b": {"y": 2}, "d": True}
    assert changes == [Change("a", 1, 2), Change("b", {"x": 1}, {"y": 2}), Change("d", None, True)]


def test_type_changes_count_as_changes() -> None:
    _, changes = merge({"a": 1, "b": 0}, {"a": True, "b": 0.0})
    assert [c.key for c in changes] == ["a", "b"]


@given(change_sets)
def test_merge_equals_the_oracle(sets: list[dict[str, Any]]) -> None:
    state: dict[str, Any] = {}
    for change in sets:
        state, _ = merge(state, change)
    assert state == fold(sets)
