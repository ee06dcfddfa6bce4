"""Compile a filter (worker.query AST) to SQL over the typed property index, and order by a key.

Every value reaches SQL as a bound parameter; the filter's text never does. Two ways to evaluate a
filter, both meaning exactly what the plain-Python evaluator `worker.query.matches` says:

* `OwnerSets` (tried first): a filter as sets of owner ids. Each atom (a comparison, `in`,
  `like`, `exists`) is one scan of `property_index` for (owner kind, path, type, value), which
  the (owner_kind, path, num) and (owner_kind, path, str_key) indexes serve; `and` is an
  intersection, `or` a union, `not` a difference. It starts from a small superset of the
  answer — an atom with at most `CAP` owners, found by reading the atoms with growing limits (an
  `and` is bounded by any of its items, an `or` by the union of all of its items) — and decides
  the rest of the filter on those candidates only (the atoms not read in full are probed with
  `owner_id IN (candidates)`). Then the count and the page are read by id. This is what makes a
  selective filter fast whatever the planner's estimates: `shift = "night" and score > 0.999`
  reads the few high scores, never a third of the table.
* `Compiler.condition` (when no part of the filter is selective, e.g. `split = "train"` or
  `not exists x`): each atom becomes an EXISTS over `property_index` for (owner, path, type),
  correlated with the listed table, and the database plans the whole.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, Literal

import orjson
from sqlalchemy import (
    ColumnElement,
    Integer,
    and_,
    any_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import KeyedColumnElement

from ..limits import path_text
from ..query import And, Compare, Exists, FilterError, In, Key, Like, Node, Not, Or, Value, Violates, parse
from .index import STR_KEY_LENGTH, lower
from .models import Dataset, DatasetVersion, Datum, PropertyIndex

OwnerKind = Literal["dataset", "version", "datum"]
Atom = Compare | In | Like | Exists

# Candidate sets are kept to at most this many owners: an atom matching more is "not selective"
# and is only probed on the candidates of the others (10,000 ids read or passed back cost a few ms).
# Atoms are read with growing limits, so a small one is found without reading much of a large one.
CAP = 10_000
_OWNERS: dict[str, Any] = {"dataset": Dataset, "version": DatasetVersion, "datum": Datum}
_LIMITS = (100, 1_000)

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
        """The filter as a condition on `owner_id` (correlated EXISTS per atom)."""
        match node:
            case Compare() | In() | Like() | Exists():
                where = self.atom(node)
                return exists(select(PropertyIndex.id).where(PropertyIndex.owner_id == self.owner_id, *where))
            case Violates():
                owner = aliased(_OWNERS[self.owner_kind])
                return exists(select(owner.id).where(owner.id == self.owner_id, self.violates(node, owner)))
            case And(items):
                return and_(*(self.condition(i) for i in items))
            case Or(items):
                return or_(*(self.condition(i) for i in items))
            case Not(expr):
                return not_(self.condition(expr))
        raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover

    def probe(self, node: Node) -> ColumnElement[bool]:
        """The filter as a condition on `owner_id`, as `condition`, but each atom a correlated
        subquery with `LIMIT 1`, which no planner turns into a join: it is tested row by row
        as the listed rows are read, one (owner_kind, owner_id, path) index lookup each.

        For a first page of a filter that no set of ids bounds (`split = "train"`): the rows
        are read in id order and the page is full after a few hundred lookups. With
        `condition`, both databases chose to read every matching index row first (PostgreSQL
        a hash semi-join over 330,000 rows at 1M versions: 1.2 s for a page of 100)."""
        match node:
            case Compare() | In() | Like() | Exists():
                found = (
                    select(literal(1))
                    .where(PropertyIndex.owner_id == self.owner_id, *self.atom(node))
                    .limit(1)
                    .scalar_subquery()
                )
                return found.is_not(None)
            case Violates():
                return self.condition(node)
            case And(items):
                return and_(*(self.probe(i) for i in items))
            case Or(items):
                return or_(*(self.probe(i) for i in items))
            case Not(expr):
                return not_(self.probe(expr))
        raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover

    def atom(self, node: Atom, pi: Any = PropertyIndex) -> list[ColumnElement[bool]]:
        """The rows of `pi` (`property_index`, or an alias of it) that make an atom true.

        One owner has at most one row per path, so an owner satisfies the atom exactly when one
        of its rows is selected (`in` is an `or` of equalities on the same row).
        """
        condition: ColumnElement[bool] | None
        match node:
            case Compare(key, op, value):
                condition = _typed_compare(pi, op, value, self.dialect)
            case In(key, values):
                condition = _typed_in(pi, values, self.dialect)
            case Like(key, pattern, insensitive):
                column = pi.str_lower if insensitive else pi.str_value
                text = lower(pattern) if insensitive else pattern
                # The literal prefix as a range of the indexed str_key. For `ilike`, only its
                # leading ASCII digits and punctuation, which no case mapping changes (and
                # which no other character lowercases to): `ilike "3.%"` is served too.
                prefix = _caseless_prefix(text) if insensitive else re.split("[%_]", pattern)[0]
                terms = prefix_range(pi.str_key, prefix, self.dialect)
                if not _only_prefix(text, prefix):
                    terms += [pi.vtype == "string", self._like(column, text)]
                condition = and_(*terms)
            case Exists(key):
                condition = None
        where = [pi.owner_kind == self.owner_kind, pi.path == path_text(key.path)]
        if condition is not None:
            where.append(condition)
        return where

    def violates(self, node: Violates, owner: Any) -> ColumnElement[bool]:
        """The rows of `owner` (the owner table, or an alias) whose `violations` hold one (of the
        node's key). SQLite stores the column as JSON text, PostgreSQL as jsonb."""
        column = owner.violations
        postgres = self.dialect == "postgresql"
        if node.key is None:
            length = func.jsonb_array_length(column) if postgres else func.json_array_length(column)
            return length > 0
        if len(node.key.path) != 1:
            return false()  # definitions are of top-level keys
        name = node.key.path[0]
        if postgres:
            contains: ColumnElement[bool] = column.op("@>")(
                cast(literal(orjson.dumps([{"key": name}]).decode()), JSONB)
            )
            return contains
        items = func.json_each(column).table_valued("value")
        return exists(
            select(literal(1)).select_from(items).where(func.json_extract(items.c.value, "$.key") == name)
        )

    def ids(self, node: Atom | Violates) -> Any:
        """The owner ids making an atom true, as a query."""
        if isinstance(node, Violates):
            owner = _OWNERS[self.owner_kind]
            return select(owner.id).where(self.violates(node, owner))
        return select(PropertyIndex.owner_id).where(*self.atom(node))

    def _like(self, column: Any, pattern: str) -> ColumnElement[bool]:
        # Our LIKE has no escape character and is case-sensitive. SQLite's LIKE ignores ASCII case,
        # so SQLite gets the equivalent GLOB; PostgreSQL's LIKE treats "\" as an escape unless told.
        condition: ColumnElement[bool]
        if self.dialect == "sqlite":
            condition = column.op("GLOB")(_glob(pattern))
        else:
            condition = column.like(pattern.replace("\\", "\\\\"), escape="\\")
        return condition


class OwnerSets:
    """A filter as a set of owner ids (see the module docstring), read with a few index scans."""

    def __init__(self, session: Session, compiler: Compiler, cap: int | None = None) -> None:
        self.session = session
        self.compiler = compiler
        self.cap = CAP if cap is None else cap
        self._exact: dict[Node, set[int]] = {}  # atoms read in full (at most `cap` owners)
        self._over: dict[Node, int] = {}  # atoms known to match more than this many owners
        self._sizes: dict[Node, int] = {}  # atoms' numbers of owners, where counted in full

    def exceeds(self, node: Node, count: int) -> bool:
        """Whether `node` (an atom) was seen to match more than `count` owners."""
        return self._over.get(node, -1) >= count

    def matching(self, node: Node, candidates: set[int] | None = None) -> set[int] | None:
        """The owners among `candidates` (default: all of the kind) that match `node`; None when
        no candidates are given and no part of the filter has at most `cap` owners."""
        if candidates is None:
            atoms = _bounding(node)
            for limit in sorted({min(limit, self.cap) for limit in (*_LIMITS, self.cap)}):
                self.count(atoms, limit)
                candidates = self._superset(node, limit)
                if candidates is not None:
                    break
            else:
                return None
        return self._within(node, candidates)

    def count(self, atoms: Collection[Atom | Violates], limit: int) -> dict[Node, int]:
        """How many owners match each atom, up to `limit` + 1 (past it: `limit` + 1).

        Counted in the database, all in one statement, before any id is fetched: an atom over
        the limit costs a range of its index, not its ids handed to Python (fetching the
        10,001 ids of each of two non-selective atoms took 55 ms of a 116 ms page on SQLite at
        1M versions), and one statement per limit, not one per atom and limit (10 of them
        took 15 ms on PostgreSQL)."""
        todo = [a for a in dict.fromkeys(atoms) if a not in self._sizes and not self.exceeds(a, limit)]
        if todo:
            ranges = [self.compiler.ids(a).limit(limit + 1).subquery() for a in todo]
            counts = [select(func.count()).select_from(r).scalar_subquery() for r in ranges]
            for atom, found in zip(todo, self.session.execute(select(*counts)).one(), strict=True):
                if found > limit:
                    self._over[atom] = max(limit, self._over.get(atom, 0))
                else:
                    self._sizes[atom] = found
        return {a: self._sizes.get(a, limit + 1) for a in atoms}

    def _superset(self, node: Node, limit: int) -> set[int] | None:
        """A set of at most `limit` owners holding every match of `node`, or None."""
        match node:
            case Compare() | In() | Like() | Exists() | Violates():
                return self._read(node, limit)
            case And(items):
                # One bounded item bounds the whole; `_within` decides the others on it.
                for item in items:
                    bound = self._superset(item, limit)
                    if bound is not None:
                        return bound
                return None
            case Or(items):
                union: set[int] = set()
                for item in items:
                    bound = self._superset(item, limit)
                    if bound is None:
                        return None
                    union |= bound
                    if len(union) > limit:
                        return None
                return union
            case Not():
                return None  # the complement of anything is large
        raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover

    def _read(self, atom: Atom | Violates, limit: int) -> set[int] | None:
        """All owners matching an atom, when there are at most `limit` (`count`); else None."""
        if atom not in self._exact:
            if self.count([atom], limit)[atom] > limit:
                return None
            self._exact[atom] = set(self.session.scalars(self.compiler.ids(atom)))
        owners = self._exact[atom]
        return owners if len(owners) <= limit else None

    def _within(self, node: Node, candidates: set[int]) -> set[int]:
        """Exactly the owners in `candidates` that match `node`."""
        if not candidates:
            return set()
        if node in self._exact:
            return self._exact[node] & candidates
        match node:
            case Violates():
                owner = _OWNERS[self.compiler.owner_kind]
                probe = self.compiler.ids(node).where(ids_in(owner.id, candidates, self.compiler.dialect))
                return set(self.session.scalars(probe)) & candidates
            case Compare() | In() | Like() | Exists():
                # Read the candidates' rows by owner, then test them: a cost bounded by the
                # candidates, whatever the planner guesses of the atom (it can think 330,000
                # `shift = "night"` rows are 30, and scan them all for the 1,000 owners asked).
                # Only the atom's path: one (owner_kind, owner_id, path) entry per candidate, not
                # each candidate's every row (13 here: 10,000 candidates took 118 ms at 100,000
                # versions on PostgreSQL, 79 ms on SQLite).
                rows = (
                    select(PropertyIndex)
                    .where(
                        PropertyIndex.owner_kind == self.compiler.owner_kind,
                        ids_in(PropertyIndex.owner_id, candidates, self.compiler.dialect),
                        PropertyIndex.path == path_text(node.key.path),
                    )
                    .cte("candidate_rows")
                    .prefix_with("MATERIALIZED")
                )
                pi = aliased(PropertyIndex, rows)
                query = select(pi.owner_id).where(*self.compiler.atom(node, pi))
                return set(self.session.scalars(query)) & candidates
            case And(items):
                left = candidates
                # Atoms already read in full first: they cost nothing and shrink what the others probe.
                for item in sorted(items, key=lambda i: i not in self._exact):
                    left = self._within(item, left)
                    if not left:
                        break
                return left
            case Or(items):
                found: set[int] = set()
                rest = candidates
                for item in items:
                    hits = self._within(item, rest)
                    found |= hits
                    rest = rest - hits
                    if not rest:
                        break
                return found
            case Not(expr):
                return candidates - self._within(expr, candidates)
        raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover


def _bounding(node: Node) -> list[Atom | Violates]:
    """The atoms `OwnerSets._superset` may read to bound `node`: those under no `not`."""
    match node:
        case Compare() | In() | Like() | Exists() | Violates():
            return [node]
        case And(items) | Or(items):
            return [a for i in items for a in _bounding(i)]
        case Not():
            return []
    raise TypeError(f"not a filter node: {node!r}")  # pragma: no cover


def ids_in(column: Any, ids: Collection[int], dialect: str) -> ColumnElement[bool]:
    """`column IN ids` with the ids as one bound parameter (an array, or a JSON list on SQLite),
    so it costs the same to compile whatever their number and stays under parameter limits."""
    values = sorted(ids)
    condition: ColumnElement[bool]
    if dialect == "postgresql":
        condition = column == any_(literal(values, ARRAY(Integer)))
    else:
        table = func.json_each(orjson.dumps(values).decode()).table_valued("value")
        condition = column.in_(select(table.c.value))
    return condition


def _typed_in(pi: Any, values: Any, dialect: str) -> ColumnElement[bool]:
    """`in` as one condition per type: `str_key IN (...)` is an index condition a scan can stop
    early on, where an `or` of equalities made PostgreSQL read every match of every value."""
    strings = sorted({v for v in values if isinstance(v, str)})
    terms = [_typed_compare(pi, "=", v, dialect) for v in values if not isinstance(v, str)]
    short = [v for v in strings if len(v) < STR_KEY_LENGTH]
    if short:
        terms.append(pi.str_key.in_(short))  # a short string is its own str_key (_typed_compare)
    long = [v for v in strings if len(v) >= STR_KEY_LENGTH]
    if long:
        # A long value's str_key is its first STR_KEY_LENGTH characters: the full value decides.
        keys = sorted({v[:STR_KEY_LENGTH] for v in long})
        terms.append(and_(pi.vtype == "string", pi.str_key.in_(keys), pi.str_value.in_(long)))
    return or_(*terms)


def _only_prefix(pattern: str, prefix: str) -> bool:
    """Whether a `like` pattern is its literal prefix and `%` (`"3.%"`), the prefix no longer
    than `str_key`: then the range of `prefix_range` is exactly its matches, and the value index
    answers it alone (a page of 1,000 of `like "3.%"` at 1M versions read the table for the
    value of each row)."""
    return 0 < len(prefix) <= STR_KEY_LENGTH and pattern[len(prefix) :] == "%"


def _caseless_prefix(pattern: str) -> str:
    """The leading characters of a (lowercased) `ilike` pattern that are ASCII and no letter."""
    out = []
    for char in pattern:
        if char in "%_" or not char.isascii() or char.isalpha():
            break
        out.append(char)
    return "".join(out)


def _typed_compare(pi: Any, op: str, value: Value, dialect: str) -> ColumnElement[bool]:
    """An atom's comparison on the row of its path, of the value's type.

    Only numbers have a `num` and only strings a `str_key` (`index.index_rows`), so a
    comparison of either column says the type and no `vtype` test is made. A string shorter
    than `str_key` compares with a value exactly as with its `str_key` (the two differ within
    the value's length, or the longer starts with the shorter), so that test is on `str_key`
    alone. Then the value indexes answer the atom without visiting the table: at 500,000
    versions, reading 30,000 rows of `defect_rate < 0.001` took 160 ms with `vtype` (a table
    visit per row, in value order) and 4 ms without, on PostgreSQL; 57 and 1.6 ms on SQLite."""
    if isinstance(value, bool):
        return and_(pi.vtype == "boolean", _OPS[op](pi.bool_value, value))
    condition: ColumnElement[bool]
    if isinstance(value, int | float):
        condition = _OPS[op](pi.num, float(value))
        return condition
    if len(value) < STR_KEY_LENGTH:
        # In code-point order: the column is COLLATE "C" on PostgreSQL, BINARY on SQLite.
        condition = _OPS[op](pi.str_key, value)
        return condition
    column: Any = pi.str_value
    if dialect == "postgresql":
        column = column.collate("C")  # code-point order, as in Python (and SQLite's BINARY)
    if op == "=":
        # The indexed prefix narrows the search; the full value decides.
        prefix = pi.str_key == value[:STR_KEY_LENGTH]
        return and_(pi.vtype == "string", prefix, pi.str_value == value)
    return and_(pi.vtype == "string", _OPS[op](column, value))


def prefix_range(column: Any, pattern: str, dialect: str) -> list[ColumnElement[bool]]:
    """Conditions on `str_key` that every string matching the `like` pattern meets: its literal
    prefix (up to the first wildcard) as a range, `prefix <= str_key < successor`, which the
    (owner_kind, path, str_key) btree serves. Empty when the pattern starts with a wildcard.

    In code-point order on both databases (the column is COLLATE "C" on PostgreSQL, BINARY on
    SQLite). `str_key` holds a string's first STR_KEY_LENGTH characters, so a longer prefix is
    cut to that length: the range is then wider than the pattern, never narrower."""
    cut = [i for i in (pattern.find("%"), pattern.find("_")) if i >= 0]
    prefix = pattern[: min(cut)] if cut else pattern
    prefix = prefix[:STR_KEY_LENGTH]
    if not prefix:
        return []
    key: Any = column.collate("C") if dialect == "postgresql" else column
    terms: list[ColumnElement[bool]] = [key >= prefix]
    upper = _successor(prefix)
    if upper is not None:
        terms.append(key < upper)
    return terms


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` (None: there is none)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # no string holds a surrogate: skip past them
            code = 0xE000
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


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
