"""`sidecar definitions apply FILE.yaml [--dry-run]`, `sidecar definitions export`, `sidecar
definitions recheck`, and `sidecar check`, which lists what breaks the definitions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session

from .definitions import Definition, parse
from .errors import BadDefinition, ConfigError, InvalidEntry
from .query import FilterError
from .settings import Settings
from .store import definitions as stored
from .store import queries
from .store.datums import DatumQuery, list_datums
from .store.db import make_engine
from .tasks import make_app, send_recheck


def read_file(path: str) -> list[Definition]:
    """Every definition of a YAML (or JSON) file: a list, or `{definitions: [...]}`. InvalidEntry
    naming the file, the item and the field of the first that is wrong."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidEntry(f"{path}: cannot read it: {exc}") from None
    items = loaded.get("definitions") if isinstance(loaded, dict) else loaded
    if not isinstance(items, list):
        raise InvalidEntry(f"{path}: expected a list of definitions (or `definitions:` holding one)")
    found: dict[str, Definition] = {}
    for i, item in enumerate(items):
        try:
            definition = parse(item)
        except BadDefinition as exc:
            raise InvalidEntry(f"{path}: definitions[{i}].{exc}", exc.field) from None
        if definition.key in found:
            raise InvalidEntry(f"{path}: definitions[{i}].key: {definition.key!r} is defined twice", "key")
        found[definition.key] = definition
    return list(found.values())


def cmd_apply(settings: Settings, args: argparse.Namespace) -> int:
    definitions = read_file(args.file)
    engine = make_engine(settings.effective_database_url)
    try:
        planned = stored.apply_definitions(engine, definitions, dry_run=args.dry_run)
    finally:
        engine.dispose()
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    for step in planned:
        counts[step.action] += 1
        if step.action != "unchanged":
            print(f"  {'+' if step.action == 'added' else '~'} {step.key}")
    verb = "would be" if args.dry_run else "were"
    print(f"{counts['added']} added, {counts['changed']} changed, {counts['unchanged']} unchanged ({verb})")
    if not args.dry_run and (counts["added"] or counts["changed"]):
        _ask_recheck(settings)
    return 0


def _ask_recheck(settings: Settings) -> None:
    """The change is committed whatever happens here; without a broker the re-check waits (it is
    pending in `sidecar status`) for a worker or for `sidecar definitions recheck`."""
    try:
        sent = send_recheck(make_app(settings))
    except ConfigError as exc:
        print(f"no broker to ask a worker ({exc}); run `sidecar definitions recheck`", file=sys.stderr)
        return
    if sent:
        print("existing datasets, versions and datums are re-checked in the background (`sidecar status`)")


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.effective_database_url)
    try:
        found = [_exported(d) for d in stored.listed(engine)]
    finally:
        engine.dispose()
    text = yaml.safe_dump({"definitions": found}, sort_keys=False, allow_unicode=True)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{len(found)} definitions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _exported(shown: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in shown.items() if k != "updated_at"}


def cmd_recheck(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.effective_database_url)
    try:
        done = stored.count_violations(engine) if args.dry_run else stored.recheck(engine, force=True)
    finally:
        engine.dispose()
    verb = "would change" if args.dry_run else "changed"
    print(f"{done.checked} checked, {done.changed} {verb}, {done.violating} with violations")
    return 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Every dataset, version and datum carrying violations (as stored: the apply and the
    re-check keep them current), one line per violation; exit 1 when there is any, like a linter."""
    if args.key is not None and (not args.key or "`" in args.key):
        raise InvalidEntry(f"sidecar check: {args.key!r} is not a property key")
    node = "violates" + (f" `{args.key}`" if args.key else "")  # backticks: the key as written
    ask = queries.ListQuery(filter=node, limit=args.limit)
    found: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    engine = make_engine(settings.effective_database_url)
    try:
        with Session(engine) as session:
            counts["dataset"], datasets = queries.list_datasets(session, ask)
            found += [{"uri": f"dataset://{d.name}", "violations": d.violations} for d in datasets]
            counts["version"], versions = queries.list_versions(session, ask)
            found += [{"uri": v.uri, "violations": v.violations} for v in versions]
            counts["datum"], datums = list_datums(session, DatumQuery(filter=node, limit=args.limit))
            found += [
                {"uri": f"datum {d.uid} ({d.execution}:{d.path})", "violations": d.violations} for d in datums
            ]
    except FilterError as exc:  # a key that is not a property name
        raise InvalidEntry(f"sidecar check: {exc}") from None
    finally:
        engine.dispose()
    for item in found:  # only the key asked for, when one was
        item["violations"] = [v for v in item["violations"] or [] if not args.key or v.get("key") == args.key]
    total = sum(counts.values())
    if args.json:
        print(json.dumps({"counts": counts, "results": found}, indent=2, default=str))
        return 1 if total else 0
    for item in found:
        for v in item["violations"]:
            print(f"{item['uri']}  {v.get('key')}  {v.get('rule')}  {json.dumps(v.get('value'))}")
    if not total:
        print("no violations")
        return 0
    more = f" ({len(found)} shown; --limit for more)" if total > len(found) else ""
    kinds = f"{counts['dataset']} datasets, {counts['version']} versions, {counts['datum']} datums"
    print(f"{total} with violations: {kinds}{more}")
    return 1


def add_commands(sub: Any, common: Any) -> None:
    """Register `definitions apply|export|recheck` and `check` on the `sidecar` parser."""
    check = sub.add_parser(
        "check", help="list the datasets, versions and datums whose properties break their definitions"
    )
    common(check)
    check.add_argument("key", nargs="?", help="only violations of this key")
    check.add_argument("--limit", type=int, default=1000, help="at most this many of each kind [1000]")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=cmd_check)
    group = sub.add_parser("definitions", help="property definitions: apply a file, export them")
    commands = group.add_subparsers(title="definitions commands")
    apply = commands.add_parser("apply", help="create or update the definitions of a YAML file")
    common(apply)
    apply.add_argument("file", help="a YAML file: a list of definitions (or `definitions:` holding one)")
    apply.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    apply.set_defaults(run=cmd_apply)
    export = commands.add_parser("export", help="write every definition as YAML (what `apply` reads)")
    common(export)
    export.add_argument("-o", "--output", help="a file to write [stdout]")
    export.set_defaults(run=cmd_export)
    recheck = commands.add_parser(
        "recheck", help="check every dataset, version and datum against the definitions now"
    )
    common(recheck)
    recheck.add_argument("--dry-run", action="store_true", help="count what would change; change nothing")
    recheck.set_defaults(run=cmd_recheck)
