"""Ingest throughput: `Ingestor.ingest` on a file already on disk, and 8 writers appending live.

Floor (same run, same file, before and after the real ingest): read in 1 MiB chunks, split lines,
`orjson.loads` each, XADD the raw line through a non-transactional pipeline in batches of 1,000.
No validation, no checkpoint.
Baseline: a naive loop (`json.loads` + `jsonschema.validate` + one Redis call per key).
Target: ≥ 50% of the floor, and ≥ 5× the naive loop.

The file size is fitted to the time box from a calibration run (up to the 1,000,000 lines asked);
the table says when it was scaled down.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import redis
from referencing import Registry, Resource

from worker.ingest import Ingestor
from worker.keys import Keys
from worker.schemas import schema_dir
from worker.settings import Settings
from worker.staging import Staging
from worker.tail import FileState

from . import procs
from .common import Context, Row, Section, fit, fmt_int, fmt_rate, scaled, verdict
from .workload import JSONL, mixed_lines, write_lines

ASKED_LINES = 1_000_000
WRITERS = 8
LINE_LIMIT = 1024 * 1024


def run(ctx: Context) -> Section:
    section = Section("ingest")
    client = ctx.redis()
    root = ctx.folder("ingest-root")

    # Calibrate on a small file, then fit the big one to the time box.
    calib = root / "exec-calib" / JSONL
    write_lines(calib, mixed_lines(3000, seed=7, tag="calib"))
    calib_rate = 3000 / real_ingest(ctx, root, calib)
    budget = ctx.box.seconds * 0.35
    lines = fit(calib_rate, budget, 2_000, 20_000 if ctx.quick else ASKED_LINES)
    path = root / "exec-bulk" / JSONL
    size = write_lines(path, mixed_lines(lines, seed=1))

    # The floor runs before and after the real ingest (the machine is shared): their mean counts.
    floor_before = floor_ingest(client, ctx.prefix("floor"), path)
    ctx.cleanup()
    real_s = real_ingest(ctx, root, path)
    ctx.cleanup()
    floor_after = floor_ingest(client, ctx.prefix("floor"), path)
    ctx.cleanup()
    floor_s = (floor_before + floor_after) / 2
    naive_lines = 200 if ctx.quick else 1000
    naive_s = naive_ingest(client, ctx.prefix("naive"), path, naive_lines)
    ctx.cleanup()

    floor_rate, real_rate, naive_rate = lines / floor_s, lines / real_s, naive_lines / naive_s
    workload = f"{scaled(lines, ASKED_LINES, 'lines')}, {size / lines:.0f} B/line avg, already on disk"
    section.rows.append(
        Row(
            "ingest throughput (one file)",
            workload,
            fmt_rate(real_rate, "lines/s"),
            fmt_rate(floor_rate, "lines/s"),
            f"{real_rate / floor_rate:.1%} of floor",
            "≥ 50% of floor",
            verdict(real_rate >= 0.5 * floor_rate),
        )
    )
    section.rows.append(
        Row(
            "ingest vs a naive loop",
            f"naive loop on the first {fmt_int(naive_lines)} lines of the same file",
            fmt_rate(real_rate, "lines/s"),
            f"naive {fmt_rate(naive_rate, 'lines/s')}",
            f"{real_rate / naive_rate:.1f}× naive",
            "≥ 5× naive",
            verdict(real_rate >= 5 * naive_rate),
        )
    )

    # 8 writers appending while the real watcher follows.
    live_budget = ctx.box.seconds * 0.22
    total = fit(real_rate, live_budget, 2_000, 20_000 if ctx.quick else ASKED_LINES)
    total -= total % WRITERS
    live_s = live_ingest(ctx, total)
    live_rate = total / live_s
    section.rows.append(
        Row(
            "ingest throughput (8 writers)",
            f"{scaled(total, ASKED_LINES, 'lines')} appended by 8 writer processes "
            "to 8 executions, followed by `sidecar watch`",
            fmt_rate(live_rate, "lines/s"),
            fmt_rate(floor_rate, "lines/s"),
            f"{live_rate / floor_rate:.1%} of floor",
            "≥ 50% of floor",
            verdict(live_rate >= 0.5 * floor_rate),
        )
    )
    section.data = {
        "lines": lines,
        "bytes": size,
        "floor_lines_per_s": floor_rate,
        "floor_before_after_lines_per_s": [lines / floor_before, lines / floor_after],
        "real_lines_per_s": real_rate,
        "naive_lines_per_s": naive_rate,
        "naive_lines": naive_lines,
        "live_lines": total,
        "live_lines_per_s": live_rate,
        "calibration_lines_per_s": calib_rate,
    }
    client.close()
    return section


def real_ingest(ctx: Context, root: Path, path: Path) -> float:
    """Seconds for `Ingestor.ingest` to stage the whole file (a fresh prefix each time)."""
    client = ctx.redis()
    staging = Staging(client, Keys(ctx.prefix("real")))
    ingestor = Ingestor(root, staging, line_limit=LINE_LIMIT)
    start = time.perf_counter()
    stats = ingestor.ingest(path)
    seconds = time.perf_counter() - start
    if stats.rejects:
        raise AssertionError(f"{stats.rejects} lines of the generated workload were rejected")
    client.close()
    return seconds


def floor_ingest(client: redis.Redis, prefix: str, path: Path) -> float:
    """Seconds to read, parse (no validation) and XADD every raw line in pipelined batches."""
    stream = f"{Keys(prefix).tag}:floor"
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    pending = b""
    queued = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                orjson.loads(line)
                pipe.xadd(stream, {"l": line})
                queued += 1
                if queued == 1000:
                    pipe.execute()
                    queued = 0
    if queued:
        pipe.execute()
    return time.perf_counter() - start


def naive_ingest(client: redis.Redis, prefix: str, path: Path, count: int) -> float:
    """Seconds for the naive loop over the first `count` lines."""
    loaded = {p.name.removesuffix(".schema.json"): json.loads(p.read_text()) for p in schema_files()}
    registry: Registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in loaded.values()
    )
    docs = {name: loaded[name] for name in ("datum-line", "dataset-line", "dataset-version-line")}
    with open(path, "rb") as f:
        lines = [f.readline() for _ in range(count)]
    tag = Keys(prefix).tag
    start = time.perf_counter()
    for line in lines:
        doc: dict[str, Any] = json.loads(line)
        if "dataset-version" in doc:
            name, target = "dataset-version-line", doc["dataset-version"]
        elif "dataset" in doc:
            name, target = "dataset-line", doc["dataset"]
        else:
            name, target = "datum-line", doc["file"]
        jsonschema.validate(doc, docs[name], registry=registry)
        for key, value in doc["metadata"].items():
            client.hset(f"{tag}:naive:{target}", key, json.dumps(value))
    return time.perf_counter() - start


def schema_files() -> list[Path]:
    return sorted(schema_dir().glob("*.schema.json"))


def _append(path: Path, count: int, seed: int, ready: Any) -> None:
    """A writer process: make its `count` lines, wait at `ready`, then append them, 100 lines per
    write, as fast as it can. The lines are made before the clock starts: making them is ~0.5 s
    of CPU per 125,000 lines, which would otherwise run on the watcher's 2 cores and be counted
    against it."""
    lines = list(mixed_lines(count, seed=seed, tag=f"w{seed}"))
    ready.wait()
    with open(path, "ab") as f:
        for start in range(0, len(lines), 100):
            f.write(b"".join(lines[start : start + 100]))
            f.flush()


def start_writers(root: Path, total: int, first_seed: int = 100) -> tuple[list[Path], list[Any]]:
    """Start 8 writer processes on 8 execution folders, each with its lines made; return their
    files and processes once all of them are about to append."""
    paths = [root / f"exec-writer-{i}" / JSONL for i in range(WRITERS)]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    mp = multiprocessing.get_context("fork")
    ready = mp.Barrier(WRITERS + 1)
    workers = [
        mp.Process(target=_append, args=(p, total // WRITERS, first_seed + i, ready), daemon=True)
        for i, p in enumerate(paths)
    ]
    for w in workers:
        w.start()
    ready.wait(timeout=300)
    return paths, workers


def staged_offsets(client: redis.Redis, prefix: str, root: Path, paths: list[Path]) -> list[int]:
    """The checkpointed offsets of `paths` (0 when not seen yet)."""
    rels = [str(p.relative_to(root)) for p in paths]
    raw = client.hmget(Keys(prefix).offsets, rels)
    return [FileState.from_json(r).offset if r else 0 for r in raw]


def live_ingest(ctx: Context, total: int) -> float:
    """Seconds from the writers' start until the watcher has staged every line they wrote."""
    client = ctx.redis()
    root = ctx.folder("ingest-live-root")
    prefix = ctx.prefix("live")
    settings = Settings(
        data_dir=ctx.folder("ingest-live-data"),
        root=root,
        redis_url=ctx.redis_url,
        redis_prefix=prefix,
        database_url=ctx.sqlite("ingest-live"),
        log_level="WARNING",
    )
    watcher = procs.start_watcher(settings, ctx.workdir / "ingest-watcher.log", client)
    try:
        paths, workers = start_writers(root, total)
        start = time.perf_counter()
        for w in workers:
            w.join()
        sizes = [p.stat().st_size for p in paths]
        while staged_offsets(client, prefix, root, paths) != sizes:
            watcher.check()
            if time.perf_counter() - start > 600:
                raise TimeoutError("the watcher did not stage the writers' lines within 600 s")
            time.sleep(0.01)
        seconds = time.perf_counter() - start
    finally:
        watcher.stop()
        ctx.cleanup()
        client.close()
    return seconds
