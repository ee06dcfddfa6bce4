"""Pure core: the property filter language — parsing, errors, rendering and the reference semantics."""

from __future__ import annotations

import contextlib
import pickle
import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from worker.errors import InvalidEntry
from worker.query import (
    MAX_DEPTH,
    MAX_LENGTH,
    And,
    Compare,
    CompareOp,
    Exists,
    FilterError,
    In,
    Key,
    Like,
    Node,
    Not,
    Or,
    Value,
    keys_of,
    like,
    matches,
    parse,
    render,
)


def k(*path: str) -> Key:
    return Key(path)


def check(text: str, properties: dict[str, Any]) -> bool:
    return matches(parse(text), properties)


def error(text: str) -> FilterError:
    with pytest.raises(FilterError) as caught:
        parse(text)
    return caught.value


# --- examples from the reference -------------------------------------------------------------


def test_equality_on_a_string() -> None:
    assert parse('domain = "manufacturing"') == Compare(k("domain"), "=", "manufacturing")
    assert check('domain = "manufacturing"', {"domain": "manufacturing"})
    assert not check('domain = "manufacturing"', {"domain": "retail"})


def test_and_with_like() -> None:
    text = 'machine = "press-04" and material like "stainless%"'
    assert parse(text) == And((Compare(k("machine"), "=", "press-04"), Like(k("material"), "stainless%")))
    assert check(text, {"machine": "press-04", "material": "stainless steel 304"})
    assert not check(text, {"machine": "press-04", "material": "Stainless steel"})
    assert not check(text, {"machine": "press-05", "material": "stainless"})


def test_number_comparison() -> None:
    assert check("defect_rate < 0.01", {"defect_rate": 0.005})
    assert check("defect_rate < 0.01", {"defect_rate": 0})
    assert not check("defect_rate < 0.01", {"defect_rate": 0.01})


def test_numbers_never_match_strings() -> None:
    assert not check("sample_count > 4000", {"sample_count": "4700"})
    assert check("sample_count > 4000", {"sample_count": 4700})
    assert check("sample_count >= 4700.0", {"sample_count": 4700})
    assert not check('sample_count = "4700"', {"sample_count": 4700})


def test_exists() -> None:
    assert check("exists preprocessing_version", {"preprocessing_version": None})
    assert check("exists preprocessing_version", {"preprocessing_version": {"a": [1]}})
    assert not check("exists preprocessing_version", {"other": 1})
    assert check("exists a.b", {"a": {"b": []}})


def test_nested_keys() -> None:
    assert parse("a.b.c = 1") == Compare(k("a", "b", "c"), "=", 1)
    assert check("a.b.c = 1", {"a": {"b": {"c": 1}}})
    assert not check("a.b.c = 1", {"a": {"b": 1}})
    assert not check("a.b.c = 1", {"a": {"b": [{"c": 1}]}})
    assert not check("a.b.c = 1", {"a.b.c": 1})


def test_backticked_key_is_one_segment() -> None:
    text = '`valohai.last-used` < "2026-06-01"'
    assert parse(text) == Compare(k("valohai.last-used"), "<", "2026-06-01")
    assert check(text, {"valohai.last-used": "2026-05-31T23:59:59"})
    assert not check(text, {"valohai": {"last-used": "2026-05-01"}})
    assert parse("a.`b c`.`in` = 1") == Compare(k("a", "b c", "in"), "=", 1)
    assert parse("`` = 1") == Compare(k(""), "=", 1)


def test_in() -> None:
    text = 'shift in ("night", "day")'
    assert parse(text) == In(k("shift"), ("night", "day"))
    assert check(text, {"shift": "day"})
    assert not check(text, {"shift": "evening"})
    assert not check(text, {})
    assert check("n in (1, true)", {"n": 1.0})
    assert not check("n in (2, true)", {"n": 1})
    assert check("n in (2, true)", {"n": True})


def test_not_includes_missing_keys_but_not_equals_does_not() -> None:
    assert check('not (shift = "night")', {})
    assert not check('not (shift = "night")', {"shift": "night"})
    assert not check("x != 5", {})
    assert not check("x != 5", {"x": "5"})
    assert not check("x != 5", {"x": None})
    assert check("x != 5", {"x": 6})
    assert not check("x != 5", {"x": 5.0})


def test_booleans_are_not_numbers() -> None:
    assert parse("flag = true") == Compare(k("flag"), "=", True)
    assert check("flag = true", {"flag": True})
    assert not check("flag = true", {"flag": 1})
    assert not check("flag = 1", {"flag": True})
    assert not check("flag != 0", {"flag": False})
    assert not check("flag > 0", {"flag": True})
    assert check("flag != FALSE", {"flag": True})


def test_ast_equality_keeps_bool_and_number_apart() -> None:
    assert Compare(k("a"), "=", True) != Compare(k("a"), "=", 1)
    assert In(k("a"), (1,)) != In(k("a"), (True,))
    assert len({Compare(k("a"), "=", True), Compare(k("a"), "=", 1), Compare(k("a"), "=", 1.0)}) == 3


def test_string_escapes() -> None:
    node = parse(r'name = "say \"hi\" \\ bye"')
    assert node == Compare(k("name"), "=", 'say "hi" \\ bye')
    assert render(node) == r'name = "say \"hi\" \\ bye"'


def test_keywords_are_case_insensitive() -> None:
    assert parse("A = 1 AND b = 2") == And((Compare(k("A"), "=", 1), Compare(k("b"), "=", 2)))
    assert parse('NoT a iLiKe "x" Or EXISTS b') == Or((Not(Like(k("a"), "x", True)), Exists(k("b"))))
    assert parse("a In (TRUE)") == In(k("a"), (True,))


def test_precedence() -> None:
    a, b, c = (Compare(k(name), "=", 1) for name in "abc")
    assert parse("a = 1 or b = 1 and c = 1") == Or((a, And((b, c))))
    assert parse("a = 1 and b = 1 or c = 1") == Or((And((a, b)), c))
    assert parse("not a = 1 and b = 1") == And((Not(a), b))
    assert parse("not (a = 1 and b = 1)") == Not(And((a, b)))
    assert parse("(a = 1 or b = 1) and c = 1") == And((Or((a, b)), c))
    assert parse("a = 1 or b = 1 or c = 1") == Or((a, b, c))
    assert parse("(a = 1 or b = 1) or c = 1") == Or((Or((a, b)), c))
    props = {"a": 1, "b": 2, "c": 2}
    assert check("a = 1 or b = 1 and c = 1", props)
    assert not check("(a = 1 or b = 1) and c = 1", props)


def test_ilike() -> None:
    assert check('m ilike "STAIN%"', {"m": "Stainless"})
    assert not check('m like "STAIN%"', {"m": "Stainless"})
    assert check('m ilike "straße"', {"m": "STRAßE"})
    assert not check('m ilike "1%"', {"m": 12})


def test_like_wildcards() -> None:
    assert like("abc", "a_c")
    assert like("abc", "%")
    assert like("", "%")
    assert not like("", "_")
    assert like("a%c", "a%c")
    assert like("a.c", "a.c") and not like("abc", "a.c")
    assert not like("ab", "a_c")
    assert like("mississippi", "%iss%ppi")


def test_whitespace_and_numbers() -> None:
    assert parse("  a>=-1.5e3\n\tand\rb<2E+2  ") == And(
        (Compare(k("a"), ">=", -1500.0), Compare(k("b"), "<", 200.0))
    )
    assert parse("a = 7") == Compare(k("a"), "=", 7)
    assert isinstance(Compare(k("a"), "=", 7).value, int)
    assert check("a = 7", {"a": 7.0})


def test_keys_of() -> None:
    node = parse('a = 1 and (not exists b.c or d in (1) or e like "x")')
    assert keys_of(node) == {k("a"), k("b", "c"), k("d"), k("e")}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "position", "expected"),
    [
        ("sample_count >", 14, "a literal"),
        ('a = "unterminated', 4, "'\"'"),
        ("a = 1 b = 2", 6, "end of filter"),
        ("a < true", 2, "= or !="),
        ('a = "\\q"', 5, "'\\\"' or '\\\\'"),
        ('"\\q"', 1, "'\\\"' or '\\\\'"),
        ("(a = 1", 6, "')'"),
        ("a = 1)", 5, "end of filter"),
        ("((a = 1)", 8, "')'"),
        ("", 0, "a key"),
        ("   ", 3, "a key"),
        ("a", 1, "a comparison operator"),
        ("a = 1 and", 9, "a key"),
        ("and = 1", 0, "a key"),
        ("exists", 6, "a key"),
        ("a in (1, 2", 10, "',' or ')'"),
        ("a in 1", 5, "'('"),
        ("a like 1", 7, "a string"),
        ("a = -", 4, "a literal"),
        ("a = 1e400", 4, "a finite number"),
        ("a.or = 1", 2, "a key segment"),
        ("a. = 1", 2, "a key segment"),
        ("`a = 1", 0, "'`'"),
        ("a = 1 $", 6, "end of filter"),
        ("1a = 1", 0, "a key"),
    ],
)
def test_error_positions(text: str, position: int, expected: str) -> None:
    err = error(text)
    assert (err.position, err.expected) == (position, expected)
    assert str(err).startswith(f"filter error at position {position}: ")


def test_error_message() -> None:
    assert str(error("a = 1 and and")) == "filter error at position 10: expected a key, found 'and'"
    assert str(error("a = and")) == "filter error at position 4: expected a literal, found 'and'"
    assert "booleans only support = and !=" in str(error("a >= false"))
    assert "empty filter" in str(error(""))


def test_error_is_invalid_entry_and_picklable() -> None:
    err = error("sample_count >")
    assert isinstance(err, InvalidEntry)
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, FilterError)
    assert (copy.position, copy.expected, str(copy)) == (err.position, err.expected, str(err))


def test_nesting_limit() -> None:
    ok = "(" * MAX_DEPTH + "a = 1" + ")" * MAX_DEPTH
    assert parse(ok) == Compare(k("a"), "=", 1)
    deep = "(" * (MAX_DEPTH + 1) + "a = 1" + ")" * (MAX_DEPTH + 1)
    assert "nested too deeply" in str(error(deep))
    assert error(deep).position == MAX_DEPTH
    assert "nested too deeply" in str(error("not " * (MAX_DEPTH + 1) + "a = 1"))
    assert "nested too deeply" in str(error("(not " * 40 + "a = 1" + ")" * 40))
    assert "nested too deeply" in str(error("(" * MAX_LENGTH))


def test_length_limit() -> None:
    long = "a = 1" + " " * (MAX_LENGTH - 5)
    assert parse(long) == Compare(k("a"), "=", 1)
    err = error(long + " ")
    assert err.position == MAX_LENGTH and "too long" in str(err)


def test_ast_rejects_what_the_language_cannot_say() -> None:
    with pytest.raises(ValueError):
        Key(())
    with pytest.raises(ValueError):
        Key(("a`b",))
    with pytest.raises(ValueError):
        Compare(k("a"), "<", True)
    with pytest.raises(ValueError):
        Compare(k("a"), "=", float("nan"))
    with pytest.raises(ValueError):
        In(k("a"), ())
    with pytest.raises(ValueError):
        And((Exists(k("a")),))


# --- properties ------------------------------------------------------------------------------

TOKENS = [
    "a", "b.c", "`x.y`", "`", "and", "OR", "not", "in", "like", "ilike", "exists", "true", "False",
    "(", ")", ",", "=", "!=", "<", "<=", ">", ">=", "!", '"s"', '"', "\\", '"\\"', "1", "-2.5e3", "-",
    "1e999", ".", "..", " ", "\n", "é", "%",
]  # fmt: skip


@given(st.text())
def test_parse_only_raises_filter_error_on_any_text(text: str) -> None:
    with contextlib.suppress(FilterError):
        parse(text)


@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_parse_only_raises_filter_error_on_token_soup(text: str) -> None:
    try:
        node = parse(text)
    except FilterError:
        return
    assert parse(render(node)) == node


@given(st.integers(0, 3000), st.sampled_from(["(", "not ", "(not ", "((a=1)"]))
def test_parse_never_overflows_the_stack(repeat: int, unit: str) -> None:
    with contextlib.suppress(FilterError):
        parse(unit * repeat)


segments = st.one_of(
    st.sampled_from(["a", "b", "c", "x-y", "_1", "and", "IN", "valohai.last-used", "", "a b", "é"]),
    st.text(st.characters(exclude_characters="`"), max_size=4),
)
keys = st.lists(segments, min_size=1, max_size=3).map(lambda path: Key(tuple(path)))
numbers = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))
strings = st.one_of(st.sampled_from(["", "x", "a%", "_b", 'q"\\']), st.text(max_size=6))
literals: st.SearchStrategy[Value] = st.one_of(strings, numbers, st.booleans())
ordering_ops: st.SearchStrategy[CompareOp] = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])


@st.composite
def compares(draw: st.DrawFn) -> Compare:
    value = draw(literals)
    op: CompareOp = draw(st.sampled_from(["=", "!="])) if isinstance(value, bool) else draw(ordering_ops)
    return Compare(draw(keys), op, value)


leaves: st.SearchStrategy[Node] = st.one_of(
    compares(),
    st.builds(In, keys, st.lists(literals, min_size=1, max_size=3).map(tuple)),
    st.builds(Like, keys, strings, st.booleans()),
    st.builds(Exists, keys),
)
nodes: st.SearchStrategy[Node] = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda items: And(tuple(items))),
        st.lists(children, min_size=2, max_size=3).map(lambda items: Or(tuple(items))),
        st.builds(Not, children),
    ),
    max_leaves=8,
)


def depth(node: Node) -> int:
    """An upper bound on the nesting render() produces: every level may add parentheses."""
    match node:
        case And(items) | Or(items):
            return 1 + max(depth(item) for item in items)
        case Not(expr):
            return 1 + depth(expr)
        case _:
            return 0


@given(nodes)
def test_render_then_parse_is_identity(node: Node) -> None:
    text = render(node)
    assume(depth(node) <= MAX_DEPTH and len(text) <= MAX_LENGTH)
    assert parse(text) == node
    assert render(parse(text)) == text


@given(nodes, st.data())
def test_parse_only_raises_filter_error_on_near_misses(node: Node, data: st.DataObject) -> None:
    """Valid filters with one slice cut out or one token spliced in: every error path, still typed."""
    text = render(node)
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 3)))
    mutated = text[:start] + data.draw(st.sampled_from(["", *TOKENS])) + text[end:]
    with contextlib.suppress(FilterError):
        parse(mutated)


json_scalars = st.one_of(
    st.none(), st.booleans(), numbers, strings, st.sampled_from([0, 1, 1.0, "x", "a%", True, False])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "c", ""]), children, max_size=3),
    ),
    max_leaves=10,
)
property_sets = st.dictionaries(segments, json_values, max_size=5)


@given(nodes, property_sets)
def test_matches_never_raises_and_obeys_its_laws(node: Node, properties: dict[str, Any]) -> None:
    result = matches(node, properties)
    assert isinstance(result, bool)
    assert matches(Not(node), properties) is not result
    for key in keys_of(node):
        assert matches(Exists(key), properties) or not matches(Compare(key, "=", 0), properties)


MISSING = object()


def lookup(properties: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The oracle's key walk, written independently of worker.query."""
    current: Any = properties
    for segment in path:
        if type(current) is not dict or segment not in current:
            return MISSING
        current = current[segment]
    return current


def kind(value: Any) -> str:
    """The JSON type of a value: booleans are not numbers."""
    if type(value) is bool:
        return "boolean"
    if type(value) in (int, float):
        return "number"
    return "string" if type(value) is str else "other"


@given(compares(), property_sets)
def test_compare_agrees_with_the_oracle(node: Compare, properties: dict[str, Any]) -> None:
    stored = lookup(properties, node.key.path)
    if kind(stored) != kind(node.value):
        expected = False
    else:
        expected = {
            "=": stored == node.value,
            "!=": stored != node.value,
            "<": stored < node.value,
            "<=": stored <= node.value,
            ">": stored > node.value,
            ">=": stored >= node.value,
        }[node.op]
    assert matches(node, properties) is expected


@given(keys, st.lists(literals, min_size=1, max_size=3), property_sets)
def test_in_is_any_equal(key: Key, values: list[Value], properties: dict[str, Any]) -> None:
    expected = any(matches(Compare(key, "=", v), properties) for v in values)
    assert matches(In(key, tuple(values)), properties) is expected


def like_oracle(value: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@given(st.text("ab%_\n", max_size=8), st.text("ab\n", max_size=8))
def test_like_agrees_with_a_regex(pattern: str, value: str) -> None:
    assert like(value, pattern) is like_oracle(value, pattern)


def test_like_is_not_exponential() -> None:
    assert not like("a" * 3000, "%a" * 1000 + "b")


@pytest.mark.parametrize("text", ["n > " + "9" * 400, "n < -" + "1" * 310, "n = 1e309"])
def test_numbers_beyond_a_float_are_errors_at_their_position(text: str) -> None:
    # Numbers are stored and compared as 64-bit floats: a literal no float holds is the user's
    # error (400), not an OverflowError in the search (it was a 500).
    with pytest.raises(FilterError) as caught:
        parse(text)
    assert caught.value.position == 4 and caught.value.expected == "a finite number"
    assert parse("n > " + "9" * 300) is not None  # big, but a float holds it
