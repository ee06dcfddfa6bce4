"""Shared plumbing of the benchmarks: services, statistics, results, time boxes.

Every benchmark gets a `Context`: where Redis and PostgreSQL are, a scratch folder, a unique key
prefix per use (cleaned up afterwards), private PostgreSQL schemas (dropped afterwards), and the
time box it must fit in. It returns a `Section`: table rows plus raw data for the JSON file and
the plots.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, Table

from worker.keys import Keys
from worker.store.db import make_engine
from worker.store.models import Base

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
MiB = 1024 * 1024


# -- statistics -----------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of latencies given in seconds (reported in milliseconds)."""
    ms = [s * 1000 for s in samples]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else math.nan,
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
    }


def fmt_ms(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def fmt_lat(stats: dict[str, float]) -> str:
    """`p50 1.2 ms · p90 … · p99 …` of a `summary`."""
    return " · ".join(f"{k} {fmt_ms(stats[k + '_ms'])}" for k in ("p50", "p90", "p99"))


def fmt_rate(value: float, unit: str) -> str:
    if value >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}"


def fmt_int(value: int) -> str:
    return f"{value:,}"


# -- results --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table. `verdict`: met, MISSED, or info (no target)."""

    what: str
    workload: str
    measured: str
    floor: str = "—"
    ratio: str = "—"
    target: str = "—"
    verdict: str = "info"


@dataclass
class Section:
    """What one benchmark produced."""

    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    load: dict[str, float] = field(default_factory=dict)  # load average before/after, time box

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": [asdict(r) for r in self.rows],
            "data": self.data,
            "notes": self.notes,
            "seconds": self.seconds,
            "error": self.error,
            "load": self.load,
        }


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- time boxes -----------------------------------------------------------------------------------


@dataclass
class Box:
    """A time box: `left()` seconds remain until `deadline` (perf_counter based)."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def over(self) -> bool:
        return self.left() <= 0


def fit(rate: float, seconds: float, low: int, high: int) -> int:
    """How many items at `rate` per second fit in `seconds`, clamped to [low, high]."""
    if rate <= 0 or math.isnan(rate):
        return low
    return max(low, min(high, int(rate * seconds)))


def scaled(done: int, asked: int, unit: str) -> str:
    """`60,000 lines` or `60,000 lines (of 1,000,000 asked: time box)`."""
    if done >= asked:
        return f"{fmt_int(done)} {unit}"
    return f"{fmt_int(done)} {unit} (scaled down from {fmt_int(asked)} to fit the time box)"


# -- services -------------------------------------------------------------------------------------


@dataclass
class Context:
    """Where things are, and the box a benchmark must fit in."""

    quick: bool
    redis_url: str
    postgres_url: str
    workdir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    box: Box = field(default_factory=lambda: Box(60))
    _prefixes: list[str] = field(default_factory=list)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def prefix(self, name: str) -> str:
        """A fresh Redis key prefix (and Celery queue) for this run; cleaned by `cleanup`."""
        prefix = f"bench-{self.run_id}-{name}-{len(self._prefixes)}"
        self._prefixes.append(prefix)
        return prefix

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cleanup(self) -> None:
        """Delete every Redis key of every prefix handed out so far, and have Redis give back
        the memory they held.

        Without MEMORY PURGE, Redis's allocator keeps the pages it freed (~550 MB of RSS for 27 MB
        of data after the ingest benchmark) and hands them back over the next benchmark's run;
        purged, every benchmark starts from the same Redis, whatever ran before it.
        """
        client = self.redis()
        try:
            for prefix in self._prefixes:
                clean_redis(client, prefix)
            with contextlib.suppress(redis.ResponseError):  # not jemalloc: nothing to purge
                client.memory_purge()
        finally:
            client.close()
        self._prefixes.clear()

    @contextlib.contextmanager
    def postgres(self, name: str) -> Iterator[str]:
        """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
        schema = f"bench_{self.run_id}_{name}"
        admin = make_engine(self.postgres_url)
        try:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
            sep = "&" if "?" in self.postgres_url else "?"
            yield f"{self.postgres_url}{sep}options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.dispose()

    def sqlite(self, name: str) -> str:
        path = self.folder("sqlite") / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"

    @contextlib.contextmanager
    def database(self, kind: str, name: str) -> Iterator[str]:
        """`kind` sqlite or postgresql: a fresh, empty database URL for the block."""
        if kind == "postgresql":
            with self.postgres(name) as url:
                yield url
        else:
            yield self.sqlite(name)


def clean_redis(client: redis.Redis, prefix: str) -> None:
    """Delete a prefix's keys, its Celery queue and kombu's bindings for it."""
    keys = Keys(prefix)
    patterns = (keys.pattern(), f"{keys.queue}*", f"_kombu.binding.{keys.queue}*")
    for pattern in patterns:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    client.delete(f"_kombu.binding_permanent.{keys.queue}")


def new_engine(url: str) -> Engine:
    """An engine with the tables created, the way the tests create them."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    return engine


def table(model: type[Base]) -> Table:
    """A model's Table (for Core inserts and index DDL), typed as such."""
    return Base.metadata.tables[model.__tablename__]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the machine ----------------------------------------------------------------------------------


def machine(redis_url: str, postgres_url: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_at_start": os.getloadavg()[0],
        "redis": _redis_version(redis_url),
        "postgres": _postgres_version(postgres_url),
        "commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dirty": bool(_version(["git", "-C", str(REPO), "status", "--porcelain", "worker"])),
    }


def _redis_version(url: str) -> str:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        version = str(client.info("server").get("redis_version", ""))
        client.close()
        return version
    except redis.RedisError:
        return ""


def _postgres_version(url: str) -> str:
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            version = str(conn.exec_driver_sql("SHOW server_version").scalar() or "")
        engine.dispose()
        return version.split()[0] if version else ""
    except Exception:  # the benchmarks that need it will say why
        return ""


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
