"""Append → staged: one line appended to a followed file, until its entry is in the Redis stream.

The real `sidecar watch` follows the root (inotify). The sampler appends one version line with a
plain `write` on a file it keeps open (as a runner's writer does), then waits on `XREAD BLOCK` for
the entry on that version's stream; the time between the write and the XREAD's return is the
sample. Idle: nothing else is written. Under load: 8 writer processes append to 8 other
executions at half of the ingest rate measured in this run (a sustained load the watcher can keep
up with; at a rate above it any latency is just the length of the backlog).
Target: p50 ≤ 10 ms, p99 ≤ 50 ms.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from pathlib import Path
from typing import Any

import redis

from worker.ingest import Ingestor
from worker.keys import Keys
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target

from . import procs
from .common import Context, Row, Section, fit, fmt_int, fmt_lat, fmt_rate, summary, verdict
from .ingest import staged_offsets
from .workload import JSONL, mixed_lines, summary_version_line, write_lines

ASKED_SAMPLES = 10_000
WRITERS = 8


def run(ctx: Context) -> Section:
    section = Section("latency")
    client = ctx.redis()
    root = ctx.folder("latency-root")
    prefix = ctx.prefix("latency")
    settings = Settings(
        data_dir=ctx.folder("latency-data"),
        root=root,
        redis_url=ctx.redis_url,
        redis_prefix=prefix,
        database_url=ctx.sqlite("latency"),
        log_level="WARNING",
    )
    path = root / "exec-latency" / JSONL
    write_lines(path, [summary_version_line(random.Random(0), "dataset://bench-lat/v1")])
    watcher = procs.start_watcher(settings, ctx.workdir / "latency-watcher.log", client)
    sampler = Sampler(client, Keys(prefix).stream(Target("version", "bench-lat", "v1")), path)
    try:
        sampler.wait_first()
        box = ctx.box
        # Idle: calibrate on 100 samples, then take as many as fit in 40% of the box.
        idle = sampler.take(100, time.perf_counter() + 30)
        per_sample = max(1e-4, sum(idle) / len(idle))
        more = fit(1 / per_sample, box.seconds * 0.4 - sum(idle), 0, ASKED_SAMPLES - len(idle))
        idle += sampler.take(more, time.perf_counter() + box.seconds * 0.5)

        # Under load: 8 writers at half the ingest capacity measured now (the machine is shared,
        # so it is measured right before the load) while we sample.
        capacity = _ingest_capacity(ctx)
        load_rate = capacity / 2
        duration = max(3.0, min(box.left() - 5, box.seconds * 0.45))
        writers = _start_load(root, load_rate, duration)
        time.sleep(0.5)  # let the load start
        loaded = sampler.take(ASKED_SAMPLES, time.perf_counter() + duration - 1.0)
        for w in writers:
            w.join()
        # Did the watcher keep up? Seconds from the writers' end until it staged all they wrote.
        paths = [root / f"exec-load-{i}" / JSONL for i in range(WRITERS)]
        sizes = [p.stat().st_size for p in paths]
        ended = time.perf_counter()
        while staged_offsets(client, prefix, root, paths) != sizes:
            watcher.check()
            if time.perf_counter() - ended > 300:
                raise TimeoutError("the watcher did not catch up with the load within 300 s")
            time.sleep(0.01)
        backlog = time.perf_counter() - ended
    finally:
        watcher.stop()
        client.close()

    for label, samples, workload in (
        ("append → staged (idle)", idle, "single appended version lines, watcher otherwise idle"),
        (
            "append → staged (under load)",
            loaded,
            f"while 8 writers append {fmt_rate(load_rate, 'lines/s')} "
            f"(half the ingest rate measured in this run); backlog when they stopped: {backlog:.1f} s",
        ),
    ):
        stats = summary(samples)
        asked = "" if len(samples) >= ASKED_SAMPLES else f" of {fmt_int(ASKED_SAMPLES)} asked (time box)"
        section.rows.append(
            Row(
                label,
                f"{fmt_int(len(samples))} samples{asked}; {workload}",
                fmt_lat(stats),
                target="p50 ≤ 10 ms, p99 ≤ 50 ms",
                verdict=verdict(stats["p50_ms"] <= 10 and stats["p99_ms"] <= 50),
            )
        )
        section.data[label] = {"summary": stats, "samples_ms": [s * 1000 for s in samples]}
    section.data["load_lines_per_s"] = load_rate
    section.data["backlog_seconds"] = backlog
    section.data["ingest_capacity_lines_per_s"] = capacity
    return section


class Sampler:
    """Appends one line and times it until its entry shows up on the stream."""

    def __init__(self, client: redis.Redis, stream: str, path: Path) -> None:
        self.client = client
        self.stream = stream
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.rng = random.Random(1)
        self.last = "0-0"

    def wait_first(self) -> None:
        """Wait until the watcher staged the line the file started with."""
        reply: Any = self.client.xread({self.stream: self.last}, count=1, block=30_000)
        if not reply:
            raise TimeoutError("the watcher did not stage the first line within 30 s")
        self.last = reply[0][1][-1][0].decode()

    def take(self, count: int, deadline: float) -> list[float]:
        samples: list[float] = []
        while len(samples) < count and time.perf_counter() < deadline:
            line = summary_version_line(self.rng, "dataset://bench-lat/v1")
            time.sleep(self.rng.random() / 1000)  # do not march in step with the watcher's loop
            start = time.perf_counter()
            os.write(self.fd, line)
            reply: Any = self.client.xread({self.stream: self.last}, count=1, block=10_000)
            end = time.perf_counter()
            if not reply:
                raise TimeoutError("an appended line was not staged within 10 s")
            self.last = reply[0][1][-1][0].decode()
            samples.append(end - start)
        return samples


def _ingest_capacity(ctx: Context) -> float:
    """Lines per second `Ingestor.ingest` stages here and now (2,000 mixed lines)."""
    root = ctx.folder("latency-calibration")
    path = root / "exec-calib" / JSONL
    write_lines(path, mixed_lines(2000, seed=3, tag="cal"))
    client = ctx.redis()
    staging = Staging(client, Keys(ctx.prefix("latency-calibration")))
    start = time.perf_counter()
    Ingestor(root, staging, line_limit=1 << 20).ingest(path)
    seconds = time.perf_counter() - start
    client.close()
    return 2000 / seconds


def _paced_writer(path: Path, rate: float, duration: float, seed: int) -> None:
    """Append `rate` lines per second for `duration` seconds, in 10 ms ticks."""
    lines = mixed_lines(int(rate * duration) + 100, seed=seed, tag=f"load{seed}")
    start = time.perf_counter()
    written = 0
    with open(path, "ab") as f:
        while (now := time.perf_counter() - start) < duration:
            due = int(rate * now) - written
            if due > 0:
                f.write(b"".join(next(lines) for _ in range(due)))
                f.flush()
                written += due
            time.sleep(0.01)


def _start_load(root: Path, total_rate: float, duration: float) -> list[Any]:
    mp = multiprocessing.get_context("fork")
    writers = []
    for i in range(WRITERS):
        path = root / f"exec-load-{i}" / JSONL
        path.parent.mkdir(parents=True, exist_ok=True)
        w = mp.Process(target=_paced_writer, args=(path, total_rate / WRITERS, duration, i), daemon=True)
        w.start()
        writers.append(w)
    return writers
