"""Compile a filter (worker.query AST) to SQL over the typed property index, and order by a key.

Every value reaches SQL as a bound parameter; the filter's text never does. Each atom becomes an
EXISTS over `property_index` for (owner, path, type), so `not` and missing keys mean exactly what
the plain-Python evaluator `worker.query.matches` says, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, exists, not_, or_, select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import KeyedColumnElement

from ..query import And, Compare, Exists, FilterError, In, Key, Like, Node, Not, Or, Value, parse
from .index import STR_KEY_LENGTH, lower, path_text
from .models import PropertyIndex

OwnerKind = Literal["dataset", "version"]
_OPS = {
    "=": lambda col, v: col == v,
    "!=": lambda col, v: col != v,
    "<": lambda col, v: col < v,
    "<=": lambda col, v: col <= v,
    ">": lambda col, v: col > v,
    ">=": lambda col, v: col >= v,
}


class Compiler:
    """Builds SQL conditions for one owner kind, one dialect."""

    def __init__(self, owner_kind: OwnerKind, owner_id: KeyedColumnElement[Any], dialect: str) -> None:
        self.owner_kind = owner_kind
        self.owner_id = owner_id
        self.dialect = dialect

    def condition(self, node: Node) -> ColumnElement[bool]:
        match node:
            case Compare(key, op, value):
                return self._atom(key, _typed_compare(op, value, self.dialect))
            case In(key, values):
                return or_(*(self._atom(key, _typed_compare("=", v, self.dialect)) for v in values))
            case Like(key, pattern, insensitive):
                column = PropertyIndex.str_lower if insensitive else PropertyIndex.str_value
                text = lower(pattern) if insensitive else pattern
                return self._atom(key, and_(PropertyIndex.vtype == "string", self._like(column, text)))
            case Exists(key):
                return self._atom(key, None)
            case And(items):
                return and_(*(self.condition(i) for i in items))
            case Or(items):
                return or_(*(self.condition(i) for i in items))
            case Not(expr):
                return not_(self.condition(expr))
        raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover

    def _atom(self, key: Key, condition: ColumnElement[bool] | None) -> ColumnElement[bool]:
        where = [
            PropertyIndex.owner_kind == self.owner_kind,
            PropertyIndex.owner_id == self.owner_id,
            PropertyIndex.path == path_text(key.path),
        ]
        if condition is not None:
            where.append(condition)
        return exists(select(PropertyIndex.id).where(*where))

    def _like(self, column: Any, pattern: str) -> ColumnElement[bool]:
        # Our LIKE has no escape character and is case-sensitive. SQLite's LIKE ignores ASCII case,
        # so SQLite gets the equivalent GLOB; PostgreSQL's LIKE treats "\" as an escape unless told.
        condition: ColumnElement[bool]
        if self.dialect == "sqlite":
            condition = column.op("GLOB")(_glob(pattern))
        else:
            condition = column.like(pattern.replace("\\", "\\\\"), escape="\\")
        return condition


def _typed_compare(op: str, value: Value, dialect: str) -> ColumnElement[bool]:
    if isinstance(value, bool):
        return and_(PropertyIndex.vtype == "boolean", _OPS[op](PropertyIndex.bool_value, value))
    if isinstance(value, int | float):
        return and_(PropertyIndex.vtype == "number", _OPS[op](PropertyIndex.num, float(value)))
    column: Any = PropertyIndex.str_value
    if dialect == "postgresql":
        column = column.collate("C")  # code-point order, as in Python (and SQLite's BINARY)
    if op == "=":
        # The indexed prefix narrows the search; the full value decides.
        prefix = PropertyIndex.str_key == value[:STR_KEY_LENGTH]
        return and_(PropertyIndex.vtype == "string", prefix, PropertyIndex.str_value == value)
    return and_(PropertyIndex.vtype == "string", _OPS[op](column, value))


def _glob(pattern: str) -> str:
    out = []
    for char in pattern:
        if char == "%":
            out.append("*")
        elif char == "_":
            out.append("?")
        elif char in "*?[":
            out.append(f"[{char}]")
        else:
            out.append(char)
    return "".join(out)


def filter_condition(
    text: str, owner_kind: OwnerKind, owner_id: KeyedColumnElement[Any], dialect: str
) -> ColumnElement[bool]:
    """Parse a filter and compile it; FilterError (a 400) if it does not parse."""
    return Compiler(owner_kind, owner_id, dialect).condition(parse(text))


def ordering_key(text: str) -> tuple[Key, bool]:
    """`key` or `-key` (the key in the filter language's syntax) → (Key, descending)."""
    descending = text.startswith("-")
    body = text[1:] if descending else text
    try:
        node = parse(f"exists {body}")
    except FilterError as exc:
        raise FilterError(
            exc.position - len("exists ") + int(descending), exc.expected, exc.problem
        ) from None
    if not isinstance(node, Exists):
        raise FilterError(0, "a key", "ordering takes one key, optionally preceded by '-'")
    return node.key, descending


def order_by(
    query: Any,
    owner_kind: OwnerKind,
    owner_id: KeyedColumnElement[Any],
    key: Key,
    descending: bool,
    dialect: str,
) -> Any:
    """Sort by a property value, typed: numbers, then strings, then booleans; targets without it last."""
    pi = aliased(PropertyIndex)
    query = query.outerjoin(
        pi, and_(pi.owner_kind == owner_kind, pi.owner_id == owner_id, pi.path == path_text(key.path))
    )
    rank = case(
        (pi.id.is_(None), 9),
        (pi.vtype == "number", 0),
        (pi.vtype == "string", 1),
        (pi.vtype == "boolean", 2),
        else_=3,
    )
    text: Any = pi.str_value.collate("C") if dialect == "postgresql" else pi.str_value
    values = [pi.num, text, pi.bool_value]
    ordered = [v.desc().nulls_last() if descending else v.asc().nulls_last() for v in values]
    return query.order_by(rank, *ordered, owner_id)
