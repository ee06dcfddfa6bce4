"""Bulk edits by filter: check a request, preview it (a dry run), run it batch by batch.

An edit sets the same keys (null deletes) on every owner its filter matches. Each batch's
owners get it as one entry on their own staging streams, as API writes do, so the edit is
ordered after every line staged before it and a version still building keeps it staged until
it completes. The batch's completed targets are then applied in one transaction (`apply`:
the apply task's, which splits out a target that fails alone), and the edit's cursor moves
past the batch. History names the edit: `{"origin": "bulk", "id": ..., "filter": ...}`, and
`made_by` is its id, so `sidecar rollback --execution <bulk id>` undoes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .errors import InvalidEntry
from .merge import same_json
from .query import MAX_LENGTH as MAX_FILTER
from .query import parse
from .records import Entry, Source, check_user_properties
from .staging import RedisError, Staging
from .store import bulk as store_bulk
from .store import datums, definitions, sets
from .store.models import BulkEdit
from .store.search import OwnerKind
from .uris import Target

log = logging.getLogger(__name__)
PREVIEW = 100  # owners a dry run shows the changes of

Apply = Callable[[list[Target]], Any]
Progress = Callable[[BulkEdit], None]


class NeedsConfirm(InvalidEntry):
    """An edit matching more owners than the limit, without `"confirm": <that count>`."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"the filter matches {count} targets, more than the limit of {limit} "
            f'(SIDECAR_BULK_LIMIT): send "confirm": {count} to edit them all',
            "confirm",
        )
        self.count = count
        self.limit = limit

    def __reduce__(self) -> tuple[type[NeedsConfirm], tuple[int, int]]:
        return (NeedsConfirm, (self.count, self.limit))


@dataclass(frozen=True)
class Request:
    """A bulk edit as asked: the owners' kind, the filter, the keys to set, and the options."""

    kind: OwnerKind
    filter: str
    changes: dict[str, Any]
    dry_run: bool = False
    confirm: int | None = None


def checked(kind: OwnerKind, body: Any) -> Request:
    """The request in a body `{"filter", "set", "dry_run", "confirm"}`; InvalidEntry naming the
    field that is wrong (FilterError, with its position, for a filter that does not parse)."""
    if not isinstance(body, dict):
        raise InvalidEntry('expected {"filter": "<expression>", "set": {...}}')
    unknown = sorted(set(body) - {"filter", "set", "dry_run", "confirm"})
    if unknown:
        raise InvalidEntry(f"unknown field {unknown[0]!r}", unknown[0])
    text = body.get("filter")
    if not isinstance(text, str) or not text.strip():
        # `{"set": ...}` alone would edit every owner: the filter must say which.
        raise InvalidEntry("filter: a filter expression is required (it names the targets to edit)", "filter")
    if len(text) > MAX_FILTER:
        raise InvalidEntry(f"filter: at most {MAX_FILTER} characters", "filter")
    parse(text)
    changes = body.get("set")
    if not isinstance(changes, dict) or not changes:
        raise InvalidEntry("set: an object of at least one key (null deletes the key)", "set")
    if kind == "datum":
        datums.check_datum_write(changes)
    else:
        check_user_properties(changes)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidEntry("dry_run: true or false", "dry_run")
    confirm = body.get("confirm")
    if isinstance(confirm, float) and confirm.is_integer():
        confirm = int(confirm)  # 3.0 is an integer to JSON
    if confirm is not None and (isinstance(confirm, bool) or not isinstance(confirm, int)):
        raise InvalidEntry("confirm: the number of targets the filter matches", "confirm")
    return Request(kind, text, changes, dry_run, confirm)


def changes_of(properties: dict[str, Any], changes: dict[str, Any]) -> list[dict[str, Any]]:
    """The keys `changes` would change on an owner holding `properties`: key, old, new (None:
    absent / deleted), in the order of `changes`."""
    out = []
    for key, new in changes.items():
        old = properties.get(key)
        if (new is None and key not in properties) or (key in properties and same_json(old, new)):
            continue
        out.append({"key": key, "old": old, "new": new})
    return out


def count(engine: Engine, request: Request) -> int:
    with Session(engine) as session:
        return sets.count(session, request.kind, store_bulk.ask_of(request.kind, request.filter))


def preview(engine: Engine, request: Request, limit: int) -> dict[str, Any]:
    """A dry run: how many owners match, and what the edit would change on the first `PREVIEW`."""
    total = count(engine, request)
    with Session(engine) as session:
        first = store_bulk.matched(session, request.kind, request.filter, 0, PREVIEW)
    return {
        "dry_run": True,
        "kind": request.kind,
        "filter": request.filter,
        "set": request.changes,
        "count": total,
        "limit": limit,
        "needs_confirm": total > limit,
        "targets": [
            {
                "id": o.uid,
                "target": o.target.key,
                **({"path": o.path} if o.kind == "datum" else {}),
                "building": not o.completed,
                "changes": changes_of(o.properties, request.changes),
            }
            for o in first
        ],
    }


def create(engine: Engine, request: Request, limit: int) -> str:
    """Record a bulk edit to run (its id); NeedsConfirm past the limit without the count, and
    a 400 before anything if a `reject` definition refuses one of its values."""
    definitions.refuse_rejected(engine, request.kind, request.changes)
    total = count(engine, request)
    if total > limit and request.confirm != total:
        raise NeedsConfirm(total, limit)
    return store_bulk.create(engine, request.kind, request.filter, request.changes, total)


def run(
    engine: Engine,
    staging: Staging,
    ident: str,
    apply: Apply,
    *,
    batch: int = 250,
    seconds: float | None = None,
    progress: Progress | None = None,
) -> BulkEdit:
    """Run (or resume, at its cursor) the bulk edit `ident`, batch by batch; with `seconds`,
    stop after the batch that passes that long (the caller sends the rest on, so that one large
    edit does not hold a worker from the applies queued behind it). Its row, as it stands."""
    edit = store_bulk.load(engine, ident)
    if edit.state in ("done", "failed"):
        return edit
    store_bulk.start(engine, ident)
    source = Source("bulk", id=ident)
    kind = cast(OwnerKind, edit.kind)
    after, started = edit.after_id, time.monotonic()
    while True:
        with Session(engine) as session:
            owners = store_bulk.matched(session, kind, edit.filter, after, batch)
        if not owners:
            store_bulk.finish(engine, ident, "done")
            break
        entries = [Entry(o.target, "set", source, edit.changes, o.path) for o in owners]
        applied, staged = _edit_batch(engine, staging, owners, entries, apply)
        after = owners[-1].id
        store_bulk.advance(engine, ident, after, len(owners), applied, staged)
        if progress is not None:
            progress(store_bulk.load(engine, ident))
        if seconds is not None and time.monotonic() - started >= seconds:
            break
    edit = store_bulk.load(engine, ident)
    if progress is not None and edit.state == "done":
        progress(edit)
    return edit


def _edit_batch(
    engine: Engine,
    staging: Staging,
    owners: list[store_bulk.Matched],
    entries: list[Entry],
    apply: Apply,
) -> tuple[int, int]:
    """Stage the edit on each owner's stream and apply the completed ones: (owners applied at
    once, owners left staged until they complete)."""
    direct: list[Entry] = []
    staged: list[tuple[store_bulk.Matched, Entry]] = []
    done_flags = staging.done_flags([o.target for o in owners]) if owners[0].kind == "datum" else None
    for i, (owner, entry) in enumerate(zip(owners, entries, strict=True)):
        if done_flags is not None and owner.completed and not done_flags[i]:
            # The execution's staging state left Redis (retention): nothing is staged to keep
            # order with, and a stream made again would outlive retention. Written directly,
            # under its watermark lock, as API datum writes are.
            direct.append(entry)
        else:
            staged.append((owner, entry))
    replies = staging.stage_writes([e for _, e in staged])
    due: dict[str, Target] = {}
    applied, left = len(direct), 0
    for (owner, _), (_, done) in zip(staged, replies, strict=True):
        if owner.kind == "dataset" or done or (owner.kind == "version" and owner.completed):
            due[owner.target.key] = owner.target
            applied += 1
        else:
            left += 1  # building: applied when it completes, after what was staged before it
    try:
        if direct:
            datums.write_directly(engine, *direct)
        targets = list(due.values())
        if targets:
            staging.make_due(targets)  # a process dying before the apply leaves them to the sweep
            apply(targets)
    except Exception:
        # Nothing of the batch's apply committed (it is one transaction; a target failing
        # alone is handled inside `apply`): take the staged entries back, so that the resumed
        # edit, which stages this batch again, does not leave a second copy behind.
        for (_, entry), (stream_id, _) in zip(staged, replies, strict=True):
            try:
                staging.withdraw(entry.target, stream_id)
            except RedisError as exc:
                log.warning("could not take back a bulk edit's entry on %s: %s", entry.target.key, exc)
        raise
    return applied, left
