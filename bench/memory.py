"""Watcher memory: the resident set of `sidecar watch` on many folders, and on one huge file.

Three fresh `sidecar watch` processes, RSS sampled from /proc every 100 ms from their start until
the watcher has checkpointed every file, then 3 s more (with lines appended to some files):

- reference: an empty root (what the process costs before it watches anything);
- 10,000 execution folders, each with a small `valohai.metadata.jsonl` (inotify watches them all);
- one 1 GiB file of 1 MiB lines (each just under the 1 MiB line limit, so each is staged whole).
  A helper trims that stream meanwhile, so that Redis does not have to hold the whole GiB.

Reported: peak RSS (VmHWM). Target: ≤ 150 MB and ≤ 200 MB.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker.keys import Keys
from worker.settings import Settings
from worker.tail import FileState
from worker.uris import Target

from . import procs
from .common import Context, MiB, Row, Section, fmt_int, verdict
from .workload import JSONL, dataset_line, datum_line, dumps, write_lines

FOLDERS = 10_000
BIG_FILE = 1024 * MiB
LINE_LIMIT = MiB
MB = 1_000_000


def run(ctx: Context) -> Section:
    section = Section("memory")
    client = ctx.redis()
    try:
        base = _watch(ctx, client, "reference", lambda root: None, lambda c, p, r: True)
        section.data["reference"] = base

        folders = 500 if ctx.quick else FOLDERS
        many = _watch(ctx, client, "folders", lambda root: _folders(root, folders), _all_files(folders + 1))
        section.data["folders"] = {**many, "folders": folders}
        section.rows.append(
            Row(
                "watcher memory (many folders)",
                f"{fmt_int(folders)} execution folders watched, 3 lines each" + _asked(folders, FOLDERS),
                f"peak RSS {many['peak_mib'] * MiB / MB:.0f} MB",
                f"empty root {base['peak_mib'] * MiB / MB:.0f} MB",
                f"{many['peak_mib'] / base['peak_mib']:.2f}× empty root",
                "≤ 150 MB",
                verdict(many["peak_mib"] * MiB <= 150 * MB),
            )
        )

        size = 32 * MiB if ctx.quick else BIG_FILE
        big = _watch(ctx, client, "big", lambda root: _big_file(root, size), _big_done, trim=True)
        section.data["big"] = {**big, "bytes": size}
        section.rows.append(
            Row(
                "watcher memory (huge file)",
                f"one {size // MiB:,} MiB file of 1 MiB lines ({size // MiB:,} lines)"
                + _asked(size, BIG_FILE),
                f"peak RSS {big['peak_mib'] * MiB / MB:.0f} MB",
                f"empty root {base['peak_mib'] * MiB / MB:.0f} MB",
                f"{big['peak_mib'] / base['peak_mib']:.2f}× empty root",
                "≤ 200 MB",
                verdict(big["peak_mib"] * MiB <= 200 * MB),
            )
        )
    finally:
        client.close()
    return section


def _asked(done: int, asked: int) -> str:
    return "" if done >= asked else " (quick run; the full run uses the asked size)"


Prepare = Callable[[Path], Any]
Done = Callable[[redis.Redis, str, Path], bool]


def _watch(
    ctx: Context, client: redis.Redis, name: str, prepare: Prepare, done: Done, *, trim: bool = False
) -> dict[str, Any]:
    """Start a watcher on a prepared root, sample its RSS until `done`, then 3 s more."""
    root = ctx.folder(f"memory-{name}")
    prefix = ctx.prefix(f"memory-{name}")
    prepare(root)
    settings = Settings(
        data_dir=ctx.folder(f"memory-{name}-data"),
        root=root,
        redis_url=ctx.redis_url,
        redis_prefix=prefix,
        database_url=ctx.sqlite(f"memory-{name}"),
        log_level="WARNING",
        line_limit=LINE_LIMIT,
    )
    stop = threading.Event()
    trimmer = (
        threading.Thread(target=_trim, args=(ctx.redis_url, prefix, stop), daemon=True) if trim else None
    )
    if trimmer:
        trimmer.start()
    # Not procs.start_watcher: the RSS is sampled from the process's start, its first scan included.
    marker = procs.write_marker(root)
    timeline: list[tuple[float, float]] = []
    start = time.perf_counter()
    watcher = procs.Child(["watch"], procs.child_env(settings), ctx.workdir / f"memory-{name}.log")
    try:
        while not (client.hexists(Keys(prefix).offsets, marker) and done(client, prefix, root)):
            watcher.check()
            if time.perf_counter() - start > 600:
                raise TimeoutError(f"memory/{name}: the watcher did not finish within 600 s")
            timeline.append((time.perf_counter() - start, procs.rss_mib(watcher.pid)[0]))
            time.sleep(0.1)
        staged = time.perf_counter() - start
        _touch_some(root)
        settle = time.perf_counter() + 3
        while time.perf_counter() < settle:
            timeline.append((time.perf_counter() - start, procs.rss_mib(watcher.pid)[0]))
            time.sleep(0.1)
        current, peak = procs.rss_mib(watcher.pid)
        watcher.check()
    finally:
        watcher.stop()
        stop.set()
        if trimmer:
            trimmer.join()
        ctx.cleanup()
    return {"peak_mib": peak, "final_mib": current, "staged_seconds": staged, "timeline": timeline}


def _folders(root: Path, count: int) -> None:
    rng = random.Random(5)
    for i in range(count):
        lines = [dataset_line(rng, f"dataset://bench-mem-{i % 100}")]
        lines += [datum_line(rng, i * 2 + k, []) for k in range(2)]
        write_lines(root / f"exec-{i:05d}" / JSONL, lines)


def _all_files(count: int) -> Done:
    def done(client: redis.Redis, prefix: str, _root: Path) -> bool:
        return int(client.hlen(Keys(prefix).offsets)) >= count

    return done


def _big_file(root: Path, size: int) -> None:
    """`size` bytes of version lines of just under 1 MiB each (the limit), written in 1 MiB writes."""
    filler = "x" * (LINE_LIMIT - 200)
    path = root / "exec-big" / JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            line = dumps(
                {"dataset-version": "dataset://bench-mem-big/v1", "metadata": {"i": i, "blob": filler}}
            )
            f.write(line)


def _big_done(client: redis.Redis, prefix: str, root: Path) -> bool:
    path = root / "exec-big" / JSONL
    raw = client.hget(Keys(prefix).offsets, f"exec-big/{JSONL}")
    return raw is not None and FileState.from_json(raw).offset >= path.stat().st_size


def _trim(redis_url: str, prefix: str, stop: threading.Event) -> None:
    """Keep the huge file's stream empty while it is staged (Redis need not hold the GiB)."""
    client = redis.Redis.from_url(redis_url)
    stream = Keys(prefix).stream(Target("version", "bench-mem-big", "v1"))
    while not stop.is_set():
        client.xtrim(stream, maxlen=0, approximate=False)
        time.sleep(0.05)
    client.delete(stream)
    client.close()


def _touch_some(root: Path) -> None:
    """Append a line to a few files, so the event path runs too."""
    files = sorted(root.glob(f"*/{JSONL}"))[:20]
    rng = random.Random(9)
    for path in files:
        with open(path, "ab") as f:
            f.write(dataset_line(rng, "dataset://bench-mem-late"))
