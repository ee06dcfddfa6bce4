"""`sidecar deliveries retry [SUBSCRIPTION] [--dry-run] [--send]`: send the change notifications
that were given up (`failed`) again, and `sidecar deliveries list SUBSCRIPTION`, their log."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from . import connections, delivering
from .settings import Settings
from .store import outbox
from .tasks import Enqueuer, make_app


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    """Make the failed deliveries (of one subscription, or all) pending again, due now; then
    have a worker send them (or, `--send`, send them from this process)."""
    engine = connections.engine(settings)
    try:
        if args.dry_run:
            failed = outbox.failed_count(engine, args.subscription)
            print(f"{failed} failed deliveries would be sent again")
            return 0
        done = outbox.retry_failed(engine, args.subscription, datetime.now(UTC))
        if args.send:
            stats = delivering.send_due(engine, settings, budget=float("inf"))
            sent = f"{stats.delivered} delivered, {stats.failed} tries failed"
            print(f"{done} failed deliveries sent again: {sent}")
            return 0
        if done:
            Enqueuer(make_app(settings)).deliver(connections.staging(settings))
        print(f"{done} failed deliveries pending again; a worker sends them")
    finally:
        engine.dispose()
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    """A subscription's delivery log, newest first."""
    engine = connections.engine(settings)
    try:
        with Session(engine) as session:
            count, rows = outbox.deliveries_of(session, args.subscription, args.limit, 0, args.status)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"count": count, "results": rows}, indent=2))
        return 0
    for row in rows:
        print(_line(row))
    print(f"{len(rows)} of {count} deliveries")
    return 0


def _line(row: dict[str, Any]) -> str:
    event = row["event"]
    when = row["delivered_at"] or row["next_at"] or ""
    error = f"  {row['last_error']}" if row["last_error"] else ""
    head = f"{row['id']:>8}  {row['status']:<9}  {row['attempts']:>2} tries"
    return f"{head}  {event['type']:<18}  {event['target']}  {when}{error}"


def add_commands(sub: Any, common: Any) -> None:
    """Register `deliveries retry|list` on the `sidecar` parser."""
    group = sub.add_parser(
        "deliveries", help="change notifications: their delivery log, and sending failed ones again"
    )
    commands = group.add_subparsers(title="deliveries commands")
    retry = commands.add_parser("retry", help="send the given-up (failed) deliveries again")
    common(retry)
    retry.add_argument("subscription", nargs="?", help="only this subscription's (its id) [all]")
    retry.add_argument(
        "--dry-run", action="store_true", help="count what would be sent again; change nothing"
    )
    retry.add_argument(
        "--send", action="store_true", help="send them from this process, not through a worker"
    )
    retry.set_defaults(run=cmd_retry)
    listing = commands.add_parser("list", help="a subscription's deliveries, newest first")
    common(listing)
    listing.add_argument("subscription", help="the subscription's id")
    listing.add_argument("--status", choices=["pending", "delivered", "failed"])
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_list)
