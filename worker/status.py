"""`sidecar status`: the backlog, the watchers and the workers, read from Redis; exit 1 if stuck."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from . import connections
from .settings import Settings
from .staging import Staging
from .store import definitions as stored_definitions
from .store import outbox
from .store.models import Dataset, DatasetVersion
from .store.queries import iso

VERSION_PROBLEMS_SHOWN = 20


def collect(staging: Staging, *, stuck_after: float, engine: Engine | None = None) -> dict[str, Any]:
    """Everything `sidecar status` shows, as one JSON-able dict; `problems` lists what is stuck.

    With an `engine`, also the newest versions whose membership had a problem (`from` naming
    nothing that exists): data to look at, like rejects, not something stuck."""
    due_count, oldest = staging.backlog()
    building, completed_unapplied = _versions(staging)
    beats = staging.heartbeats()
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    recent = [r for r in staging.rejects(limit=10_000) if r.at and datetime.fromisoformat(r.at) >= hour_ago]
    problems = []
    if oldest > stuck_after:
        problems.append(f"a target has waited {oldest:.0f} s for its apply (limit {stuck_after:.0f} s)")
    if due_count and not any(b["role"] == "worker" for b in beats):
        problems.append("entries wait for an apply and no worker is alive")
    quarantined = staging.quarantined()
    if quarantined:
        problems.append(f"{len(quarantined)} target(s) quarantined after failed applies: `sidecar retry`")
    report: dict[str, Any] = {
        "building": building,
        "completed_unapplied": completed_unapplied,
        "due_targets": due_count,
        "oldest_unapplied_seconds": round(oldest, 3),
        "rejects_last_hour": len(recent),
        "quarantined": [{"target": k, **v} for k, v in quarantined.items()],
        "redis": staging.memory(),
        "watchers": [b for b in beats if b["role"] == "watcher"],
        "workers": [b for b in beats if b["role"] == "worker"],
        "problems": problems,
    }
    if engine is not None:
        try:
            report["version_problems"] = version_problems(engine)
            report["definitions_recheck"] = recheck_report(engine)
            report["deliveries"] = outbox.summary(engine, datetime.now(UTC))
        except SQLAlchemyError as exc:  # status must answer with the database away too
            report["version_problems_error"] = type(exc).__name__
        problems.extend(_delivery_problems(report.get("deliveries"), stuck_after))
        waited = report.get("definitions_recheck", {}).get("waiting_seconds") or 0
        if waited > stuck_after:
            problems.append(
                f"a definition change has waited {waited:.0f} s for its re-check (is a worker alive? "
                "`sidecar definitions recheck` runs it here)"
            )
    return report


def _delivery_problems(found: dict[str, Any] | None, stuck_after: float) -> list[str]:
    """Change notifications given up, or due and not sent for longer than `stuck_after`."""
    if not found:
        return []
    out = []
    if found["failed"]:
        out.append(f"{found['failed']} change notification(s) given up: `sidecar deliveries retry`")
    if found["oldest_due_seconds"] > stuck_after:
        out.append(
            f"a change notification has been due for {found['oldest_due_seconds']:.0f} s "
            "(is a worker alive? `sidecar deliveries retry --send` sends from here)"
        )
    return out


def recheck_report(engine: Engine) -> dict[str, Any]:
    """The background re-check after definition changes: `state` is "current" (the last pass
    covered every change), "running" (with its progress) or "pending" (none started since the
    change); `waiting_seconds`: how long since the last sign of progress, while not current."""
    row = stored_definitions.recheck_state(engine)
    generation, checked = row["generation"], row["checked_generation"]
    state = (
        "current"
        if checked >= generation
        else "running"
        if row["run_generation"] == generation
        else "pending"
    )
    shown = {
        "state": state,
        "generation": generation,
        "checked_generation": checked,
        **{k: row.get(k) for k in ("total", "checked", "changed", "violating")},
        **{k: iso(row.get(k)) for k in ("requested_at", "started_at", "progress_at", "finished_at")},
        "waiting_seconds": None,
    }
    if state != "current":
        last = row.get("progress_at") if state == "running" else row.get("requested_at")
        if last is not None:
            last = last if last.tzinfo else last.replace(tzinfo=UTC)  # SQLite drops the offset
            shown["waiting_seconds"] = round((datetime.now(UTC) - last).total_seconds(), 3)
    return shown


def version_problems(engine: Engine, limit: int = VERSION_PROBLEMS_SHOWN) -> list[dict[str, Any]]:
    """The newest completed versions with a `spec_problem`, newest first."""
    with Session(engine) as session:
        rows = session.execute(
            select(
                Dataset.name, DatasetVersion.name, DatasetVersion.spec_problem, DatasetVersion.completed_at
            )
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
            .where(DatasetVersion.spec_problem.is_not(None))
            .order_by(DatasetVersion.completed_at.desc(), DatasetVersion.id.desc())
            .limit(limit)
        ).all()
    return [
        {"uri": f"dataset://{d}/{v}", "problem": problem, "completed_at": iso(at)}
        for d, v, problem, at in rows
    ]


def _versions(staging: Staging) -> tuple[list[dict[str, Any]], list[str]]:
    """Versions still building with their staged counts, and due versions already completed."""
    due = set(staging.due_targets(older_than=-1))
    building = [{"uri": key, "staged": staged} for key, staged in staging.building_versions()]
    return building, sorted(k for k in due if k.count("/") == 3)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    staging = connections.staging(settings)
    engine = _engine(settings)
    try:
        report = collect(staging, stuck_after=args.stuck_after, engine=engine)
    finally:
        if engine is not None:
            engine.dispose()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 1 if report["problems"] else 0


def _engine(settings: Settings) -> Engine | None:
    """The database, unless it is the default SQLite file and that does not exist (a watcher-only
    host): `status` must not create it."""
    if not settings.database_url and not (settings.data_dir / "sidecar.db").exists():
        return None
    return connections.engine(settings)


def _print(report: dict[str, Any]) -> None:
    print(f"building versions: {len(report['building'])}")
    for v in report["building"][:20]:
        print(f"  {v['uri']}  {v['staged']} staged")
    print(f"completed, not yet applied: {len(report['completed_unapplied'])}")
    for uri in report["completed_unapplied"][:20]:
        print(f"  {uri}")
    print(f"due targets: {report['due_targets']}, oldest waiting {report['oldest_unapplied_seconds']:.1f} s")
    print(f"rejects in the last hour: {report['rejects_last_hour']}")
    print(f"quarantined: {len(report['quarantined'])}")
    for q in report["quarantined"][:20]:
        print(f"  {q['target']}  after {q['attempts']} tries, {q['at']}: {q['error']}")
    mem = report["redis"]
    oldest = "no completed execution retained"
    if mem["oldest_retained"]:
        age = mem["oldest_retained_seconds"]
        oldest = f"oldest retained execution {mem['oldest_retained']}, completed {age:.0f} s ago"
    print(f"redis memory: {mem['used_memory_human']}; {mem['held_executions']} executions held; {oldest}")
    for w in report["watchers"]:
        print(
            f"watcher {w['name']}: {w['root']}, {w['files']} files, {w['pending_bytes']} bytes pending, "
            f"last scan {w['last_scan_age']:.0f} s ago"
        )
    for w in report["workers"]:
        print(f"worker {w['name']}: alive at {w['at']}")
    if not report["workers"]:
        print("no worker alive")
    _print_database(report)
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")


def _print_database(report: dict[str, Any]) -> None:
    """What status read from the database, when it could."""
    if "version_problems" in report:
        shown = report["version_problems"]
        print(f"versions completed with a membership problem (newest {VERSION_PROBLEMS_SHOWN}): {len(shown)}")
        for v in shown:
            print(f"  {v['uri']}  {v['completed_at']}: {v['problem']}")
    elif "version_problems_error" in report:
        print(
            f"versions with a membership problem: database unavailable ({report['version_problems_error']})"
        )
    if "definitions_recheck" in report:
        print(_recheck_line(report["definitions_recheck"]))
    if "deliveries" in report:
        d = report["deliveries"]
        print(
            f"change notifications: {d['pending']} pending (longest due {d['oldest_due_seconds']:.0f} s), "
            f"{d['delivered']} delivered, {d['failed']} given up"
        )


def _recheck_line(r: dict[str, Any]) -> str:
    if r["state"] == "current":
        if not r["finished_at"]:
            return "definitions re-check: nothing to do"
        return (
            f"definitions re-check: current (finished {r['finished_at']}: {r['checked']} checked, "
            f"{r['changed']} changed, {r['violating']} with violations)"
        )
    if r["state"] == "running":
        return (
            f"definitions re-check: running, {r['checked']} of ~{r['total']} checked, {r['changed']} changed "
            f"(started {r['started_at']})"
        )
    return f"definitions re-check: pending since {r['requested_at']} (no worker has started it)"
