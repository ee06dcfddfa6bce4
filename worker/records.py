"""Pure core: the bytes of one sidecar line (or an API write) become staged entries, or a reason why not.

No Redis, database or clock in here; the watcher, the API, replay and the tests all share it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat
from typing import Any, Literal

import orjson

from . import limits, schemas
from .errors import BadURI, InvalidEntry, ReservedKey
from .uris import LATEST, PART, Target, dataset_target, parse_uri, version_target

RESERVED_PREFIX = "valohai."
MAX_KEY_LENGTH = limits.KEY_MAX
MAX_DEPTH = 32
DATASET_VERSIONS_KEY = "valohai.dataset-versions"
_CONTAINERS = (dict, list)

Origin = Literal["sidecar", "api", "platform", "rollback", "bulk"]
Op = Literal["set", "member", "revert"]


# Source and Entry are plain slotted dataclasses, not frozen ones: ingest builds about three per
# line, and a frozen dataclass's __init__ (object.__setattr__ per field) takes four times as long.
# Nothing changes them after they are built.


@dataclass(slots=True)
class Source:
    """Where an entry came from: a sidecar line (execution, file, line, byte offset), an API call,
    a rollback (`execution`: the id rolled back; `id`: the rollback's own id), or a bulk edit
    (`id`: the edit's id; its filter is in its row, `bulk_edits`)."""

    origin: Origin
    execution: str = ""
    file: str = ""
    line: int = 0
    offset: int = 0
    id: str = ""

    def where(self) -> str:
        """Human form for rejects and logs: `file:line (offset N)`."""
        if self.origin != "sidecar":
            return self.origin
        return f"{self.file}:{self.line} (offset {self.offset})"


@dataclass(slots=True)
class Entry:
    """One staged change for one target.

    `set`: shallow-merge `metadata` into the target's properties (for an execution target, into the
    properties of the datum at `path`); a null value deletes the key.
    `member`: the datum (`source.execution`, `path`) joins the version `target`.
    `revert` (a rollback's): `metadata` maps each key to `[expected, value]`; a key is set to
    `value` (null deletes) only if it still holds `expected` (null: absent) when applied.
    """

    target: Target
    op: Op
    source: Source
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def to_json(self) -> bytes:
        # Built by hand: dataclasses.asdict would deep-copy every metadata dict (a fifth of ingest).
        # orjson writes the Source dataclass itself, field by field, in declaration order.
        return orjson.dumps(
            {
                "target": self.target.key,
                "op": self.op,
                "source": self.source,
                "metadata": self.metadata,
                "path": self.path,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Entry:
        data = orjson.loads(raw)
        return cls(
            target=Target.parse(data["target"]),
            op=data["op"],
            source=Source(**data["source"]),
            metadata=data["metadata"],
            path=data["path"],
        )


@dataclass(frozen=True)
class Reject:
    """A line that could not be staged, and why; never holds the line's content (it may hold secrets)."""

    file: str
    line: int
    offset: int
    reason: str
    execution: str = ""
    at: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)


@dataclass(slots=True)
class LineOutcome:
    """What one line of a file became: entries to stage, or a reject."""

    number: int
    digest: bytes
    entries: list[Entry] = field(default_factory=list)
    reject: Reject | None = None


def line_digest(data: bytes | None) -> bytes:
    """8-byte digest of a line's bytes (an over-long line, whose bytes were not kept, has a fixed one)."""
    return hashlib.blake2b(b"\x00over-long" if data is None else data, digest_size=8).digest()


def parse_line(raw: bytes, source: Source, problems: list[str] | None = None) -> list[Entry]:
    """Turn one line of `valohai.metadata.jsonl` into entries; raise InvalidEntry with the reason.

    A datum line yields a `set` on its execution plus one `member` per version it names. A bad
    `valohai.dataset-versions` item drops that item only: its reason goes to `problems` (the rest
    of the line is staged, and the caller rejects the line with those reasons). Without
    `problems`, such an item raises InvalidEntry like any other.
    """
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEntry(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidEntry(f"expected a JSON object, got {type(document).__name__}")
    _check_storable(raw, document)
    shallow = _shallow(raw)
    if "dataset-version" in document:
        return [_target_entry(document, "dataset-version", source, shallow)]
    if "dataset" in document:
        return [_target_entry(document, "dataset", source, shallow)]
    if "file" in document:
        schema_error = schemas.first_error("datum-line", document)
        if schema_error:
            raise InvalidEntry(schema_error)
        return datum_entries(
            document["file"], document["metadata"], source, shallow=shallow, problems=problems
        )
    raise InvalidEntry("line has none of the keys 'dataset', 'dataset-version' or 'file'")


def parse_datum_object(
    raw: bytes, path: str, source: Source, problems: list[str] | None = None
) -> list[Entry]:
    """Entries from a per-output `<path>.metadata.json` file holding that output's metadata
    (`problems` as for `parse_line`)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEntry(f"not JSON: {exc}") from None
    _check_storable(raw, document)
    wrapped = {"file": path, "metadata": document}
    schema_error = schemas.first_error("datum-line", wrapped)
    if schema_error:
        raise InvalidEntry(schema_error)
    return datum_entries(path, document, source, shallow=_shallow(raw), problems=problems)


def datum_entries(
    path: str,
    metadata: dict[str, Any],
    source: Source,
    *,
    shallow: bool = False,
    problems: list[str] | None = None,
) -> list[Entry]:
    """A datum's `set` entry and one `member` entry per version in `valohai.dataset-versions`.

    A member entry carries its item's options (`from`, `exclude`, ...) as its metadata, `{}` for
    a plain URI string. A bad item is left out, its reason appended to `problems` (raised as
    InvalidEntry when `problems` is None); the datum's properties are kept as written.
    """
    # The datum-line schema has already checked the key lengths (every caller validates first).
    problem = limits.datum_path_problem(path)
    if problem:
        raise InvalidEntry(problem)
    check_properties(metadata, allow_reserved=True, shallow=shallow, lengths_checked=True)
    entries = [Entry(Target.for_execution(source.execution), "set", source, metadata, path)]
    items = metadata.get(DATASET_VERSIONS_KEY)
    if items is None:
        return entries
    found: list[str] = []
    members = version_items(items, found)
    if found:
        if problems is None:
            raise InvalidEntry(found[0], DATASET_VERSIONS_KEY)
        problems.extend(found)
    entries.extend(Entry(target, "member", source, options, path) for target, options in members)
    return entries


def version_items(items: Any, problems: list[str]) -> list[tuple[Target, dict[str, Any]]]:
    """The versions a datum's `valohai.dataset-versions` names, each with its item's options.

    Checked here rather than in the schema, so that a bad item (reason appended to `problems`)
    costs only itself: the datum's other items and properties still go through. The first item
    naming a URI counts; a later one naming it again is ignored.
    """
    if not isinstance(items, list):
        problems.append(f"{DATASET_VERSIONS_KEY}: expected a list, got {_kind(items)}")
        return []
    out: dict[str, tuple[Target, dict[str, Any]]] = {}
    for i, item in enumerate(items):
        where = f"{DATASET_VERSIONS_KEY}[{i}]"
        try:
            target, options = _version_item(item, where)
        except InvalidEntry as exc:
            problems.append(str(exc))
            continue
        out.setdefault(target.key, (target, options))
    return list(out.values())


def _version_item(item: Any, where: str) -> tuple[Target, dict[str, Any]]:
    if isinstance(item, str):
        return _version(item, where), {}
    if not isinstance(item, dict):
        raise InvalidEntry(f"{where}: expected a version URI or an object with 'uri', got {_kind(item)}")
    if "uri" not in item:
        raise InvalidEntry(f"{where}: 'uri' is required")
    target = _version(item["uri"], f"{where}.uri")
    options: dict[str, Any] = {}
    if "from" in item:
        base = item["from"]
        if base is not None:
            _version_ref(base, f"{where}.from")
        options["from"] = base
    if "exclude" in item:
        exclude = item["exclude"]
        if not isinstance(exclude, list) or not all(isinstance(name, str) for name in exclude):
            raise InvalidEntry(f"{where}.exclude: expected a list of file names")
        options["exclude"] = exclude
    if "start_fresh" in item:
        if not isinstance(item["start_fresh"], bool):
            raise InvalidEntry(f"{where}.start_fresh: expected true or false")
        options["start_fresh"] = item["start_fresh"]
    if "targeting_aliases" in item:
        options["targeting_aliases"] = _alias_names(item["targeting_aliases"], f"{where}.targeting_aliases")
    if "packaging" in item:
        options["packaging"] = item["packaging"]  # kept, no effect
    return target, options


def _alias_names(names: Any, where: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InvalidEntry(f"{where}: expected a list of alias names")
    for name in names:
        problem = alias_name_problem(name)
        if problem:
            raise InvalidEntry(f"{where}: {problem}")
    return list(dict.fromkeys(names))


def alias_name_problem(name: str) -> str | None:
    """Why `name` cannot be a version alias (it must fit in `dataset://<name>/<alias>`), or None."""
    shown = name if len(name) <= 60 else name[:60] + "..."
    if name == LATEST:
        return "'latest' means the newest version and cannot be an alias"
    if not name or len(name) > limits.NAME_MAX or not PART.fullmatch(name):
        return (
            f"alias {shown!r} must be 1..{limits.NAME_MAX} letters, digits, '-', '_' or '.'"
            " (it is a part of a dataset:// URI)"
        )
    return None


def _version_ref(uri: Any, where: str) -> None:
    """`from`: a version, `latest` or an alias of a dataset (resolved when the version completes)."""
    try:
        _, version = parse_uri(uri, allow_latest=True)
    except BadURI as exc:
        raise InvalidEntry(f"{where}: {exc}") from None
    if version is None:
        raise InvalidEntry(f"{where}: expected dataset://<name>/<version>, 'latest' or an alias, or null")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def user_write(target: Target, metadata: Any, source: Source) -> Entry:
    """Validate an API write (a JSON object of properties) for a dataset or version target."""
    return Entry(target, "set", source, check_user_properties(metadata))


def check_user_properties(metadata: Any) -> dict[str, Any]:
    """A user's property set for a dataset or version (an API write, a bulk edit's `set`), or
    InvalidEntry naming what is wrong."""
    if not isinstance(metadata, dict):
        raise InvalidEntry("expected a JSON object of properties")
    check_properties(metadata)
    # Parsed by the stdlib, which reads NaN, huge integers and lone surrogates: check every value.
    problem = limits.value_problem(metadata)
    if problem:
        raise InvalidEntry(problem)
    return metadata


def check_properties(
    metadata: dict[str, Any],
    *,
    allow_reserved: bool = False,
    shallow: bool = False,
    lengths_checked: bool = False,
) -> None:
    """Refuse empty or over-long keys, over-deep values and (unless allowed) reserved keys.

    `shallow`: the caller knows no value can be too deep (see `_shallow`). `lengths_checked`: a
    schema (`properties.schema.json`'s `propertyNames`) has already checked the key lengths.
    The checks first run over all keys at C speed; only when one fails does the loop below find
    the first bad key, so the reason is the same as the loop alone would give.
    """
    if _looks_valid(metadata, allow_reserved, shallow, lengths_checked):
        return
    for key, value in metadata.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidEntry(f"key length must be 1..{MAX_KEY_LENGTH} characters", key)
        if not allow_reserved and key.startswith(RESERVED_PREFIX):
            raise ReservedKey(key)
        if type(value) in _CONTAINERS and _deeper_than(value, MAX_DEPTH):
            raise InvalidEntry(f"value of {key!r} is nested deeper than {MAX_DEPTH} levels", key)


def _looks_valid(
    metadata: dict[str, Any], allow_reserved: bool, shallow: bool, lengths_checked: bool
) -> bool:
    keys = metadata.keys()
    if not lengths_checked and keys and (min(map(len, keys)) < 1 or max(map(len, keys)) > MAX_KEY_LENGTH):
        return False
    if not allow_reserved and any(map(str.startswith, keys, repeat(RESERVED_PREFIX))):
        return False
    return shallow or not any(
        type(v) in _CONTAINERS and _deeper_than(v, MAX_DEPTH) for v in metadata.values()
    )


def _check_storable(raw: bytes, document: Any) -> None:
    """Refuse a line holding a string the database cannot store (NUL). orjson has already
    refused numbers beyond a double and lone surrogates; the byte test keeps this off the
    common path."""
    if limits.line_may_hold_nul(raw):
        problem = limits.value_problem(document)
        if problem:
            raise InvalidEntry(problem)


def _shallow(raw: bytes) -> bool:
    """True if no value in this JSON text can nest deeper than MAX_DEPTH: that takes more than
    MAX_DEPTH opening brackets (brackets inside strings only make the count safer)."""
    return raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH


def _target_entry(document: dict[str, Any], kind: str, source: Source, shallow: bool) -> Entry:
    schema_name = "dataset-version-line" if kind == "dataset-version" else "dataset-line"
    uri = document.get(kind)
    # Parse the URI first so that a malformed one gets its own precise reason.
    target = _version(uri) if kind == "dataset-version" else _dataset(uri)
    schema_error = schemas.first_error(schema_name, document)
    if schema_error:
        raise InvalidEntry(schema_error)
    metadata = document["metadata"]
    check_properties(metadata, shallow=shallow, lengths_checked=True)  # by the schema, above
    return Entry(target, "set", source, metadata)


@lru_cache(maxsize=4096)
def _version_of(uri: str) -> Target:
    return version_target(uri)  # a BadURI is not cached: it raises through lru_cache


def _version(uri: Any, where: str = "") -> Target:
    try:
        # Datum lines name the same few versions over and over.
        return _version_of(uri) if isinstance(uri, str) else version_target(uri)
    except BadURI as exc:
        raise InvalidEntry(f"{where}: {exc}" if where else str(exc)) from None


def _dataset(uri: Any) -> Target:
    try:
        return dataset_target(uri)
    except BadURI as exc:
        raise InvalidEntry(str(exc)) from None


def _deeper_than(value: Any, limit: int) -> bool:
    """True if a JSON value nests deeper than `limit` (scalars are 0 deep). Recursion stops at
    `limit`, so deep input cannot blow the stack; most values are scalars and return at once."""
    kind = type(value)
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:
        return False
    return limit < 1 or any(_deeper_than(child, limit - 1) for child in children)
