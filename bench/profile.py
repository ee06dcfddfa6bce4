"""Profile the paths behind the missed targets (see docs/benchmarks.md, "What the profiles show").

    .venv/bin/python bench/profile.py ingest [--lines 20000]     pyinstrument: Ingestor.ingest
    .venv/bin/python bench/profile.py apply [--properties 1000]  pyinstrument: apply_target (PostgreSQL)
    .venv/bin/python bench/profile.py batch [--versions 1000]    cProfile: apply_targets, row (c) (SQLite)
    .venv/bin/python bench/profile.py history                    the history rows' share of a batched apply
    .venv/bin/python bench/profile.py search [--versions 150000] EXPLAIN ANALYZE of the slow filters
    .venv/bin/python bench/profile.py row d postgresql [--versions N] [--timeout 600] [--keep]
        one written → visible row of bench/pipeline.py at any size, without the time box's share
        (a full-size (d) takes minutes); prints its figures, the store floor and the late lines

Uses the same services and workloads as bench/run.py, with its own prefix and schema, removed after.
The watcher under load was profiled with py-spy (`pip install py-spy`; `py-spy record -f raw -p PID`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

_REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == _REPO / "bench":
    sys.path[0] = str(_REPO)

import cProfile  # noqa: E402  (after the path fix: this file's name would shadow `profile`)
import pstats  # noqa: E402

from pyinstrument import Profiler  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from bench import pipeline  # noqa: E402
from bench.common import DEFAULT_POSTGRES, DEFAULT_REDIS, Box, Context, new_engine  # noqa: E402
from bench.searchstore import build  # noqa: E402
from bench.workload import (  # noqa: E402
    JSONL,
    interleaved_lines,
    mixed_lines,
    version_lines,
    versions_with_datums,
    write_lines,
)
from worker.applying import apply_target, apply_targets  # noqa: E402
from worker.ingest import Ingestor  # noqa: E402
from worker.keys import Keys  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.staging import Staging  # noqa: E402
from worker.store.apply import Applier  # noqa: E402
from worker.store.db import make_engine  # noqa: E402
from worker.store.models import Base, Dataset, DatasetVersion  # noqa: E402
from worker.store.search import filter_condition  # noqa: E402
from worker.uris import Target  # noqa: E402

INTERVAL = 0.005  # coarse: this machine's precise timer costs ~4 µs a call, which distorts
os.environ.setdefault("PYINSTRUMENT_IGNORE_OVERHEAD_WARNING", "1")
SLOW_FILTERS = ("score > 0.9999", 'shift = "night" and score > 0.999')


def profile_ingest(ctx: Context, lines: int) -> None:
    root = ctx.folder("profile-ingest")
    path = root / "exec-1" / JSONL
    write_lines(path, mixed_lines(lines, seed=1))
    client = ctx.redis()
    ingestor = Ingestor(root, Staging(client, Keys(ctx.prefix("profile"))), line_limit=1 << 20)
    with Profiler(interval=INTERVAL) as profiler:
        ingestor.ingest(path)
    print(profiler.output_text(color=False, unicode=True))
    client.close()


def profile_apply(ctx: Context, properties: int) -> None:
    root = ctx.folder("profile-apply")
    client = ctx.redis()
    staging = Staging(client, Keys(ctx.prefix("profile")))
    targets = [Target("version", "profile", f"v{i}") for i in range(4)]
    for i, target in enumerate(targets):
        path = root / f"exec-{i}" / JSONL
        write_lines(path, version_lines(target.key, properties, 10, seed=i))
        Ingestor(root, staging, line_limit=1 << 20).ingest(path)
        staging.complete_version(target)
    with ctx.postgres("profile") as url:
        engine = new_engine(url)
        apply_target(engine, staging, targets[0])  # warm-up: connections, prepared statements
        with Profiler(interval=INTERVAL) as profiler:
            for target in targets[1:]:
                apply_target(engine, staging, target)
        engine.dispose()
    print(profiler.output_text(color=False, unicode=True))
    client.close()


def profile_batch(ctx: Context, versions: int) -> None:
    """Row (c) of the pipeline in process: versions of 10 properties, a datum line naming each,
    one `execution_completed`, then the due targets applied in batches as the worker does."""
    root = ctx.folder("profile-batch")
    path = root / "exec-1" / JSONL
    lines = versions_with_datums(random.Random(1), "profile", versions)
    write_lines(path, lines)
    client = ctx.redis()
    staging = Staging(client, Keys(ctx.prefix("profile")))
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    ingestor.ingest(path)
    ingestor.settle()
    due = [Target.parse(k) for k in sorted(staging.complete_execution("exec-1"))]
    engine = make_engine(f"sqlite:///{root / 'profile.db'}")
    Base.metadata.create_all(engine)
    batch = Settings.apply_batch
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for i in range(0, len(due), batch):
        apply_targets(engine, staging, due[i : i + batch])
    profiler.disable()
    print(f"{len(due):,} targets in {time.perf_counter() - start:.2f} s ({batch} per batch)")
    pstats.Stats(profiler).sort_stats(os.environ.get("PROFILE_SORT", "cumulative")).print_stats(30)
    engine.dispose()
    client.close()


def history_share(ctx: Context) -> None:
    """What the history rows cost a batched apply (issue 16 item 3 was to be decided by this):
    row (c) (1,000 versions of 10 properties, a datum each) and 20 versions x 500 lines of 3 keys,
    applied with their history and with `Applier.changes` dropped before each write, best of 3,
    on SQLite and PostgreSQL."""
    original = Applier.write

    def run(url: str, kind: str, drop: bool) -> float:
        root = ctx.folder(f"profile-history-{uuid.uuid4().hex[:6]}")
        path = root / "exec-1" / JSONL
        rng = random.Random(1)
        lines = versions_with_datums(rng, "h", 1000) if kind == "c" else interleaved_lines(rng, "h", 20, 500)
        write_lines(path, lines)
        client = ctx.redis()
        staging = Staging(client, Keys(ctx.prefix(f"history-{uuid.uuid4().hex[:6]}")))
        ingestor = Ingestor(root, staging, line_limit=1 << 20)
        ingestor.ingest(path)
        ingestor.settle()
        for i in range(20 if kind == "a" else 0):
            staging.complete_version(Target("version", "h", f"v{i:03d}"))
        due = sorted(set(staging.complete_execution("exec-1")) | set(staging.due_targets(-1)))
        engine = make_engine(url if url != "sqlite" else f"sqlite:///{root / 'h.db'}")
        Base.metadata.create_all(engine)

        def write(self: Applier) -> None:
            if drop:
                self.changes = []
            original(self)

        Applier.write = write  # type: ignore[method-assign]
        try:
            start = time.perf_counter()
            for i in range(0, len(due), Settings.apply_batch):
                apply_targets(engine, staging, [Target.parse(k) for k in due[i : i + Settings.apply_batch]])
            return time.perf_counter() - start
        finally:
            Applier.write = original  # type: ignore[method-assign]
            Base.metadata.drop_all(engine)
            engine.dispose()
            client.close()

    with ctx.postgres("profile") as pg:
        for url in ("sqlite", pg):
            for kind in ("c", "a"):
                kept, dropped = (min(run(url, kind, drop) for _ in range(3)) for drop in (False, True))
                share = (kept - dropped) / kept
                name = "SQLite" if url == "sqlite" else "PostgreSQL"
                print(
                    f"{name} row ({kind}): {kept:.2f} s with history, {dropped:.2f} s without ({share:.0%})"
                )


def explain_search(ctx: Context, versions: int) -> None:
    with ctx.postgres("profile") as url:
        engine = make_engine(url)  # build() makes the schema with the migrations
        built = build(engine, versions)
        print(f"store: {built.versions:,} versions built in {built.seconds:.0f} s")
        for filter_text in SLOW_FILTERS:
            owner_id = cast(Any, DatasetVersion.id)
            condition = filter_condition(filter_text, "version", owner_id, "postgresql")
            base = select(DatasetVersion.id).join(Dataset).where(condition)
            for label, query in (
                ("count", select(func.count()).select_from(base.subquery())),
                ("page", base.order_by(DatasetVersion.id).limit(100)),
            ):
                sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
                with engine.connect() as conn:
                    start = time.perf_counter()
                    plan = [row[0] for row in conn.execute(text("EXPLAIN ANALYZE " + sql))]
                print(f"\n== {filter_text} ({label}, {time.perf_counter() - start:.2f} s)")
                print("\n".join(plan))
        engine.dispose()


def pipeline_row(ctx: Context, key: str, database: str, versions: int | None, timeout: float) -> None:
    """One row of bench/pipeline.py, as the benchmark runs it, with a time box of its own."""
    plan = {p.key: p for p in pipeline.FULL}[key]
    if versions is not None:
        plan = dataclasses.replace(plan, versions=versions)
    ctx.box = Box(timeout)
    result = pipeline._row(ctx, database, plan, timeout)
    out = result.to_json()
    visible = result.visible_s
    print(f"row ({key}), {database}: {plan.describe(None)}")
    print(f"  ingest floor {result.floor_s:.2f} s (runs: {', '.join(f'{f:.2f}' for f in result.floors_s)})")
    if visible is None:
        print(f"  not visible within {timeout:.0f} s: {result.seen:,} of {result.wanted:,} shown")
    else:
        print(f"  visible after {visible:.2f} s: {result.floor_s / visible:.1%} of the ingest floor")
        print(f"  staged after {result.staged_s or 0:.2f} s")
    if result.store is not None:
        print(f"  {result.store_share()}; rows {result.store.rows}")
        if visible is not None:
            print(f"  the row at {result.store.seconds / visible:.0%} of the store floor")
    if result.late:
        stats = out["late_summary"]
        print(f"  late lines: {len(result.late)}, p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms")
        slowest = sorted(range(len(result.late)), key=lambda i: -result.late[i])[:5]
        print("  slowest (line number: ms):", ", ".join(f"{i}: {result.late[i] * 1000:.0f}" for i in slowest))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("ingest").add_argument("--lines", type=int, default=20_000)
    sub.add_parser("apply").add_argument("--properties", type=int, default=1_000)
    sub.add_parser("batch").add_argument("--versions", type=int, default=1_000)
    sub.add_parser("history")
    sub.add_parser("search").add_argument("--versions", type=int, default=150_000)
    row = sub.add_parser("row")
    row.add_argument("key", choices=[p.key for p in pipeline.FULL])
    row.add_argument("database", choices=pipeline.DATABASES)
    row.add_argument("--versions", type=int, help="instead of the full run's")
    row.add_argument("--timeout", type=float, default=600.0)
    row.add_argument("--keep", action="store_true", help="keep the scratch folder (the stack's log)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    ctx = Context(
        quick=args.what != "row",
        redis_url=DEFAULT_REDIS,
        postgres_url=DEFAULT_POSTGRES,
        workdir=workdir,
    )
    try:
        if args.what == "row":
            pipeline_row(ctx, args.key, args.database, args.versions, args.timeout)
        elif args.what == "ingest":
            profile_ingest(ctx, args.lines)
        elif args.what == "apply":
            profile_apply(ctx, args.properties)
        elif args.what == "batch":
            profile_batch(ctx, args.versions)
        elif args.what == "history":
            history_share(ctx)
        else:
            explain_search(ctx, args.versions)
    finally:
        ctx.cleanup()
        if getattr(args, "keep", False):
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
