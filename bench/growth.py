"""Cost growth: ingest time against the number of files, apply time against the number of versions.

Ingest: `Ingestor.ingest` on 1, 10, … 10,000 files (2 lines each, one execution folder each), with
fresh staging state per size. Apply: 10, 100, … 100,000 versions of 10 properties staged and
completed, then applied by one process calling `apply_target` on PostgreSQL (fresh schema per size).
Sizes go up by 10× while the next one, extrapolated linearly from the last, fits the time box;
the ones left out are listed with their predicted time. Target: linear or better, judged by the
log-log slope over the largest three sizes measured (≤ 1.15 allows for noise).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.applying import apply_target
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.staging import Staging
from worker.uris import Target

from .common import Context, Row, Section, fmt_int, new_engine, verdict
from .workload import JSONL, dataset_line, datum_line, version_line, version_properties, write_lines

FILE_SIZES = (1, 10, 100, 1_000, 10_000)
VERSION_SIZES = (10, 100, 1_000, 10_000, 100_000)
SLOPE_LIMIT = 1.15


def run(ctx: Context) -> Section:
    section = Section("growth")
    root = ctx.folder("growth-root")
    biggest = FILE_SIZES[-1] if not ctx.quick else 1_000
    _files(root, biggest)
    half = ctx.box.seconds * 0.5
    ingest = _series([n for n in FILE_SIZES if n <= biggest], half, lambda n: _ingest(ctx, root, n))
    apply = _series(list(VERSION_SIZES), ctx.box.left() - 3, lambda n: _apply(ctx, n))
    for label, unit, series, sizes in (
        ("ingest cost growth", "files", ingest, FILE_SIZES),
        ("apply cost growth", "versions", apply, VERSION_SIZES),
    ):
        slope = _slope(series["measured"])
        skipped = series["skipped"]
        points = ", ".join(f"{fmt_int(n)}: {s:.2f} s" for n, s in series["measured"])
        workload = f"{fmt_int(sizes[0])} to {fmt_int(series['measured'][-1][0])} {unit}"
        if skipped:
            workload += "; not run (time box): " + ", ".join(
                f"{fmt_int(n)} (~{s:.0f} s predicted)" for n, s in skipped
            )
        section.rows.append(
            Row(
                label,
                workload,
                points,
                ratio=f"log-log slope {slope:.2f}",
                target="linear or better",
                verdict=verdict(slope <= SLOPE_LIMIT),
            )
        )
        section.data[unit] = {**series, "slope": slope}
    return section


def _series(sizes: list[int], seconds: float, measure: Callable[[int], float]) -> dict[str, Any]:
    """Measure sizes in order while the next one (predicted linearly) fits in `seconds`."""
    began = time.perf_counter()
    measured: list[tuple[int, float]] = []
    skipped: list[tuple[int, float]] = []
    for n in sizes:
        if measured:
            last_n, last_s = measured[-1]
            predicted = last_s * n / last_n
            over = time.perf_counter() - began + predicted * 1.3 > seconds
            if skipped or (over and len(measured) >= 2):  # two sizes at least, for a slope
                skipped.append((n, predicted))
                continue
        measured.append((n, measure(n)))
    return {"measured": measured, "skipped": skipped}


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(seconds) on log(n) over the largest three points."""
    top = points[-3:]
    if len(top) < 2:
        return math.nan
    xs = [math.log(n) for n, _ in top]
    ys = [math.log(max(s, 1e-9)) for _, s in top]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _files(root: Path, count: int) -> None:
    rng = random.Random(11)
    for i in range(count):
        lines = [
            dataset_line(rng, f"dataset://bench-growth-{i % 100}"),
            datum_line(rng, i, [f"dataset://bench-growth-{i % 100}/v1"]),
        ]
        write_lines(root / f"exec-{i:05d}" / JSONL, lines)


def _ingest(ctx: Context, root: Path, count: int) -> float:
    """Seconds to ingest the first `count` execution folders' files (fresh staging state)."""
    client = ctx.redis()
    ingestor = Ingestor(root, Staging(client, Keys(ctx.prefix("growth"))), line_limit=1 << 20)
    paths = [root / f"exec-{i:05d}" / JSONL for i in range(count)]
    start = time.perf_counter()
    for path in paths:
        ingestor.ingest(path)
    seconds = time.perf_counter() - start
    client.close()
    ctx.cleanup()
    return seconds


def _apply(ctx: Context, count: int) -> float:
    """Seconds for one process to apply `count` completed versions of 10 properties (PostgreSQL)."""
    client = ctx.redis()
    staging = Staging(client, Keys(ctx.prefix("growth-apply")))
    root = ctx.folder(f"growth-apply-{count}")
    path = root / "exec-apply" / JSONL
    rng = random.Random(count)
    targets = [Target("version", f"bench-growth-{i % 100}", f"v{i}") for i in range(count)]
    write_lines(path, (version_line(t.key, version_properties(rng, 10)) for t in targets))
    Ingestor(root, staging, line_limit=1 << 20).ingest(path)
    due: set[str] = set()
    for t in targets:
        due.update(staging.complete_version(t))
    order = sorted((Target.parse(k) for k in due), key=lambda t: (t.kind != "version", t.key))
    with ctx.postgres(f"growth_{count}") as url:
        engine = new_engine(url)
        start = time.perf_counter()
        for target in order:
            apply_target(engine, staging, target)
        seconds = time.perf_counter() - start
        engine.dispose()
    client.close()
    ctx.cleanup()
    return seconds
