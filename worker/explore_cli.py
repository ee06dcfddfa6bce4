"""`sidecar diff` and `sidecar export`: the diff and export routes' answers, from the database."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, BinaryIO, TextIO

from sqlalchemy.orm import Session

from .settings import Settings
from .store import datums, diff, export, queries, sets
from .store.db import make_engine
from .store.search import OwnerKind


def cmd_diff(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.effective_database_url)
    try:
        with Session(engine) as session:
            found = diff.diff(session, diff.against(session, args.uri).id, args.against)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    _print_diff(found, sys.stdout)
    return 0


def _print_diff(found: dict[str, Any], out: TextIO) -> None:
    base = found["against"]
    out.write(
        f"{found['version']['uri']} against {base['uri'] if base else '(nothing: the first version)'}\n"
    )
    props = found["properties"]
    for key, value in props["added"].items():
        out.write(f"  + {key} = {_text(value)}\n")
    for key, value in props["removed"].items():
        out.write(f"  - {key} (was {_text(value)})\n")
    for key, change in props["changed"].items():
        out.write(f"  ~ {key}: {_text(change['old'])} -> {_text(change['new'])}\n")
    files = found["files"]
    for f in files["added"]:
        out.write(f"  + file {f['name']}\n")
    for f in files["removed"]:
        out.write(f"  - file {f['name']}\n")
    for f in files["changed"]:
        out.write(f"  ~ file {f['name']} (content changed)\n")
    counts = files["counts"]
    out.write(
        f"properties: {len(props['added'])} added, {len(props['removed'])} removed, "
        f"{len(props['changed'])} changed; files: {counts['added']} added, {counts['removed']} removed, "
        f"{counts['changed']} changed, {files['unchanged']} unchanged\n"
    )


def _text(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    columns = tuple(c.strip() for c in (args.columns or "").split(",") if c.strip())
    kind: OwnerKind = "datum" if args.data else "version" if args.versions else "dataset"
    ask: sets.Ask = (
        datums.DatumQuery(filter=args.filter, execution=args.execution)
        if kind == "datum"
        else queries.ListQuery(filter=args.filter, dataset=args.dataset)
    )
    job = export.Export(kind, ask, args.format, columns)
    engine = make_engine(settings.effective_database_url)
    try:
        with Session(engine) as session:  # a bad filter fails here (FilterError), before any output
            total = sets.count(session, kind, ask)
        out: BinaryIO = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
        try:
            rows = 0
            progress = sys.stderr.isatty() and args.output is not None
            for chunk, done in export.stream_counted(engine, job):
                out.write(chunk)
                rows = done
                if progress:
                    _bar(rows, total)
            if progress:
                sys.stderr.write("\n")
        finally:
            if args.output:
                out.close()
    finally:
        engine.dispose()
    if args.output:
        print(f"{rows} rows written to {args.output}", file=sys.stderr)
    return 0


def _bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows")
    sys.stderr.flush()


def add_commands(sub: Any, common: Any) -> None:
    """Register `diff` and `export` on the `sidecar` parser."""
    d = sub.add_parser("diff", help="what changed between two dataset versions")
    common(d)
    d.add_argument("uri", help="dataset://<name>/<version> (or an alias, or latest)")
    d.add_argument("against", nargs="?", help="the version to compare with [its `from`, else the one before]")
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=cmd_diff)
    e = sub.add_parser(
        "export", help="write datasets (or versions, or datums) matching a filter as CSV, JSONL or Parquet"
    )
    common(e)
    which = e.add_mutually_exclusive_group()
    which.add_argument("--versions", action="store_true", help="export dataset versions")
    which.add_argument("--data", action="store_true", help="export datums (files of executions)")
    e.add_argument("--filter", help="a filter in the search language")
    e.add_argument("--dataset", help="only this dataset's versions (name or id)")
    e.add_argument("--execution", help="only the datums of this execution (with --data)")
    e.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="jsonl")
    e.add_argument("--columns", help="comma-separated property keys [all]")
    e.add_argument("-o", "--output", help="a file to write (a progress bar on a terminal) [stdout]")
    e.set_defaults(run=cmd_export)
