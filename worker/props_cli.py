"""The data commands of the CLI: `sidecar props` (`--filter`: a bulk edit), `query`, `history`,
`stale`, `rollback`.

They work on the same database and Redis as a running `sidecar up` (same --data-dir), through the
same functions the HTTP API uses.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from . import bulk, connections
from .applying import roll_back, rollback_json, write_datum_properties, write_properties
from .datum_keys import alias_name
from .errors import ConfigError, InvalidEntry
from .settings import Settings
from .store import bulk as store_bulk
from .store import datums, queries
from .store.models import BulkEdit
from .store.search import OwnerKind

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses as JSON, else the plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidEntry(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w`."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ConfigError("--unused-for", f"{text!r} is not a duration like 30d, 12h, 90m")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


@contextmanager
def _engine(settings: Settings) -> Iterator[Engine]:
    """The database for one command, closed when it is done."""
    engine = connections.engine(settings)
    try:
        yield engine
    finally:
        engine.dispose()


def cmd_props(settings: Settings, args: argparse.Namespace) -> int:
    with _engine(settings) as engine:
        return _props(settings, engine, args)


def _props(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    if getattr(args, "filter", None) is not None:
        return _bulk_props(settings, engine, args)
    if args.uri is None:
        raise InvalidEntry("name a dataset://, dataset://<name>/<version> or datum:// URI, or give --filter")
    if args.action != "get" and not args.items:
        raise InvalidEntry("name at least one key")
    alias = alias_name(args.uri)
    if alias is not None:
        return _datum_props(settings, engine, args, alias)
    with Session(engine) as session:
        kind, owner_id = queries.find_by_uri(session, args.uri)
    if args.action == "get":
        with Session(engine) as session:
            owner = (
                queries.get_dataset(session, owner_id)
                if kind == "dataset"
                else queries.get_version(session, owner_id)
            )
            _print_json(owner.shown_properties)
        return 0
    changes = _changes(args)
    staging = connections.staging(settings)
    try:
        result = write_properties(engine, staging, kind, owner_id, changes)
    finally:
        staging.close()
    _print_json(result.properties)
    if result.staged:
        print("(the version is still building: the change is staged and applied at completion)")
    return 0


def _datum_props(settings: Settings, engine: Engine, args: argparse.Namespace, alias: str) -> int:
    """`props` on `datum://<alias>`: the datum the alias points at now."""
    with Session(engine) as session:
        row = datums.resolve_alias(session, alias)
        datum_id, properties = row.id, dict(row.properties or {})
    if args.action == "get":
        _print_json(properties)
        return 0
    changes = _changes(args)
    staging = connections.staging(settings)
    try:
        result = write_datum_properties(engine, staging, datum_id, changes)
    finally:
        staging.close()
    _print_json(result.properties)
    if result.staged:
        print("(its execution is still running: the change is staged and applied at completion)")
    return 0


def _changes(args: argparse.Namespace, items: Sequence[str] | None = None) -> dict[str, Any]:
    items = args.items if items is None else items
    set_ = args.action == "set"
    changes = dict(parse_assignment(a) for a in items) if set_ else dict.fromkeys(items)
    if not changes:
        raise InvalidEntry("name at least one key")
    return changes


def _bulk_props(settings: Settings, engine: Engine, args: argparse.Namespace) -> int:
    """`props set|unset --filter EXPR key=value ...`: a bulk edit of every dataset, version (the
    default) or datum the filter matches, run here batch by batch with a progress bar (a target
    whose apply fails alone is left to the workers, as their batches leave it)."""
    from .tasks import make_app, run_batch  # Celery only for this command

    kind: OwnerKind = "dataset" if args.datasets else "datum" if args.data else "version"
    body: dict[str, Any] = {
        "filter": args.filter,
        "set": _changes(args, [a for a in (args.uri, *args.items) if a]),
    }
    body["dry_run"] = args.dry_run
    if args.confirm is not None:
        body["confirm"] = args.confirm
    asked = bulk.checked(kind, body)
    if asked.dry_run:
        preview = bulk.preview(engine, asked, settings.bulk_limit)
        if args.json:
            _print_json(preview)
            return 0
        for target in preview["targets"]:
            where = target["target"] + (f" {target['path']}" if "path" in target else "")
            said = ", ".join(
                f"{c['key']}: {_short(c['old'])} -> {_short(c['new'])}" for c in target["changes"]
            )
            print(f"{where}  {said or '(no change)'}{'  [building]' if target['building'] else ''}")
        shown = len(preview["targets"])
        print(
            f"{preview['count']} matching"
            + (f", the first {shown} shown" if preview["count"] > shown else "")
        )
        if preview["needs_confirm"]:
            limit, found = settings.bulk_limit, preview["count"]
            print(f"more than SIDECAR_BULK_LIMIT ({limit}): run it with --confirm {found}")
        return 0
    ident = bulk.create(engine, asked, settings.bulk_limit)
    staging = connections.staging(settings)
    app = make_app(settings)
    try:
        edit = bulk.run(
            engine,
            staging,
            ident,
            lambda targets: run_batch(app, settings, engine, staging, targets),
            batch=settings.apply_batch,
            progress=_bar(),
        )
    finally:
        staging.close()
    answer = store_bulk.edit_json(edit)
    if args.json:
        _print_json(answer)
    else:
        print(
            f"bulk edit {ident}: {edit.done} of {edit.total} targets, {edit.applied} changed now, "
            f"{edit.staged} staged until they complete"
        )
    return 0 if edit.state == "done" else 1


def _bar(stream: TextIO = sys.stderr) -> bulk.Progress | None:
    """A one-line progress bar on a terminal; None when not on one."""
    if not stream.isatty():
        return None

    def show(edit: BulkEdit) -> None:
        width = 30
        filled = width * edit.done // max(edit.total, 1)
        stream.write(
            f"\r[{'#' * min(filled, width)}{'.' * max(width - filled, 0)}] {edit.done}/{edit.total} targets"
        )
        if edit.state == "done":
            stream.write("\n")
        stream.flush()

    return show


def cmd_query(settings: Settings, args: argparse.Namespace) -> int:
    ask = queries.ListQuery(filter=args.expr, ordering=args.ordering, limit=args.limit)
    with _engine(settings) as engine, Session(engine) as session:
        if args.versions:
            count, versions = queries.list_versions(session, ask)
            rows = [{"uri": v.uri, "status": v.status, "properties": v.shown_properties} for v in versions]
        else:
            count, datasets = queries.list_datasets(session, ask)
            rows = [{"uri": f"dataset://{d.name}", "properties": d.shown_properties} for d in datasets]
    if args.json:
        _print_json({"count": count, "results": rows})
        return 0
    _print_table(rows)
    print(f"{count} matching" + (f", {len(rows)} shown" if count > len(rows) else ""))
    return 0


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    with _engine(settings) as engine, Session(engine) as session:
        alias = alias_name(args.uri)
        if alias is not None:
            kind, owner_id = "datum", datums.resolve_alias(session, alias).id
        else:
            kind, owner_id = queries.find_by_uri(session, args.uri)
        _, changes = queries.history(session, kind, owner_id, limit=args.limit, offset=0)
    if args.json:
        _print_json(changes)
        return 0
    for c in changes:
        change = f"{c['key']}: {_short(c['old'])} -> {_short(c['new'])}"
        print(f"{c['changed_at']}  {change}  [{_source(c['source'])}]")
    if not changes:
        print("no changes recorded")
    return 0


def cmd_stale(settings: Settings, args: argparse.Namespace) -> int:
    cutoff = datetime.now(UTC) - parse_duration(args.unused_for)
    with _engine(settings) as engine, Session(engine) as session:
        rows = queries.stale(session, cutoff)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        print(f"{r['kind']:8} {r['uri']}  last used: {r['last_used'] or 'never'}")
    print(f"{len(rows)} not used for {args.unused_for}")
    return 0


def add_commands(sub: Any, common: Any) -> None:
    """Register the data commands on the `sidecar` parser."""
    props = sub.add_parser("props", help="get, set or unset properties of a dataset, version or datum")
    actions = props.add_subparsers(title="actions", dest="action", required=True)
    for action, help_text, items in (
        ("get", "print the properties as JSON", None),
        ("set", "set key=value ... (values are JSON when they parse, else strings)", "key=value"),
        ("unset", "remove keys", "key"),
    ):
        p = actions.add_parser(action, help=help_text, description=help_text)
        common(p)
        p.add_argument(
            "uri",
            nargs="?" if items else None,
            help="dataset://<name>, dataset://<name>/<version> or datum://<alias> (with --filter: the first "
            + (items or "key")
            + ")",
        )
        if items:
            p.add_argument("items", nargs="*", metavar=items)
            _bulk_flags(p)
        p.set_defaults(run=cmd_props)
    query = sub.add_parser("query", help="search datasets (or versions) by property values")
    common(query)
    query.add_argument("expr", help="a filter, e.g. 'domain = \"manufacturing\" and defect_rate < 0.01'")
    query.add_argument("--versions", action="store_true", help="search dataset versions")
    query.add_argument("--ordering", help="sort by a property key; -key for descending")
    query.add_argument("--limit", type=int, default=100)
    query.add_argument("--json", action="store_true")
    query.set_defaults(run=cmd_query)
    history = sub.add_parser("history", help="changes to the properties of a dataset or version")
    common(history)
    history.add_argument("uri")
    history.add_argument("--limit", type=int, default=1000)
    history.add_argument("--json", action="store_true")
    history.set_defaults(run=cmd_history)
    stale = sub.add_parser("stale", help="datasets and versions not used for a while")
    common(stale)
    stale.add_argument("--unused-for", default="30d", help="a duration: 30d, 12h, 2w [30d]")
    stale.add_argument("--json", action="store_true")
    stale.set_defaults(run=cmd_stale)
    rollback = sub.add_parser(
        "rollback",
        help="revert the property changes of one execution (or undo a rollback)",
        description="Revert every property change an execution's lines made, unless another source "
        "changed the key later (a conflict, left as it is). Give a rollback's id to undo it.",
    )
    common(rollback)
    rollback.add_argument(
        "--execution", required=True, metavar="ID", help="an execution's id, or a rollback's"
    )
    rollback.add_argument("--dry-run", action="store_true", help="say what would be reverted; change nothing")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(run=cmd_rollback)


def _bulk_flags(p: Any) -> None:
    p.add_argument("--filter", metavar="EXPR", help="edit every target this filter matches (a bulk edit)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--datasets", action="store_true", help="with --filter: datasets [versions]")
    which.add_argument("--data", action="store_true", help="with --filter: datums [versions]")
    p.add_argument(
        "--dry-run", action="store_true", help="with --filter: say what would change; change nothing"
    )
    p.add_argument(
        "--confirm", type=int, metavar="N", help="with --filter: the count, past SIDECAR_BULK_LIMIT"
    )
    p.add_argument("--json", action="store_true", help="with --filter: the answer as JSON")


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    """`sidecar rollback --execution ID [--dry-run]`: a line per key, then what was done.
    An unknown id is NotFound (exit 1)."""
    with _engine(settings) as engine:
        staging = connections.staging(settings)
        try:
            answer = rollback_json(roll_back(engine, staging, args.execution, dry_run=args.dry_run))
        finally:
            staging.close()
    if args.json:
        _print_json(answer)
        return 0
    for owner in answer["owners"]:
        where = owner["target"] + (f" {owner['path']}" if owner["path"] else "")
        for r in owner["reverted"]:
            print(f"{where}: {r['key']}: {_short(r['old'])} -> {_short(r['new'])}")  # - : absent
        for c in owner["conflicts"]:
            print(f"{where}: {c['key']}: left as it is ({c['reason']})")
    verb = "would revert" if args.dry_run else "reverted"
    tail = f"; undo it with: sidecar rollback --execution {answer['id']}" if answer["id"] else ""
    print(f"{verb} {answer['reverted']} keys, {answer['conflicts']} conflicts (left as they are){tail}")
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False))


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One row per target: its URI, (status), then each property as key=value."""
    for row in rows:
        props = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in row["properties"].items())
        status = f" ({row['status']})" if "status" in row else ""
        print(f"{row['uri']}{status}  {props}")


def _short(value: Any) -> str:
    text = "-" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _source(source: dict[str, Any]) -> str:
    if source.get("origin") == "sidecar":
        return f"{source['file']}:{source['line']}"
    if source.get("origin") == "rollback":
        return f"rollback {source.get('id')} of {source.get('execution')}"
    if source.get("origin") == "bulk":
        return f"bulk edit {source.get('id')} ({source.get('filter')})"
    return str(source.get("origin"))
