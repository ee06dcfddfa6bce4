"""Exports of a filtered list (datasets, versions or datums) as CSV, JSON Lines or Parquet, streamed.

Rows are read in batches by id (keyset: each batch is `id > last`, a short read of its own), so
an export of a million rows holds one batch in memory and no long transaction, and each batch is
encoded and handed to the client before the next is read.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal, cast

import orjson
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, joinedload

from ..datum_keys import TAGS_KEY
from .datums import DatumQuery, datum_where
from .facets import key_counts
from .models import Dataset, DatasetVersion, Datum
from .queries import DATUM_FIELD_KEYS, iso, narrow, version_names
from .search import OwnerKind
from .sets import Ask, owner_ids

Format = Literal["csv", "jsonl", "parquet"]
BATCH = 1000
MAX_COLUMNS = 1000  # property columns of a CSV or Parquet export when none are named
MEDIA = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}


@dataclass(frozen=True)
class Export:
    """What to export: a kind, the list's names and filter, the format and property columns."""

    kind: OwnerKind
    ask: Ask
    format: Format
    columns: tuple[str, ...] = ()


def fields(kind: str) -> tuple[str, ...]:
    """The object fields that lead every row, before the properties."""
    if kind == "dataset":
        return ("id", "name", "uri", "ctime", "mtime")
    if kind == "datum":
        return ("id", "name", "execution", "size", "sha256", "tags", "ctime", "mtime")
    return ("id", "name", "dataset", "uri", "status", "ctime", "mtime", "completed_at")


def columns_of(engine: Engine, job: Export) -> tuple[str, ...]:
    """The property columns: the ones asked for, else every top-level key of the set."""
    if job.columns:
        return job.columns
    with Session(engine) as session:
        owners = owner_ids(session, job.kind, job.ask)
        if owners is False:
            return ()
        found = key_counts(session, job.kind, owners)
    # A datum's tags and alias are fields of the datum API's answer (`tags` leads each row here),
    # not properties: no column of their own.
    hidden = DATUM_FIELD_KEYS if job.kind == "datum" else ()
    top = (e["path"][0] for e in found if len(e["path"]) == 1 and e["path"][0] not in hidden)
    return tuple(top)[:MAX_COLUMNS]


_MODELS: dict[str, Any] = {"dataset": Dataset, "version": DatasetVersion, "datum": Datum}


def _batch_query(session: Session, job: Export, last: int) -> tuple[Any, Any]:
    """The rows after id `last` that the list's exact matches leave, and their ids when those
    matches narrow the set (None: every row of the kind, before the filter)."""
    ask = job.ask
    if job.kind == "version":
        assert not isinstance(ask, DatumQuery)
        query = (
            select(DatasetVersion)
            .join(Dataset)
            .where(*version_names(ask), DatasetVersion.id > last)
            .options(joinedload(DatasetVersion.dataset))
        )
        if not (ask.name or ask.dataset):
            return query, None
        named = [*version_names(ask), DatasetVersion.id > last]
        return query, select(DatasetVersion.id).join(Dataset).where(*named)
    if job.kind == "datum":
        assert isinstance(ask, DatumQuery)
        where = datum_where(ask, session.get_bind().dialect.name)
        rows = select(Datum).where(*where, Datum.id > last)
        return rows, select(Datum.id).where(*where, Datum.id > last) if where else None
    assert not isinstance(ask, DatumQuery)
    if ask.name is None:
        return select(Dataset).where(Dataset.id > last), None
    named = [Dataset.name == ask.name, Dataset.id > last]
    return select(Dataset).where(*named), select(Dataset.id).where(*named)


def records(engine: Engine, job: Export) -> Iterator[list[dict[str, Any]]]:
    """The rows of the set, in id order, a batch at a time: fields and the whole property set.

    Each batch is read in its own session, closed before the batch is yielded: the consumer
    writes it to a client at the client's pace, and a transaction (with its connection) held
    across that would last as long as the slowest reader, or for ever if the stream is
    abandoned mid-way (an idle-in-transaction connection holding locks on PostgreSQL)."""
    model = _MODELS[job.kind]
    last = 0
    while True:
        with Session(engine) as session:
            query, ids = _batch_query(session, job, last)
            query = narrow(session, query, ids, job.ask.filter, job.kind, model.id)
            if query is None:
                return
            rows = session.scalars(query.order_by(model.id).limit(BATCH)).unique().all()
            if not rows:
                return
            last = rows[-1].id
            batch = [_record(job.kind, row) for row in rows]
        yield batch


def _record(kind: str, row: Any) -> dict[str, Any]:
    if kind == "datum":
        # As the datum API shows one: `name` is its path; its tags are a field, not properties.
        properties = row.properties or {}
        tags = properties.get(TAGS_KEY)
        return {
            "id": row.uid,
            "name": row.path,
            "execution": row.execution,
            "size": row.size,
            "sha256": row.sha256,
            "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
            "ctime": iso(row.created_at),
            "mtime": iso(row.updated_at),
            "properties": {k: v for k, v in properties.items() if k not in DATUM_FIELD_KEYS},
        }
    out: dict[str, Any] = {"id": row.uid, "name": row.name}
    if kind == "version":
        out.update(dataset=row.dataset.name, uri=row.uri, status=row.status)
    else:
        out["uri"] = f"dataset://{row.name}"
    out.update(ctime=iso(row.created_at), mtime=iso(row.updated_at))
    if kind == "version":
        out["completed_at"] = iso(row.completed_at)
    out["properties"] = row.shown_properties
    return out


def stream(engine: Engine, job: Export) -> Iterator[bytes]:
    """The export's bytes, batch by batch."""
    for chunk, _ in stream_counted(engine, job):
        yield chunk


def stream_counted(engine: Engine, job: Export) -> Iterator[tuple[bytes, int]]:
    """The export's bytes, batch by batch, each with the number of rows sent so far."""
    columns = columns_of(engine, job) if job.format != "jsonl" else job.columns
    sent = [0]

    def counted() -> Iterator[list[dict[str, Any]]]:
        for batch in records(engine, job):
            yield batch
            sent[0] += len(batch)

    batches = counted()
    if job.format == "jsonl":
        chunks = _jsonl(batches, columns)
    elif job.format == "csv":
        chunks = _csv(batches, fields(job.kind), columns)
    else:
        chunks = _parquet(engine, job, batches, columns)
    for chunk in chunks:
        yield chunk, sent[0]


def _jsonl(batches: Iterator[list[dict[str, Any]]], columns: Sequence[str]) -> Iterator[bytes]:
    for batch in batches:
        lines = []
        for record in batch:
            if columns:
                props = record["properties"]
                record["properties"] = {k: props[k] for k in columns if k in props}
            lines.append(orjson.dumps(record))
        yield b"\n".join(lines) + b"\n"


def _cell(value: Any) -> str:
    """A CSV cell: strings as they are, numbers and booleans as JSON, nested values as JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _csv(
    batches: Iterator[list[dict[str, Any]]], head: Sequence[str], columns: Sequence[str]
) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*head, *columns])
    for batch in batches:
        for record in batch:
            props = record["properties"]
            writer.writerow([*(_cell(record[f]) for f in head), *(_cell(props.get(k)) for k in columns)])
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    rest = buffer.getvalue()
    if rest:
        yield rest.encode()


class _Sink(io.RawIOBase):
    """Collects what pyarrow writes, so each row group can be sent as soon as it is written."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.chunks.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks = []
        return out


def _parquet(
    engine: Engine, job: Export, batches: Iterator[list[dict[str, Any]]], columns: Sequence[str]
) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = _column_types(engine, job, columns)
    arrow = {"number": pa.float64(), "string": pa.string(), "boolean": pa.bool_(), "json": pa.string()}
    head = fields(job.kind)
    field_types = {"size": pa.int64(), "tags": pa.list_(pa.string())}
    schema = pa.schema(
        [pa.field(f, field_types.get(f, pa.string())) for f in head]
        + [pa.field(f"properties.{c}", arrow[types[c]]) for c in columns]
    )
    sink = _Sink()
    # Any file-like object with write() does (pyarrow wraps it); the stubs name only IO.
    with pq.ParquetWriter(cast(IO[bytes], sink), schema) as writer:
        for batch in batches:
            data: dict[str, list[Any]] = {f: [r[f] for r in batch] for f in head}
            for c in columns:
                values = [r["properties"].get(c) for r in batch]
                if types[c] == "json":
                    data[f"properties.{c}"] = [
                        None if v is None else orjson.dumps(v).decode() for v in values
                    ]
                elif types[c] == "number":
                    # Doubles, as the index keeps them: pyarrow refuses an int past 2**53 for a
                    # double column (the export broke off there), float() rounds it as the index does.
                    data[f"properties.{c}"] = [
                        float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
                        for v in values
                    ]
                else:
                    data[f"properties.{c}"] = values
            writer.write_table(pa.table(data, schema=schema))
            yield sink.take()
    yield sink.take()


def _column_types(engine: Engine, job: Export, columns: Sequence[str]) -> dict[str, str]:
    """A column's Parquet type: the one JSON type every value of the key has in the set (numbers
    as doubles, as the index keeps them); a key of mixed or nested types is JSON text."""
    with Session(engine) as session:
        owners = owner_ids(session, job.kind, job.ask)
        found = (
            {}
            if owners is False
            else {tuple(e["path"]): e["types"] for e in key_counts(session, job.kind, owners)}
        )
    out = {}
    for c in columns:
        kinds = set(found.get((c,), {}))
        out[c] = kinds.pop() if len(kinds) == 1 and kinds <= {"number", "string", "boolean"} else "json"
    return out
