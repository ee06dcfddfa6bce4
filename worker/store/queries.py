"""Read queries for the API and the CLI, and the JSON shapes they answer with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Table, and_, bindparam, exists, func, or_, select
from sqlalchemy.orm import Session, aliased, joinedload

from ..errors import NotFound
from ..ids import looks_like_id
from ..limits import ID_MAX as MAX_ID
from ..limits import path_text
from ..query import And, Compare, Exists, FilterError, In, Key, Like, Or, parse
from ..uris import parse_uri
from . import aliases, search
from .index import STR_KEY_LENGTH
from .models import (
    Dataset,
    DatasetVersion,
    Datum,
    DatumAlias,
    PropertyChange,
    PropertyIndex,
    VersionFile,
    shown,
)
from .search import Compiler, OwnerKind, OwnerSets, ids_in, ordering_key

# A list answers an exact count up to this many matches; past it, when the caller allows
# (`ListQuery.exact_count=False`, the API's default), it answers COUNT_CAP and says the count is
# not exact. Counting 330,000 matches of a non-selective filter took seconds; the first 10,001
# take a few milliseconds.
COUNT_CAP = 10_000


@dataclass(frozen=True)
class ListQuery:
    """What a list request asks for: exact names, a filter expression, an ordering key, a page.

    `exact_count=False`: a count over COUNT_CAP may be answered as COUNT_CAP (`Listed.count_exact`
    says which). `after`: a keyset position (`Listed.after` of the page before) from which the
    page starts instead of `offset`; only the default ordering (by id) has one."""

    name: str | None = None
    dataset: str | None = None
    filter: str | None = None
    ordering: str | None = None
    limit: int = 100
    offset: int = 0
    exact_count: bool = True
    after: int | None = None


@dataclass(frozen=True)
class Listed:
    """One page of a list: the count (exact, or capped at COUNT_CAP), the rows, whether rows
    follow them, and the keyset position after the last row (None: this ordering has none)."""

    count: int
    count_exact: bool
    rows: list[Any]
    more: bool
    after: int | None = None


def list_datasets(session: Session, ask: ListQuery) -> tuple[int, list[Dataset]]:
    """Datasets matching `ask`; FilterError if its filter or ordering does not parse."""
    where = [] if ask.name is None else [Dataset.name == ask.name]
    query = select(Dataset).where(*where)
    ids = select(Dataset.id).where(*where) if where else None
    return list_page(session, query, ids, ask, "dataset", Dataset.id, list_fields(Dataset, Dataset.name))


def list_versions(session: Session, ask: ListQuery) -> tuple[int, list[DatasetVersion]]:
    """Versions matching `ask`; FilterError if its filter or ordering does not parse."""
    where = version_names(ask)
    query = select(DatasetVersion).join(Dataset).where(*where).options(joinedload(DatasetVersion.dataset))
    ids = select(DatasetVersion.id).join(Dataset).where(*where) if where else None
    fields = list_fields(DatasetVersion, DatasetVersion.name)
    return list_page(session, query, ids, ask, "version", DatasetVersion.id, fields)


def list_version_ids(session: Session, ask: ListQuery) -> Listed:
    """The ids of one page of the versions matching `ask` (for `versions_page_json`), with the
    count; FilterError if its filter or ordering does not parse."""
    where = version_names(ask)
    ids = select(DatasetVersion.id).join(Dataset).where(*where) if where else None
    query = ids if ids is not None else select(DatasetVersion.id)
    fields = list_fields(DatasetVersion, DatasetVersion.name)
    return page_of(session, query, ids, ask, "version", DatasetVersion.id, fields)


def list_dataset_ids(session: Session, ask: ListQuery) -> Listed:
    """The ids of one page of the datasets matching `ask` (for `datasets_page_json`)."""
    where = [] if ask.name is None else [Dataset.name == ask.name]
    query = select(Dataset.id).where(*where)
    ids = query if where else None
    return page_of(session, query, ids, ask, "dataset", Dataset.id, list_fields(Dataset, Dataset.name))


def version_names(ask: ListQuery) -> list[Any]:
    where = []
    if ask.dataset is not None:
        # The platform's clients pass the dataset's id; ours pass its name. Both work.
        named = [Dataset.name == ask.dataset, Dataset.platform_id == ask.dataset]
        if looks_like_id(ask.dataset):
            named.append(Dataset.uid == ask.dataset.lower())
        where.append(or_(*named))
    if ask.name is not None:
        where.append(DatasetVersion.name == ask.name)
    return where


def list_fields(model: Any, name: Any) -> dict[str, Any]:
    """The field names `ordering` takes besides properties: `id` sorts by creation, as the ids do."""
    return {"id": model.uid, "name": name, "ctime": model.created_at, "mtime": model.updated_at}


PROPERTY_PREFIX = "properties."


def check_ordering(text: str) -> None:
    """FilterError if `text` is no ordering a list takes (every list has the same field names)."""
    _ordering(text, dict.fromkeys(("id", "name", "ctime", "mtime")))


def _ordering(text: str, fields: dict[str, Any]) -> tuple[Any, bool]:
    """(a field's column or a property Key, descending) for `ordering=`.

    A field name (`name`, `-ctime`) sorts by that field; `properties.<key>` by a property; a
    bare key that is not a field name means a property too (as before fields existed)."""
    descending = text.startswith("-")
    body = text[1:] if descending else text
    if body in fields:
        return fields[body], descending
    if body.startswith(PROPERTY_PREFIX):
        try:
            key, _ = ordering_key(body[len(PROPERTY_PREFIX) :])
        except FilterError as exc:
            shift = len(PROPERTY_PREFIX) + int(descending)
            raise FilterError(exc.position + shift, exc.expected, exc.problem) from None
        return key, descending
    return ordering_key(text)


def list_page(
    session: Session,
    query: Any,
    ids: Any,
    ask: ListQuery,
    kind: OwnerKind,
    owner_id: Any,
    fields: dict[str, Any],
) -> tuple[int, list[Any]]:
    """Count and page `query` (the listed rows; `ids`, their ids, when names narrow them) under
    the filter and ordering of `ask` (see `page_of`)."""
    listed = page_of(session, query, ids, ask, kind, owner_id, fields)
    return listed.count, listed.rows


def page_of(
    session: Session,
    query: Any,
    ids: Any,
    ask: ListQuery,
    kind: OwnerKind,
    owner_id: Any,
    fields: dict[str, Any],
) -> Listed:
    """Count and page `query` (the listed rows; `ids`, their ids, when names narrow them) under
    the filter and ordering of `ask`.

    The filter is first evaluated as a set of ids (`OwnerSets`): from the rows the names leave,
    when there are at most `CAP`, else from a selective part of the filter. Only when neither
    exists does the database evaluate the whole filter (`Compiler.condition`). The page reads
    one row more than asked, to tell whether more follow (a capped count cannot)."""
    ordering = _ordering(ask.ordering, fields) if ask.ordering else None
    narrowed = _narrowed(session, query, ids, ask.filter, kind, owner_id)
    if narrowed is None:
        return Listed(0, True, [], False)
    listed, (query, counted, over, ordered) = query, narrowed
    if over and not ask.exact_count:
        count, exact = COUNT_CAP, False
    else:
        count, exact = _count(session, counted, ask.exact_count)
    want = ask.limit + 1
    after: int | None = None
    if ordering is not None and isinstance(ordering[0], Key):
        key, descending = ordering
        rows = _by_property(session, query, kind, owner_id, key, descending, ask.offset + want)
        rows = rows[ask.offset :]
    elif ordering is None and ordered is not None:
        rows = _in_id_order(session, listed, ordered, owner_id, ask, want)
    else:
        if ordering is not None:
            column, descending = ordering
            query = query.order_by(column.desc() if descending else column.asc(), owner_id)
        elif ask.after is not None:
            query = query.where(owner_id > ask.after).order_by(owner_id)
        else:
            query = query.order_by(owner_id)
        offset = ask.offset if ordering is not None or ask.after is None else 0
        rows = list(session.scalars(query.limit(want).offset(offset)).unique().all())
    more = len(rows) > ask.limit
    rows = rows[: ask.limit]
    if ordering is None and rows:
        last = rows[-1]
        after = last if isinstance(last, int) else getattr(last, "id", None)
    if not exact and not more and ask.after is None:
        # A short last page knows the exact count: everything before it, and it.
        count, exact = ask.offset + len(rows), True
    return Listed(count, exact, rows, more, after)


def _in_id_order(
    session: Session, query: Any, ordered: Any, owner_id: Any, ask: ListQuery, want: int
) -> list[Any]:
    """A page in id order: its ids read from `ordered` (`_id_ordered`), then their rows of
    `query` (the listed rows: the ids match the filter already)."""
    column = ordered.selected_columns[0]
    offset = ask.offset
    if ask.after is not None:
        ordered, offset = ordered.where(column > ask.after), 0
    page = list(session.scalars(ordered.order_by(column).limit(want).offset(offset)))
    if not page:
        return []
    rows = query.where(ids_in(owner_id, page, session.get_bind().dialect.name)).order_by(owner_id)
    return list(session.scalars(rows).unique().all())


def _narrowed(
    session: Session, query: Any, ids: Any, text: str | None, kind: OwnerKind, owner_id: Any
) -> tuple[Any, Any, bool, Any] | None:
    """As `narrow`, for one page: (the listed rows under the filter, a query of the ids to
    count, whether the count is known to pass COUNT_CAP, a query of the matching ids that an
    index gives in id order or None), or None when nothing can match.

    A filter that no set of ids bounds is tested row by row (`Compiler.probe`), so a page in
    id or index order stops early. Its count is read from the index rows of one of its atoms
    (the whole filter when it is one atom, else an item of its `and`), the rest probed on each:
    the first COUNT_CAP + 1 rows of an index range cost a few milliseconds; walking the listed
    rows in id order would test three rows per match of a filter matching a third of them."""
    counted = query.order_by(None).with_only_columns(owner_id, maintain_column_froms=True)
    if not text:
        return query, counted, False, None
    node = parse(text)
    dialect = session.get_bind().dialect.name
    compiler = Compiler(kind, owner_id, dialect)
    candidates = None
    if ids is not None:
        listed = session.scalars(ids.limit(search.CAP + 1)).all()
        candidates = set(listed) if len(listed) <= search.CAP else None
    sets = OwnerSets(session, compiler, search.CAP)
    matching = sets.matching(node, candidates)
    if matching is not None:
        if not matching:
            return None
        narrowed = query.where(ids_in(owner_id, matching, dialect))
        return narrowed, counted.where(ids_in(owner_id, matching, dialect)), False, None
    probed = query.where(compiler.probe(node))
    counted = counted.where(compiler.probe(node))
    if ids is not None:
        return probed, counted, False, None
    # Every owner of the kind is listed: its index rows name only listed owners.
    atoms = [i for i in _items(node) if isinstance(i, Compare | In | Like | Exists)]
    ordered = _id_ordered(kind, node, atoms, dialect)
    if _over(node, sets):
        return probed, counted, True, ordered
    if atoms:
        counted = _by_atoms(sets, kind, node, atoms, dialect)
    return probed, counted, False, ordered


# SQLite counts the owners of each atom up to this many, to drive the capped count by the smallest.
DRIVER_BOUND = 10 * COUNT_CAP


def _by_atoms(sets: OwnerSets, kind: OwnerKind, node: Any, atoms: list[Any], dialect: str) -> Any:
    """The owners matching `node` (an atom, or an `and` with atoms among its items), read from
    the atoms' index rows, every owner of the kind listed: what the capped count counts.

    When every atom matches more than COUNT_CAP owners, the count stops at the first
    COUNT_CAP + 1 matches, and what it costs is how many rows it reads to find them. On
    PostgreSQL the atoms' index rows are joined by owner (an owner has one row per path, so
    one row per match): the planner hashes the atom it expects to be smaller and reads the
    other until the limit. Both read from their value indexes alone, ~35 ms at 1M versions for
    `defect_rate < 0.001 and shift = "night"` (100,000 and 333,000 rows) in either order; a
    probe per row of the first atom took 2.4 µs each (30,000 of them) as a semi-join, 4 µs as
    a correlated subquery. SQLite has no hash join, and its probes are cheap (1.4 µs, from the
    value index): the smallest atom, counted up to DRIVER_BOUND, is read and the others probed
    on each of its rows (42 ms; the larger first: 143 ms).

    The planner's estimates of a (path, value) range are low (12× at 1M versions, the same for
    every atom), and with two of them close it may hash the larger: `machine = "press-04" and
    sample_count > 100` hashed the 990,000 rows of the range, spilling to disk (226 ms)."""
    rest = [i for i in _items(node) if not isinstance(i, Compare | In | Like | Exists)]
    if dialect == "postgresql":
        rows = [aliased(PropertyIndex) for _ in atoms]
        first = rows[0]
        by_row = Compiler(kind, cast(Any, first.owner_id), dialect)
        query = select(first.owner_id)
        for pi in rows[1:]:
            query = query.join(pi, pi.owner_id == first.owner_id)
        where = [term for pi, atom in zip(rows, atoms, strict=True) for term in by_row.atom(atom, pi)]
        return query.where(*where, *(by_row.probe(i) for i in rest))
    sizes = sets.count(atoms, DRIVER_BOUND) if len(atoms) > 1 else {}
    driver = min(atoms, key=lambda a: sizes.get(a, 0))  # the first of the smallest
    rest = [i for i in _items(node) if i is not driver]
    pi = aliased(PropertyIndex)
    by_row = Compiler(kind, cast(Any, pi.owner_id), dialect)
    return select(pi.owner_id).where(*by_row.atom(driver, pi), *(by_row.probe(i) for i in rest))


def _id_ordered(kind: OwnerKind, node: Any, atoms: list[Any], dialect: str) -> Any:
    """The owners matching `node` (every owner of the kind listed) read from the index rows of
    an equality among its atoms, which its value index holds in owner id order (the index ends
    with owner_id), the rest of the filter probed on each; None when it has no such atom.

    A first page in id order then reads the rows of that atom from the first until the page is
    full, instead of every owner in id order with the whole filter probed on each: at 1M
    versions, `defect_rate < 0.001 and shift = "night"` probed 3,000 versions for 100 matches,
    here 1,000 `shift = "night"` rows (and their 1,000 probes of `defect_rate`)."""
    driver = next((a for a in atoms if _in_index_order(a)), None)
    if driver is None:
        return None
    rest = [i for i in _items(node) if i is not driver]
    pi = aliased(PropertyIndex)
    by_row = Compiler(kind, cast(Any, pi.owner_id), dialect)
    return select(pi.owner_id).where(*by_row.atom(driver, pi), *(by_row.probe(i) for i in rest))


def _in_index_order(atom: Any) -> bool:
    """Whether an atom is one value of a value index: `=` a number, or a string that is its own
    `str_key` (`search._typed_compare`); its rows there are in owner id order."""
    if not isinstance(atom, Compare) or atom.op != "=" or isinstance(atom.value, bool):
        return False
    return not isinstance(atom.value, str) or len(atom.value) < STR_KEY_LENGTH


def _over(node: Any, sets: OwnerSets) -> bool:
    """Whether `node` is known to match more than COUNT_CAP owners: an atom seen to, or an `or`
    with an item that is (every owner of the kind listed)."""
    if isinstance(node, Compare | In | Like | Exists):
        return sets.exceeds(node, COUNT_CAP)
    if isinstance(node, Or):
        return any(_over(i, sets) for i in node.items)
    return False


def _items(node: Any) -> list[Any]:
    return list(node.items) if isinstance(node, And) else [node]


def _count(session: Session, ids: Any, exact: bool) -> tuple[int, bool]:
    """The number of rows of `ids`: exactly, or (`exact=False`) up to COUNT_CAP, past which it
    answers (COUNT_CAP, False). Counting stops at the first COUNT_CAP + 1 matches."""
    if not exact:
        ids = ids.limit(COUNT_CAP + 1)
    count = session.scalar(select(func.count()).select_from(ids.subquery())) or 0
    if not exact and count > COUNT_CAP:
        return COUNT_CAP, False
    return count, True


def _strings(session: Session, segment: Any, key: Any) -> list[Any] | None:
    """The rows of a string segment ordered by (str_key, id), or None when that order may not
    be the full values' (two of the rows read hold the same STR_KEY_LENGTH-character str_key)."""
    found = session.execute(segment.add_columns(key.label("sort_key"))).unique().all()
    keys = [r.sort_key for r in found]
    if any(len(k) >= STR_KEY_LENGTH and k == keys[i + 1] for i, k in enumerate(keys[:-1])):
        return None
    if found and len(keys[-1]) >= STR_KEY_LENGTH:
        return None  # the page may end inside a group of long strings ordered by id alone
    return [r[0] for r in found]


LOOSE_VALUES = 32  # distinct strings a descending page reads one by one before it sorts


def _strings_down(
    session: Session, segment: Any, value: Any, kind: OwnerKind, path: str, owner_id: Any, count: int
) -> list[Any] | None:
    """The first `count` rows of a string segment in descending order, ties by id ascending,
    read one distinct value at a time from the top; None to leave it to the sorting query.

    The index holds (str_key, owner_id): read backwards it gives ties by id descending, so the
    one-query form sorts every run of equal values before its first row (50,000 rows per value
    at 1M: 320 ms). Here each value is found by one step down the index (`max(str_key) <` the
    one before), then its rows are read forwards, in id order, until the page is full. After
    `LOOSE_VALUES` values (many values with few matches each), or at a string as long as
    `str_key` (whose full value decides), the sorting query does it all."""
    dialect = session.get_bind().dialect.name
    key = PropertyIndex.str_key.collate("C") if dialect == "postgresql" else PropertyIndex.str_key
    top = select(func.max(key)).where(PropertyIndex.owner_kind == kind, PropertyIndex.path == path)
    rows: list[Any] = []
    below: str | None = None
    for _ in range(LOOSE_VALUES):
        where = [] if below is None else [key < below]
        current = session.scalar(top.where(*where))
        if current is None:
            return rows  # every string read
        if len(current) >= STR_KEY_LENGTH:
            return None
        rows.extend(
            session.scalars(segment.where(value == current).order_by(owner_id).limit(count - len(rows)))
            .unique()
            .all()
        )
        if len(rows) >= count:
            return rows
        below = current
    return None


# How `order_by` ranks values by type: numbers, strings, booleans, then objects, arrays and
# nulls (by id), then the rows without the key (by id).
_TYPE_SEGMENTS = ("number", "string", "boolean")


def _by_property(
    session: Session, query: Any, kind: OwnerKind, owner_id: Any, key: Key, descending: bool, count: int
) -> list[Any]:
    """The first `count` rows of `query` sorted by a property value (as `search.order_by`).

    Read a type at a time, each in its own index order ((owner_kind, path, num) for numbers,
    (owner_kind, path, str_key) for strings), stopping as soon as `count` rows are in: the first
    page of a non-selective filter ordered by `score` walks the scores from the top and tests the
    filter on those rows only, instead of joining and sorting every match (seconds at 1M)."""
    dialect = session.get_bind().dialect.name
    path = path_text(key.path)
    rows: list[Any] = []
    for vtype in (*_TYPE_SEGMENTS, None, "missing"):
        left = count - len(rows)
        if left <= 0:
            break
        pi = aliased(PropertyIndex)
        joined = and_(pi.owner_kind == kind, pi.owner_id == owner_id, pi.path == path)
        if vtype == "missing":
            segment = query.where(~exists(select(pi.id).where(joined))).order_by(owner_id)
        elif vtype is None:
            other = pi.vtype.notin_(_TYPE_SEGMENTS)
            segment = query.join(pi, and_(joined, other)).order_by(owner_id)
        else:
            segment = query.join(pi, and_(joined, pi.vtype == vtype))
            if vtype == "number":
                value: Any = pi.num
            elif vtype == "string":
                value = pi.str_key.collate("C") if dialect == "postgresql" else pi.str_key
            else:
                value = pi.bool_value
            # The index order, (value, owner_id): no sort, and the scan stops at the page. `IS
            # NOT NULL` keeps the scan off the other types' rows (NULL here, sorted last).
            segment = segment.where(value.is_not(None))
            # Ties by id ascending, descending or not (as search.order_by); a descending page
            # sorts each run of equal values (incremental sort on PostgreSQL).
            tie = owner_id.asc()
            segment = segment.order_by(value.desc() if descending else value.asc(), tie)
            if vtype == "string" and descending:
                found = _strings_down(session, segment.order_by(None), value, kind, path, owner_id, left)
                if found is not None:
                    rows.extend(found)
                    continue
            if vtype == "string":
                found = _strings(session, segment.limit(left), value)
                if found is not None:
                    rows.extend(found)
                    continue
                # Strings sharing their first STR_KEY_LENGTH characters: the full value decides.
                full = pi.str_value.collate("C") if dialect == "postgresql" else pi.str_value
                segment = segment.order_by(None).order_by(
                    *(v.desc() if descending else v.asc() for v in (value, full)), tie
                )
        rows.extend(session.scalars(segment.limit(left)).unique().all())
    return rows


def narrow(session: Session, query: Any, ids: Any, text: str | None, kind: OwnerKind, owner_id: Any) -> Any:
    """`query` (the listed rows; `ids`, their ids, when names narrow them) under the filter
    `text`, or None when nothing can match. FilterError if the filter does not parse.

    The filter is first evaluated as a set of ids (`OwnerSets`): from the rows the names leave,
    when there are at most `CAP`, else from a selective part of the filter. Only when neither
    exists does the database evaluate the whole filter (`Compiler.condition`)."""
    if not text:
        return query
    node = parse(text)
    dialect = session.get_bind().dialect.name
    compiler = Compiler(kind, owner_id, dialect)
    cap = search.CAP
    candidates = None
    if ids is not None:
        listed = session.scalars(ids.limit(cap + 1)).all()
        candidates = set(listed) if len(listed) <= cap else None
    matching = OwnerSets(session, compiler, cap).matching(node, candidates)
    if matching is None:
        return query.where(compiler.condition(node))
    if not matching:
        return None
    return query.where(ids_in(owner_id, matching, dialect))


def version_ids(session: Session, ask: ListQuery) -> Any:
    """The ids of the versions `ask` lists (its names and filter), as a query; None if none."""
    query = select(DatasetVersion.id).join(Dataset).where(*version_names(ask))
    return narrow(
        session, query, query if ask.dataset or ask.name else None, ask.filter, "version", DatasetVersion.id
    )


def dataset_ids(session: Session, ask: ListQuery) -> Any:
    """The ids of the datasets `ask` lists, as a query; None if none."""
    where = [] if ask.name is None else [Dataset.name == ask.name]
    query = select(Dataset.id).where(*where)
    return narrow(session, query, query if where else None, ask.filter, "dataset", Dataset.id)


R = TypeVar("R", Dataset, DatasetVersion, Datum)
Ref = int | str  # an integer key, or a public id / platform id as a path gives it


def get_dataset(session: Session, ref: Ref) -> Dataset:
    row = _find(session, Dataset, ref)
    if row is None:
        raise NotFound(f"dataset {str(ref)[:100]}")
    return row


def get_version(session: Session, ref: Ref) -> DatasetVersion:
    row = _find(session, DatasetVersion, ref)
    if row is None:
        raise NotFound(f"dataset version {str(ref)[:100]}")
    return row


def get_datum(session: Session, ref: Ref) -> Datum:
    row = _find(session, Datum, ref)
    if row is None:
        raise NotFound(f"datum {str(ref)[:100]}")
    return row


def _find(session: Session, model: type[R], ref: Ref) -> R | None:
    """The row `ref` names: its public id, its platform id, or (old links) its integer key.

    Any other string names nothing. The public id is tried first: it is ours and unique, and a
    platform id that happens to look like one of ours cannot shadow it."""
    if isinstance(ref, int):
        return session.get(model, ref) if 0 < ref <= MAX_ID else None
    text = ref.strip()
    if not text.isprintable():  # NUL and friends: no id holds them, and PostgreSQL refuses NUL
        return None
    if looks_like_id(text):
        row = session.scalars(select(model).where(model.uid == text.lower())).first()
        if row is not None:
            return row
    platform_id = getattr(model, "platform_id", None)  # datasets and versions have one
    if platform_id is not None and 0 < len(text) <= 64:
        row = session.scalars(select(model).where(platform_id == text)).first()
        if row is not None:
            return row
    if text.isascii() and text.isdigit() and len(text) <= 19 and 0 < int(text) <= MAX_ID:
        return session.get(model, int(text))
    return None


def dataset_json(row: Dataset, latest: DatasetVersion | None = None) -> dict[str, Any]:
    """A dataset as the platform shows one (`latest_version`: its newest completed version)."""
    return {
        "id": row.uid,
        "name": row.name,
        "uri": f"dataset://{row.name}",
        "properties": row.shown_properties,
        "tags": list(row.tags or []),
        "violations": list(row.violations or []),
        "latest_version": None if latest is None else _version_ref(latest, row.name),
        "platform_id": row.platform_id,
        "ctime": iso(row.created_at),
        "mtime": iso(row.updated_at),
        "created_at": iso(row.created_at),
    }


def datasets_json(session: Session, rows: Sequence[Dataset]) -> list[dict[str, Any]]:
    """Datasets with their latest versions, read in one query for the whole page."""
    latest = latest_versions(session, [r.id for r in rows])
    return [dataset_json(r, latest.get(r.id)) for r in rows]


def latest_versions(session: Session, dataset_ids: Sequence[int]) -> dict[int, DatasetVersion]:
    """Each dataset's newest completed version (by completion time, then id), one query."""
    if not dataset_ids:
        return {}
    newest = (
        select(DatasetVersion.id)
        .where(
            DatasetVersion.dataset_id == Dataset.id,
            DatasetVersion.status == "completed",
        )
        .order_by(DatasetVersion.completed_at.desc(), DatasetVersion.id.desc())
        .limit(1)
        .correlate(Dataset)
        .scalar_subquery()
    )
    pairs = session.execute(select(Dataset.id, newest).where(Dataset.id.in_(dataset_ids))).all()
    wanted = {v: d for d, v in pairs if v is not None}
    if not wanted:
        return {}
    versions = session.scalars(select(DatasetVersion).where(DatasetVersion.id.in_(wanted))).all()
    return {wanted[v.id]: v for v in versions}


def _version_ref(row: DatasetVersion, dataset: str) -> dict[str, Any]:
    return {"id": row.uid, "name": row.name, "uri": f"dataset://{dataset}/{row.name}"}


# A list of versions carries at most this many files per version (and `files_count`); the
# detail carries them all, FILES_PAGE at a time.
LIST_FILES = 100
FILES_PAGE = 10_000


def version_json(
    session: Session, row: DatasetVersion, *, files_limit: int = FILES_PAGE, files_offset: int = 0
) -> dict[str, Any]:
    """One version, with its files from `files_offset` on (at most `files_limit`)."""
    return versions_json(session, [row], files_limit=files_limit, files_offset=files_offset)[0]


def versions_json(
    session: Session, rows: Sequence[DatasetVersion], *, files_limit: int = LIST_FILES, files_offset: int = 0
) -> list[dict[str, Any]]:
    """Versions as the platform shows them, each with the first `files_limit` of its files.

    A fixed number of queries for the whole page, whatever its length: the files (ranked per
    version in SQL, so a version of a million files sends only its first page), their counts,
    aliases, datum aliases and the `from` versions."""
    ids = [r.id for r in rows]
    files = _files_of(session, ids, files_limit, files_offset)
    counts = _file_counts(session, ids)
    names = aliases.version_aliases(session, ids)
    previous_ids = {r.previous_version_id for r in rows if r.previous_version_id is not None}
    previous = (
        {v.id: v for v in session.scalars(select(DatasetVersion).where(DatasetVersion.id.in_(previous_ids)))}
        if previous_ids
        else {}
    )
    return [
        _version_dict(
            row,
            row.dataset.uid,
            row.dataset.name,
            previous.get(row.previous_version_id) if row.previous_version_id is not None else None,
            names.get(row.id, []),
            files.get(row.id, []),
            counts.get(row.id, 0),
            files_offset,
        )
        for row in rows
    ]


def versions_page_json(session: Session, ids: Sequence[int]) -> list[dict[str, Any]]:
    """The versions `ids` (in that order) as `versions_json` shows them in a list, read with
    Core in a fixed number of statements and encoded straight from the result rows: loading a
    page of 1,000 ORM objects (and their datasets) cost more than the search itself."""
    if not ids:
        return []
    dialect = session.get_bind().dialect.name
    v = DatasetVersion
    columns = (v.id, v.uid, v.name, v.status, v.properties, v.tags, v.violations, v.previous_version_id)
    more = (v.platform_id, v.created_at, v.updated_at, v.completed_at, Dataset.uid, Dataset.name, v.last_used)
    query = (
        select(*columns, *more).join(Dataset, Dataset.id == v.dataset_id).where(ids_in(v.id, ids, dialect))
    )
    found = {r.id: r for r in session.execute(query)}
    rows = [found[i] for i in ids if i in found]
    files = _files_of(session, ids, LIST_FILES, 0)
    counts = _file_counts(session, ids)
    names = aliases.version_aliases(session, ids)
    previous_ids = {r.previous_version_id for r in rows if r.previous_version_id is not None}
    previous: dict[int, str] = {}
    if previous_ids:
        previous = {i: u for i, u in session.execute(select(v.id, v.uid).where(v.id.in_(previous_ids)))}
    return [
        _version_dict(
            r,
            r[12],
            r[13],
            previous.get(r.previous_version_id) if r.previous_version_id is not None else None,
            names.get(r.id, []),
            files.get(r.id, []),
            counts.get(r.id, 0),
            0,
        )
        for r in rows
    ]


def _version_dict(
    row: Any,
    dataset_uid: str,
    dataset_name: str,
    base: Any,
    names: list[str],
    files: list[dict[str, Any]],
    files_count: int,
    files_offset: int,
) -> dict[str, Any]:
    """One version's JSON from an ORM row or a Core row with the same column names."""
    return {
        "id": row.uid,
        "name": row.name,
        "dataset": {"id": dataset_uid, "name": dataset_name},
        "uri": f"dataset://{dataset_name}/{row.name}",
        "status": row.status,
        "properties": shown(row.properties, row.last_used),
        "tags": list(row.tags or []),
        "violations": list(row.violations or []),
        "aliases": names,
        "previous_version": base if base is None or isinstance(base, str) else base.uid,
        "files": files,
        "files_count": files_count,
        "files_offset": files_offset,
        "platform_id": row.platform_id,
        "ctime": iso(row.created_at),
        "mtime": iso(row.updated_at),
        "completed_at": iso(row.completed_at),
    }


def _files_of(
    session: Session, version_ids: Sequence[int], limit: int, offset: int
) -> dict[int, list[dict[str, Any]]]:
    if not version_ids or limit <= 0:
        return {}
    rank = (
        func.row_number()
        .over(partition_by=VersionFile.version_id, order_by=(Datum.path, Datum.execution))
        .label("rank")
    )
    ranked = (
        select(VersionFile.version_id, Datum.id.label("datum_id"), rank)
        .join(Datum, Datum.id == VersionFile.datum_id)
        .where(ids_in(VersionFile.version_id, version_ids, _dialect(session)))
        .subquery()
    )
    page = (
        select(ranked.c.version_id, Datum)
        .join(Datum, Datum.id == ranked.c.datum_id)
        .where(ranked.c.rank > offset, ranked.c.rank <= offset + limit)
        .order_by(ranked.c.version_id, ranked.c.rank)
    )
    pairs = session.execute(page).all()
    alias = datum_aliases_of(session, [d.id for _, d in pairs])
    out: dict[int, list[dict[str, Any]]] = {}
    for version_id, datum in pairs:
        out.setdefault(version_id, []).append(
            {
                "execution": datum.execution,
                "path": datum.path,
                "properties": datum.properties or {},
                "datum": datum_json(datum, alias.get(datum.id)),
            }
        )
    return out


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _file_counts(session: Session, version_ids: Sequence[int]) -> dict[int, int]:
    if not version_ids:
        return {}
    query = (
        select(VersionFile.version_id, func.count())
        .where(ids_in(VersionFile.version_id, version_ids, _dialect(session)))
        .group_by(VersionFile.version_id)
    )
    return {v: n for v, n in session.execute(query).all()}


def datum_aliases_of(session: Session, datum_ids: Sequence[int]) -> dict[int, str]:
    """The alias pointing at each datum that has one (an alias points at one datum at a time)."""
    if not datum_ids:
        return {}
    query = select(DatumAlias.datum_id, DatumAlias.name).where(DatumAlias.datum_id.in_(datum_ids))
    return {d: n for d, n in session.execute(query).all()}


# Datum keys that the datum object shows as fields of their own, not among its properties.
DATUM_FIELD_KEYS = ("valohai.tags", "valohai.alias")


def datum_json(row: Datum, alias: str | None = None) -> dict[str, Any]:
    """A datum as the platform shows one: `name` is its path in the execution's outputs folder."""
    properties = row.properties or {}
    tags = properties.get("valohai.tags")
    return {
        "id": row.uid,
        "name": row.path,
        "size": row.size,
        "md5": row.md5,
        "sha1": row.sha1,
        "sha256": row.sha256,
        "ctime": iso(row.created_at),
        "mtime": iso(row.updated_at),
        "uri": None,
        "purged": False,
        "output_execution": {"id": row.execution},
        "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
        "alias": alias,
        "properties": {k: v for k, v in properties.items() if k not in DATUM_FIELD_KEYS},
        "violations": list(row.violations or []),
    }


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC. SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None:
        return None
    return _aware(moment).astimezone(UTC).isoformat()


def history(
    session: Session, kind: str, owner_id: int, *, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """Changes to one dataset's or version's properties, oldest first."""
    where = (PropertyChange.owner_kind == kind, PropertyChange.owner_id == owner_id)
    count = session.scalar(select(func.count()).select_from(PropertyChange).where(*where)) or 0
    rows = session.scalars(
        select(PropertyChange).where(*where).order_by(PropertyChange.id).limit(limit).offset(offset)
    )
    return count, [
        {"key": r.key, "old": r.old, "new": r.new, "source": r.source, "changed_at": iso(r.changed_at)}
        for r in rows
    ]


def find_by_uri(session: Session, uri: str) -> tuple[str, int]:
    """(`dataset` or `version`, id) of `dataset://<name>` or `dataset://<name>/<version>`, where
    the version part may also be `latest` (the newest completed) or an alias (`aliases.resolve`)."""
    name, version = parse_uri(uri, allow_latest=True)
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFound(f"dataset://{name}")
    if version is None:
        return "dataset", dataset.id
    row = aliases.resolve(session, name, version)
    if row is None:
        raise NotFound(uri)
    return "version", row.id


def stale(session: Session, cutoff: datetime) -> list[dict[str, Any]]:
    """Datasets and versions not used since `cutoff` (never used: created before it)."""
    out: list[dict[str, Any]] = []
    owners: list[tuple[str, Any]] = [("dataset", Dataset), ("version", DatasetVersion)]
    for kind, model in owners:
        for row in session.scalars(select(model).order_by(model.id)):
            used = row.last_used
            when = _parse_time(used) if isinstance(used, str) else None
            reference = when or _aware(row.created_at)
            if reference < cutoff:
                uri = f"dataset://{row.name}" if kind == "dataset" else row.uri
                out.append({"kind": kind, "id": row.uid, "uri": uri, "last_used": used})
    return out


def _parse_time(text: str) -> datetime | None:
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- owners' rows by id (Core): what a rollback's plan and a bulk edit's batch read ---------------

_IDS: Any = bindparam("ids", expanding=True)
_DATASETS = cast(Table, Dataset.__table__)
_VERSIONS = cast(Table, DatasetVersion.__table__)
_DATUMS = cast(Table, Datum.__table__)
# Each kind's id, uid, staging names, status (versions) and properties, for the ids given, in id order.
OWNER_ROWS: dict[str, Any] = {
    "dataset": select(_DATASETS.c.id, _DATASETS.c.uid, _DATASETS.c.name, _DATASETS.c.properties)
    .where(_DATASETS.c.id.in_(_IDS))
    .order_by(_DATASETS.c.id),
    "version": select(
        _VERSIONS.c.id,
        _VERSIONS.c.uid,
        _VERSIONS.c.name,
        _VERSIONS.c.status,
        _VERSIONS.c.properties,
        _DATASETS.c.name.label("dataset"),
    )
    .join(_DATASETS, _DATASETS.c.id == _VERSIONS.c.dataset_id)
    .where(_VERSIONS.c.id.in_(_IDS))
    .order_by(_VERSIONS.c.id),
    "datum": select(_DATUMS.c.id, _DATUMS.c.uid, _DATUMS.c.execution, _DATUMS.c.path, _DATUMS.c.properties)
    .where(_DATUMS.c.id.in_(_IDS))
    .order_by(_DATUMS.c.id),
}
