"""Pure core: the property filter language — parser, AST, renderer and the reference evaluator.

Users search datasets and dataset versions by their properties (JSON objects). A filter is text
such as ``machine = "press-04" and material like "stainless%"``. `parse` turns it into a small,
typed AST; `matches` evaluates that AST against one property dict and *defines* the semantics
(the SQL compiler must agree with it); `render` turns an AST back into text that parses to an
equal AST. No database, no IO.

Grammar (EBNF)::

    expr       = or_expr ;
    or_expr    = and_expr , { "or" , and_expr } ;
    and_expr   = not_expr , { "and" , not_expr } ;
    not_expr   = "not" , not_expr | primary ;
    primary    = "(" , expr , ")"
               | "exists" , key
               | "violates" , [ key ]                    (* the owner breaks a definition *)
               | key , comp_op , literal
               | key , "in" , "(" , literal , { "," , literal } , ")"
               | key , ( "like" | "ilike" ) , string ;
    comp_op    = "=" | "!=" | "<" | "<=" | ">" | ">=" ;
    key        = segment , { "." , segment } ;          (* no whitespace inside a key *)
    segment    = ident | backticked ;
    ident      = letter_ , { letter_ | digit | "-" } ;  (* ASCII only; not a keyword *)
    letter_    = "A".."Z" | "a".."z" | "_" ;
    backticked = "`" , { any char - "`" } , "`" ;      (* literal, dots included *)
    literal    = string | number | "true" | "false" ;
    string     = '"' , { any char - ( '"' | "\\" ) | '\\"' | "\\\\" } , '"' ;
    number     = [ "-" ] , digits , [ "." , digits ] , [ ( "e" | "E" ) , [ "+" | "-" ] , digits ] ;
    digits     = digit , { digit } ;                    (* ASCII 0-9 *)

Keywords (``and or not in like ilike exists violates true false``) are case-insensitive and are never bare
key segments, not even after a dot: write ```in``` or ``a.`or``` instead. A backticked segment is
one segment whatever it holds, so ```valohai.last-used``` is the single key ``valohai.last-used``;
a key containing a backtick cannot be written. Whitespace (ASCII: space, tab, CR, LF, FF, VT)
between tokens is free. Precedence, tightest first: ``not``, ``and``, ``or``; ``not a = 1`` is
``not (a = 1)``. Integer literals stay ``int`` and the others become ``float``; both compare
numerically.

Semantics (see `matches`):

* A key is resolved by walking nested objects; a missing segment, or walking into a non-object,
  means the key does not exist.
* Comparisons are typed: a number literal only meets JSON numbers (never booleans), a string only
  strings, a boolean only booleans. On a type mismatch, a missing key, or an object/array/null
  value every comparison is false — ``!=`` included. So ``x != 5`` needs x to be a number, and
  ``not (x = 5)`` is how to include documents without x.
* Booleans support only ``=`` and ``!=`` (anything else is a parse error).
* Strings order by code point (Python's ``str`` ordering); SQL needs a binary collation
  (``COLLATE "C"`` on PostgreSQL) to agree.
* ``in`` is true when ``=`` holds for any listed literal.
* ``like`` / ``ilike`` apply to strings only: ``%`` is any run of characters, ``_`` exactly one,
  there is no escape character. ``ilike`` applies ``str.lower()`` to both sides (simple ASCII and
  Unicode lowercasing, not casefold; the SQL side should use ``lower()`` to agree).
* ``exists k`` holds when k resolves, whatever the value (objects, arrays and null included).
* ``violates`` holds when the owner carries any violation of a property definition (its
  `violations`, worker/definitions.py); ``violates k`` when one of them is of the top-level key k.

Errors: `parse` raises only `FilterError`, carrying the 0-based character ``position`` and what
was ``expected``. Filters longer than `MAX_LENGTH` characters or nested (parentheses and ``not``)
deeper than `MAX_DEPTH` levels are rejected, so parsing is bounded in time and stack.
"""

from __future__ import annotations

import math
import operator
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias, assert_never

from .errors import InvalidEntry
from .limits import fits_index, path_text

__all__ = [
    "KEYWORDS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "And",
    "Compare",
    "CompareOp",
    "Exists",
    "FilterError",
    "In",
    "Key",
    "Like",
    "Node",
    "Not",
    "Or",
    "Value",
    "Violates",
    "keys_of",
    "like",
    "matches",
    "parse",
    "render",
]

MAX_LENGTH = 4096
MAX_DEPTH = 64
KEYWORDS = frozenset({"and", "or", "not", "in", "like", "ilike", "exists", "violates", "true", "false"})

CompareOp: TypeAlias = Literal["=", "!=", "<", "<=", ">", ">="]
Value: TypeAlias = str | int | float | bool

_COMPARE_OPS: dict[str, CompareOp] = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WHITESPACE = " \t\r\n\f\v"


class FilterError(InvalidEntry):
    """A filter that does not parse: where (0-based character offset), what was expected, and why."""

    def __init__(self, position: int, expected: str, problem: str) -> None:
        super().__init__(f"filter error at position {position}: {problem}")
        self.position = position
        self.expected = expected
        self.problem = problem

    def __reduce__(self) -> tuple[type[FilterError], tuple[int, str, str]]:
        return (FilterError, (self.position, self.expected, self.problem))


# --- AST -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A property path: ``a.b.c`` is ``("a", "b", "c")``, ```valohai.last-used``` is one segment."""

    path: tuple[str, ...]

    def __post_init__(self) -> None:
        # Every Key must be writable in the language, so render() always succeeds.
        if not self.path:
            raise ValueError("a key needs at least one segment")
        if any("`" in segment for segment in self.path):
            raise ValueError(f"key segments cannot contain a backtick: {self.path!r}")


def _typed(value: Value) -> tuple[type, Value]:
    # `True == 1` and `1 == 1.0` in Python, but they are different literals (and compile to
    # different SQL), so AST equality and hashing compare the exact type too.
    return (type(value), value)


def _check_value(value: object) -> None:
    if not isinstance(value, str | int | float):
        raise ValueError(f"a literal must be a str, int, float or bool, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("number literals must be finite")


@dataclass(frozen=True, eq=False)
class Compare:
    """``key op value``; true only when the stored value has the literal's type (see `matches`)."""

    key: Key
    op: CompareOp
    value: Value

    def __post_init__(self) -> None:
        if self.op not in _COMPARE_OPS:
            raise ValueError(f"unknown comparison operator {self.op!r}")
        _check_value(self.value)
        if isinstance(self.value, bool) and self.op not in ("=", "!="):
            raise ValueError("booleans only support = and !=")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Compare):
            return NotImplemented
        return (self.key, self.op, _typed(self.value)) == (other.key, other.op, _typed(other.value))

    def __hash__(self) -> int:
        return hash((Compare, self.key, self.op, _typed(self.value)))


@dataclass(frozen=True, eq=False)
class In:
    """``key in (v1, v2, ...)``: `Compare` ``=`` against any of the values."""

    key: Key
    values: tuple[Value, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("'in' needs at least one value")
        for value in self.values:
            _check_value(value)

    def _typed_values(self) -> tuple[tuple[type, Value], ...]:
        return tuple(_typed(v) for v in self.values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, In):
            return NotImplemented
        return (self.key, self._typed_values()) == (other.key, other._typed_values())

    def __hash__(self) -> int:
        return hash((In, self.key, self._typed_values()))


@dataclass(frozen=True)
class Like:
    """``key like pattern`` (or ``ilike`` when `case_insensitive`); strings only."""

    key: Key
    pattern: str
    case_insensitive: bool = False


@dataclass(frozen=True)
class Exists:
    """``exists key``: the key resolves, whatever its value."""

    key: Key


@dataclass(frozen=True)
class Violates:
    """``violates`` or ``violates key``: the owner breaks a property definition (of `key`)."""

    key: Key | None = None


@dataclass(frozen=True)
class And:
    """All of `items` (two or more; a chain ``a and b and c`` is one node)."""

    items: tuple[Node, ...]

    def __post_init__(self) -> None:
        # A one-item And would render as its item and parse back as something else.
        if len(self.items) < 2:
            raise ValueError("And needs at least two items")


@dataclass(frozen=True)
class Or:
    """Any of `items` (two or more; a chain ``a or b or c`` is one node)."""

    items: tuple[Node, ...]

    def __post_init__(self) -> None:
        if len(self.items) < 2:
            raise ValueError("Or needs at least two items")


@dataclass(frozen=True)
class Not:
    """The negation of `expr` (which includes documents where its keys are missing)."""

    expr: Node


Node: TypeAlias = Compare | In | Like | Exists | Violates | And | Or | Not


# --- lexer -----------------------------------------------------------------------------------


_Kind: TypeAlias = Literal["key", "keyword", "op", "string", "number", "(", ")", ",", "junk", "end"]
_PUNCTUATION: dict[str, _Kind] = {"(": "(", ")": ")", ",": ","}


class _Token(NamedTuple):
    """One token. `value` is the decoded string, the lowercased keyword, or the operator."""

    kind: _Kind
    pos: int
    text: str
    value: str = ""
    segments: tuple[str, ...] = ()


def _describe(token: _Token) -> str:
    """How a token appears in an error message."""
    if token.kind == "end":
        return "end of filter"
    text = token.text if len(token.text) <= 30 else token.text[:27] + "..."
    return repr(text)


class _Lexer:
    """Scans on demand, so errors come in text order: the parser only looks one token ahead."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self._peeked: _Token | None = None

    def peek(self) -> _Token:
        if self._peeked is None:
            self._peeked = self._scan()
        return self._peeked

    def take(self) -> _Token:
        token = self.peek()
        self._peeked = None
        return token

    def _scan(self) -> _Token:
        text = self.text
        while self.pos < len(text) and text[self.pos] in _WHITESPACE:
            self.pos += 1
        start = self.pos
        if start >= len(text):
            return _Token("end", start, "")
        char = text[start]
        if char in _PUNCTUATION:
            self.pos += 1
            return _Token(_PUNCTUATION[char], start, char)
        if char in "=<>!":
            return self._operator(start)
        if char == '"':
            return self._string(start)
        if char == "-" or "0" <= char <= "9":
            return self._number(start)
        if char == "`" or _IDENT.match(char):
            return self._key(start)
        self.pos += 1
        return _Token("junk", start, char)

    def _operator(self, start: int) -> _Token:
        two = self.text[start : start + 2]
        op = two if two in _COMPARE_OPS else self.text[start]
        self.pos = start + len(op)
        return _Token("op" if op in _COMPARE_OPS else "junk", start, op, op)

    def _number(self, start: int) -> _Token:
        match = _NUMBER.match(self.text, start)
        if match is None:  # a lone "-"
            self.pos = start + 1
            return _Token("junk", start, "-")
        self.pos = match.end()
        return _Token("number", start, match.group())

    def _string(self, start: int) -> _Token:
        text, i = self.text, start + 1
        chars: list[str] = []
        while i < len(text):
            char = text[i]
            if char == '"':
                self.pos = i + 1
                return _Token("string", start, text[start : i + 1], "".join(chars))
            if char == "\\":
                if i + 1 >= len(text):
                    break
                if text[i + 1] not in '"\\':
                    problem = f'bad escape {text[i : i + 2]!r} in a string; only \\" and \\\\ are allowed'
                    raise FilterError(i, "'\\\"' or '\\\\'", problem)
                i += 1
                char = text[i]
            chars.append(char)
            i += 1
        raise FilterError(start, "'\"'", "unterminated string (no closing '\"')")

    def _key(self, start: int) -> _Token:
        segments: list[str] = []
        bare = True
        while True:
            segment, bare = self._segment(dotted=bool(segments))
            segments.append(segment)
            if self.text[self.pos : self.pos + 1] != ".":
                break
            self.pos += 1
        text = self.text[start : self.pos]
        if len(segments) == 1 and bare and segments[0].lower() in KEYWORDS:
            return _Token("keyword", start, text, segments[0].lower())
        return _Token("key", start, text, segments=tuple(segments))

    def _segment(self, dotted: bool) -> tuple[str, bool]:
        """Scan one key segment at `self.pos`; return it and whether it was bare."""
        start, text = self.pos, self.text
        if text.startswith("`", start):
            close = text.find("`", start + 1)
            if close < 0:
                raise FilterError(start, "'`'", "unterminated backticked key segment (no closing '`')")
            self.pos = close + 1
            return text[start + 1 : close], False
        match = _IDENT.match(text, start)
        if match is None:
            found = "end of filter" if start >= len(text) else repr(text[start])
            raise FilterError(start, "a key segment", f"expected a key segment, found {found}")
        self.pos = match.end()
        segment = match.group()
        # A keyword is fine alone (the caller makes it a keyword token) but not inside a path.
        if segment.lower() in KEYWORDS and (dotted or text.startswith(".", self.pos)):
            problem = f"{segment!r} is a keyword; write it as `{segment}` inside a key"
            raise FilterError(start, "a key segment", problem)
        return segment, True


# --- parser ----------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the grammar in the module docstring; depth is capped by MAX_DEPTH."""

    def __init__(self, text: str) -> None:
        self.lexer = _Lexer(text)
        self.depth = 0

    def fail(self, token: _Token, expected: str) -> FilterError:
        return FilterError(token.pos, expected, f"expected {expected}, found {_describe(token)}")

    def at_keyword(self, word: str) -> bool:
        token = self.lexer.peek()
        return token.kind == "keyword" and token.value == word

    def expect(self, kind: str, expected: str) -> _Token:
        token = self.lexer.peek()
        if token.kind != kind:
            raise self.fail(token, expected)
        return self.lexer.take()

    def enter(self, token: _Token) -> None:
        """Count one level of nesting, so hostile input cannot exhaust the stack."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            problem = f"filter nested too deeply (more than {MAX_DEPTH} levels of parentheses and 'not')"
            raise FilterError(token.pos, f"at most {MAX_DEPTH} levels of nesting", problem)

    def filter(self) -> Node:
        first = self.lexer.peek()
        if first.kind == "end":
            raise FilterError(first.pos, "a key", "empty filter")
        node = self.or_expr()
        self.expect("end", "end of filter")
        return node

    def or_expr(self) -> Node:
        items = [self.and_expr()]
        while self.at_keyword("or"):
            self.lexer.take()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.not_expr()]
        while self.at_keyword("and"):
            self.lexer.take()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Node:
        if not self.at_keyword("not"):
            return self.primary()
        self.enter(self.lexer.take())
        node = Not(self.not_expr())
        self.depth -= 1
        return node

    def primary(self) -> Node:
        token = self.lexer.peek()
        if token.kind == "(":
            self.enter(self.lexer.take())
            node = self.or_expr()
            self.expect(")", "')'")
            self.depth -= 1
            return node
        if self.at_keyword("exists"):
            self.lexer.take()
            return Exists(self.key())
        if self.at_keyword("violates"):
            self.lexer.take()
            return Violates(self.key() if self.lexer.peek().kind == "key" else None)
        return self.condition(self.key())

    def key(self) -> Key:
        return Key(self.expect("key", "a key").segments)

    def condition(self, key: Key) -> Node:
        """What follows a key: a comparison, ``in (...)``, ``like`` or ``ilike``."""
        token = self.lexer.peek()
        if token.kind == "op":
            self.lexer.take()
            value = self.literal()
            if isinstance(value, bool) and token.value not in ("=", "!="):
                raise FilterError(token.pos, "= or !=", "booleans only support = and !=")
            return Compare(key, _COMPARE_OPS[token.value], value)
        if self.at_keyword("in"):
            self.lexer.take()
            return In(key, self.literal_list())
        if self.at_keyword("like") or self.at_keyword("ilike"):
            self.lexer.take()
            pattern = self.expect("string", "a string").value
            return Like(key, pattern, case_insensitive=token.value == "ilike")
        raise self.fail(token, "a comparison operator")

    def literal_list(self) -> tuple[Value, ...]:
        self.expect("(", "'('")
        values = [self.literal()]
        while self.lexer.peek().kind == ",":
            self.lexer.take()
            values.append(self.literal())
        self.expect(")", "',' or ')'")
        return tuple(values)

    def literal(self) -> Value:
        token = self.lexer.peek()
        if token.kind == "string":
            return self.lexer.take().value
        if token.kind == "number":
            return _number(self.lexer.take())
        if self.at_keyword("true") or self.at_keyword("false"):
            return self.lexer.take().value == "true"
        raise self.fail(token, "a literal")


def _number(token: _Token) -> int | float:
    """Integers stay exact; anything with a fraction or exponent is a finite float. Either must
    fit a 64-bit float, which is how numbers are stored and compared: a 400-digit integer is an
    error at its position, not an overflow deep in the search."""
    if not any(c in token.text for c in ".eE"):
        number = int(token.text)  # at most MAX_LENGTH digits, under Python's int-parsing limit
        if abs(number) <= sys.float_info.max:
            return number
        raise FilterError(token.pos, "a finite number", f"number {_describe(token)} is out of range")
    value = float(token.text)
    if not math.isfinite(value):
        raise FilterError(token.pos, "a finite number", f"number {_describe(token)} is out of range")
    return value


def parse(text: str) -> Node:
    """Parse a filter; raises `FilterError` (and nothing else) when it is not valid."""
    if len(text) > MAX_LENGTH:
        problem = f"filter too long ({len(text)} characters; the limit is {MAX_LENGTH})"
        raise FilterError(MAX_LENGTH, f"at most {MAX_LENGTH} characters", problem)
    return _Parser(text).filter()


# --- renderer --------------------------------------------------------------------------------


def _render_segment(segment: str) -> str:
    bare = _IDENT.fullmatch(segment) is not None and segment.lower() not in KEYWORDS
    return segment if bare else f"`{segment}`"


def _render_key(key: Key) -> str:
    return ".".join(_render_segment(s) for s in key.path)


def key_text(key: Key) -> str:
    """A key as the filter language writes it (backticks where a segment needs them)."""
    return _render_key(key)


def _render_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _render_string(value)
    # repr() of a finite float always has a "." or an exponent, so it parses back as a float.
    return repr(value)


def _render_child(node: Node, parent: type[And] | type[Or] | type[Not]) -> str:
    """Render an operand, parenthesised when the parent binds tighter or it would flatten."""
    needs_parens = isinstance(node, Or) or (isinstance(node, And) and parent is not Or)
    text = render(node)
    return f"({text})" if needs_parens else text


def render(node: Node) -> str:
    """Filter text for `node`; ``parse(render(node)) == node`` for any valid AST."""
    match node:
        case Compare(key, op, value):
            return f"{_render_key(key)} {op} {_render_value(value)}"
        case In(key, values):
            return f"{_render_key(key)} in ({', '.join(_render_value(v) for v in values)})"
        case Like(key, pattern, case_insensitive):
            word = "ilike" if case_insensitive else "like"
            return f"{_render_key(key)} {word} {_render_string(pattern)}"
        case Exists(key):
            return f"exists {_render_key(key)}"
        case Violates(key):
            return "violates" if key is None else f"violates {_render_key(key)}"
        case And(items):
            return " and ".join(_render_child(item, And) for item in items)
        case Or(items):
            return " or ".join(_render_child(item, Or) for item in items)
        case Not(expr):
            return "not " + _render_child(expr, Not)
        case _:
            assert_never(node)


# --- evaluator -------------------------------------------------------------------------------

_MISSING: Any = object()

_OPERATORS: dict[CompareOp, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _resolve(key: Key, properties: Mapping[str, Any]) -> Any:
    """The value at `key`, or `_MISSING` when a segment is absent or a parent is not an object."""
    try:
        if not fits_index(path_text(key.path)):
            return _MISSING  # stored, but not searchable by this path (see worker/limits.py)
    except TypeError:
        return _MISSING  # a key that is not valid Unicode (a lone surrogate): none is stored
    current: Any = properties
    for segment in key.path:
        if not isinstance(current, Mapping) or segment not in current:
            return _MISSING
        current = current[segment]
    return current


def _same_type(stored: Any, literal: Value) -> bool:
    """Whether a stored JSON value and a literal may be compared at all."""
    # bool is a subclass of int in Python; JSON keeps them apart, and so do we.
    if isinstance(literal, bool):
        return isinstance(stored, bool)
    if isinstance(literal, int | float):
        return isinstance(stored, int | float) and not isinstance(stored, bool)
    return isinstance(stored, str)


def _compare(stored: Any, op: CompareOp, literal: Value) -> bool:
    return _same_type(stored, literal) and bool(_OPERATORS[op](stored, literal))


def like(value: str, pattern: str) -> bool:
    """SQL LIKE without an escape character: ``%`` is any run, ``_`` exactly one character.

    Greedy two-pointer matching that backs up only to the last ``%``: O(len(value) * len(pattern))
    in the worst case, never the exponential backtracking a translated regex can hit.
    """
    v = p = 0
    star_p, star_v = -1, 0  # position of the last '%' seen, and where its run currently ends
    while v < len(value):
        if p < len(pattern) and pattern[p] == "%":
            star_p, star_v = p, v
            p += 1
        elif p < len(pattern) and (pattern[p] == "_" or pattern[p] == value[v]):
            v += 1
            p += 1
        elif star_p >= 0:
            star_v += 1
            v, p = star_v, star_p + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "%":
        p += 1
    return p == len(pattern)


def _like(stored: Any, node: Like) -> bool:
    if not isinstance(stored, str):
        return False
    if node.case_insensitive:
        return like(stored.lower(), node.pattern.lower())
    return like(stored, node.pattern)


def matches(node: Node, properties: Mapping[str, Any], violations: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Whether a property set (whose owner carries `violations`) satisfies the filter; the
    reference semantics for every backend."""
    match node:
        case Compare(key, op, value):
            return _compare(_resolve(key, properties), op, value)
        case In(key, values):
            stored = _resolve(key, properties)
            return any(_compare(stored, "=", value) for value in values)
        case Like(key):
            return _like(_resolve(key, properties), node)
        case Exists(key):
            return _resolve(key, properties) is not _MISSING
        case Violates(key):
            return any(key is None or key.path == (v.get("key"),) for v in violations)
        case And(items):
            return all(matches(item, properties, violations) for item in items)
        case Or(items):
            return any(matches(item, properties, violations) for item in items)
        case Not(expr):
            return not matches(expr, properties, violations)
        case _:
            assert_never(node)


def keys_of(node: Node) -> set[Key]:
    """Every key the filter mentions."""
    match node:
        case Compare(key) | In(key) | Like(key) | Exists(key):
            return {key}
        case And(items) | Or(items):
            keys: set[Key] = set()
            for item in items:
                keys |= keys_of(item)
            return keys
        case Not(expr):
            return keys_of(expr)
        case Violates():
            return set()  # a definition's key, not a property path the filter reads
        case _:
            assert_never(node)
