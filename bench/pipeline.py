"""Written → visible: the whole pipeline, from the first byte of a file to its last property in the API.

Each row runs a fresh `sidecar up` (its private Redis, the watcher, a real Celery worker with the
default 2 threads and the HTTP server, all as `sidecar up` starts them) on a fresh root and data
folder: SQLite in the data folder (the defaults), or a fresh PostgreSQL schema given as
`SIDECAR_DATABASE_URL`. The lines are made first; the clock starts at the first byte written to
`<root>/<execution>/valohai.metadata.jsonl` (1 MiB writes, as fast as the disk takes them) and
stops when the HTTP API (`GET /api/v0/dataset-versions/`, `/api/v0/data/`) shows the last
property of every version (and datum). Completions are `POST /webhooks/events`, as the platform
sends them.

* (a) 200 versions × 500 lines of 3 keys, one execution, every version completed before the first
  line is written (the lines arrive as late lines). Lines interleaved: line j of every version,
  then line j + 1 (one execution building 200 versions at once).
* (b) the same lines, written and staged first (the file's checkpoint in Redis reaches its size),
  then the 200 completions.
* (c) 10,000 versions of 10 properties: per version, one version line and one datum line naming
  it; one `execution_completed` once the file is written (the platform sends it when the
  execution ends, whether or not the watcher has read everything yet).
* (d) 100,000 versions, as (c).
* While (d) loads, a line is appended every 0.25 s to another execution's file for a version
  completed before the load; each is timed until the API shows it (target p99 ≤ 1 s).

Floor (same run, same file, on the stack's own Redis): read + `orjson` parse + pipelined XADD of
the raw lines (`bench.ingest.floor_ingest`), before and after the row; their mean counts.
Target: ≥ 50% of the floor (written → visible takes at most twice the floor's time).

Store floor (`bench/storefloor.py`), once the stack has stopped: every row the applies wrote,
written again in one transaction into an empty store by the apply's own bulk path. It is what no
apply of this schema can beat; the floor column gives it as a share of the ingest floor.

"Visible" is read through the API with a filter on the last key (`exists p1499`; with
`count=exact`, which a capped count honours), polled no more often than twice the poll's own
cost, so that polling takes at most a third of a core; the end time is the start of the first
poll that saw everything (its snapshot is taken then). The time the file's checkpoint reached its
size ("staged after") is read from Redis in the same loop: the ingest side's share.
A row that does not finish within its share of the time box says how far it got.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from worker.keys import Keys
from worker.tail import FileState

from . import storefloor
from .common import Context, Row, Section, fmt_int, fmt_lat, fmt_ms, fmt_rate, summary, verdict
from .ingest import floor_ingest
from .procs import Child, write_marker
from .workload import JSONL, interleaved_lines, version_line, versions_with_datums

PREFIX = "sidecar"  # `sidecar up`'s default Redis prefix
DATABASES = ("sqlite", "postgresql")
LATE_EVERY = 0.25  # seconds between two late lines during the bulk load
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class Plan:
    """One row's workload: `kind` "lines" ((a), (b)) or "versions" ((c), (d))."""

    key: str
    kind: str
    versions: int
    lines: int = 1  # per version ("lines" plans)
    completion_first: bool = False
    late: bool = False  # time late lines on another version while this one loads
    share: float = 0.1  # of the time box, per database

    @property
    def total_lines(self) -> int:
        return self.versions * self.lines if self.kind == "lines" else 2 * self.versions

    def describe(self, asked: Plan | None) -> str:
        if self.kind == "lines":
            text = (
                f"{fmt_int(self.versions)} versions × {fmt_int(self.lines)} lines of 3 keys, one execution, "
                + ("completed before the first line" if self.completion_first else "staged, then completed")
            )
        else:
            text = (
                f"{fmt_int(self.versions)} versions × 10 properties, a version line and a datum line "
                "each, then one `execution_completed`"
            )
        if asked is not None and asked.versions != self.versions:
            text += f" (QUICK: {fmt_int(asked.versions)} versions in a full run)"
        return text


FULL = (
    Plan("a", "lines", 200, 500, completion_first=True, share=0.08),
    Plan("b", "lines", 200, 500, share=0.08),
    Plan("c", "versions", 10_000, share=0.1),
    Plan("d", "versions", 100_000, late=True, share=0.2),
)
QUICK = (
    Plan("a", "lines", 20, 100, completion_first=True, share=0.08),
    Plan("b", "lines", 20, 100, share=0.08),
    Plan("c", "versions", 1_000, share=0.1),
    Plan("d", "versions", 5_000, late=True, share=0.2),
)


def run(ctx: Context) -> Section:
    section = Section("pipeline")
    plans = QUICK if ctx.quick else FULL
    for database in DATABASES:
        for plan, asked in zip(plans, FULL, strict=True):
            left = ctx.box.left()
            timeout = max(10.0, min(plan.share * ctx.box.seconds, left))
            result = _row(ctx, database, plan, timeout)
            name = f"{plan.key}_{database}"
            section.data[name] = result.to_json()
            section.rows.append(_table_row(database, plan, asked if ctx.quick else None, result))
            if result.late:
                stats = summary(result.late)
                section.rows.append(
                    Row(
                        f"late line → visible during a bulk load ({_db_name(database)})",
                        f"{len(result.late)} line(s) appended {LATE_EVERY:.2f} s apart "
                        "(each once the one before shows) to a completed "
                        f"version while ({plan.key}) loads; `sidecar up`",
                        fmt_lat(stats),
                        target="p99 ≤ 1 s",
                        verdict=verdict(stats["p99_ms"] <= 1000),
                    )
                )
    return section


def _db_name(database: str) -> str:
    return "SQLite" if database == "sqlite" else "PostgreSQL"


@dataclass
class Result:
    """What one row measured (seconds; `visible_s` None: not within the time box)."""

    lines: int
    bytes: int
    floor_s: float
    floors_s: list[float]
    visible_s: float | None
    staged_s: float | None
    timeout_s: float
    seen: int = 0  # versions (and datums) visible when the row ended
    wanted: int = 0
    late: list[float] = field(default_factory=list)
    polls: int = 0
    store: storefloor.StoreFloor | None = None  # the applies' rows written again at once

    def store_share(self) -> str:
        """How much of the ingest floor the store floor alone takes, as a ratio like the row's."""
        if self.store is None:
            return ""
        return (
            f"store floor {fmt_ms(self.store.seconds * 1000)} for {fmt_int(self.store.total_rows)} rows "
            f"({self.floor_s / self.store.seconds:.0%} of the ingest floor)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "bytes": self.bytes,
            "floor_s": self.floor_s,
            "floors_s": self.floors_s,
            "visible_s": self.visible_s,
            "staged_s": self.staged_s,
            "timeout_s": self.timeout_s,
            "seen": self.seen,
            "wanted": self.wanted,
            "polls": self.polls,
            "late_ms": [s * 1000 for s in self.late],
            "late_summary": summary(self.late) if self.late else None,
            "store_floor": self.store.to_json() if self.store is not None else None,
        }


def _table_row(database: str, plan: Plan, asked: Plan | None, result: Result) -> Row:
    floor = f"{fmt_ms(result.floor_s * 1000)} ({fmt_rate(result.lines / result.floor_s, 'lines/s')})"
    staged = (
        f"staged after {fmt_ms(result.staged_s * 1000)} ({result.floor_s / result.staged_s:.0%} of floor)"
        if result.staged_s
        else "not all staged"
    )
    what = f"written → visible ({plan.key}, {_db_name(database)})"
    if result.visible_s is None:
        return Row(
            what,
            plan.describe(asked),
            f"not visible within {result.timeout_s:.0f} s: {fmt_int(result.seen)} of "
            f"{fmt_int(result.wanted)} shown; {staged}",
            floor,
            f"< {result.floor_s / result.timeout_s:.1%} of floor",
            "≥ 50% of floor",
            "MISSED",
        )
    ratio = result.floor_s / result.visible_s
    return Row(
        what,
        plan.describe(asked),
        f"{fmt_ms(result.visible_s * 1000)} ({fmt_rate(result.lines / result.visible_s, 'lines/s')}); "
        + staged,
        f"{floor}; {result.store_share()}" if result.store is not None else floor,
        f"{ratio:.1%} of floor",
        "≥ 50% of floor",
        verdict(ratio >= 0.5),
    )


# -- the workloads -----------------------------------------------------------------------------


def _lines(plan: Plan, dataset: str) -> list[bytes]:
    rng = random.Random(f"{plan.key}-{plan.versions}")
    if plan.kind == "lines":
        return interleaved_lines(rng, dataset, plan.versions, plan.lines)
    return versions_with_datums(rng, dataset, plan.versions)


def _version_names(plan: Plan) -> list[str]:
    width = 3 if plan.kind == "lines" else 6
    return [f"v{i:0{width}d}" for i in range(plan.versions)]


def _last_key(plan: Plan) -> str:
    return f"p{3 * plan.lines - 1}" if plan.kind == "lines" else "p9"


# -- one row -----------------------------------------------------------------------------------


def _row(ctx: Context, database: str, plan: Plan, timeout: float) -> Result:
    name = f"pipe-{plan.key}-{database}"
    dataset, execution = f"bench-{plan.key}", f"exec-{plan.key}"
    lines = _lines(plan, dataset)
    data = b"".join(lines)
    copy = ctx.folder(f"{name}-floor") / JSONL  # the floor reads the same bytes, outside the root
    copy.write_bytes(data)
    with contextlib.ExitStack() as outer:
        url = outer.enter_context(ctx.database(database, name)) if database == "postgresql" else None
        stack = outer.enter_context(contextlib.ExitStack())
        up = stack.enter_context(Stack.running(ctx, name, url))
        floors = [_floor(up, ctx, copy)]
        result = _load(up, plan, dataset, execution, data, timeout)
        floors.append(_floor(up, ctx, copy))
        source = url or f"sqlite:///{up.data / 'sidecar.db'}"
        stack.close()  # the stack stops before the store floor, which then has the machine alone
        if result.visible_s is not None:
            result.store = storefloor.measure(ctx, database, source, name)
    copy.unlink()
    result.floors_s = floors
    result.floor_s = sum(floors) / len(floors)
    return result


def _floor(up: Stack, ctx: Context, path: Path) -> float:
    prefix = ctx.prefix("pipeline-floor")
    seconds = floor_ingest(up.redis, prefix, path)
    up.redis.delete(f"{Keys(prefix).tag}:floor")
    return seconds


def _load(up: Stack, plan: Plan, dataset: str, execution: str, data: bytes, timeout: float) -> Result:
    versions = _version_names(plan)
    path = up.root / execution / JSONL
    path.parent.mkdir()
    time.sleep(0.3)  # the folder's inotify watch is in place, as for an execution started earlier
    if plan.completion_first:
        for version in versions:
            up.complete_version(dataset, version)
        up.wait_for(lambda: up.versions(dataset, None) == len(versions) and up.idle(), 120, "completions")
    late = LateLines(up) if plan.late else None
    if late is not None:
        late.prepare()
    rel = f"{execution}/{JSONL}"
    result = Result(plan.total_lines, len(data), 0.0, [], None, None, timeout, wanted=len(versions))
    start = time.perf_counter()
    if late is not None:
        late.start()
    try:
        with open(path, "wb") as f:
            for at in range(0, len(data), 1 << 20):
                f.write(data[at : at + (1 << 20)])
        if plan.kind == "lines" and not plan.completion_first:
            while up.staged(rel) < len(data):  # staged first, then completed
                up.process.check()
                if time.perf_counter() - start > timeout:
                    return result
                time.sleep(0.005)
            result.staged_s = time.perf_counter() - start
            for version in versions:
                up.complete_version(dataset, version)
        elif plan.kind == "versions":
            up.complete_execution(execution)
        _watch(up, plan, dataset, execution, rel, len(data), versions[-1], start, result)
    finally:
        if late is not None:
            result.late = late.stop()
    return result


def _watch(
    up: Stack,
    plan: Plan,
    dataset: str,
    execution: str,
    rel: str,
    size: int,
    last: str,
    start: float,
    result: Result,
) -> None:
    """Poll until every version (and datum) shows its last property, or the row's time is up."""
    key = _last_key(plan)
    wanted = plan.versions * (2 if plan.kind == "versions" else 1)
    result.wanted = wanted
    last_seen = False
    wait = 0.01
    while True:
        up.process.check()
        now = time.perf_counter()
        if result.staged_s is None and up.staged(rel) >= size:
            result.staged_s = now - start
        if not last_seen:
            # Cheap and necessary: the last version written shows its last key.
            last_seen = up.has_key(dataset, last, key)
            seen = 0
        else:
            seen = up.versions(dataset, f"exists {key}")
            if seen == plan.versions and plan.kind == "versions":
                seen += up.datums(execution, "exists idx")
            result.polls += 1
        if seen >= wanted:
            result.visible_s = now - start
            result.seen = seen
            if result.staged_s is None:
                result.staged_s = result.visible_s
            return
        cost = time.perf_counter() - now
        if now - start > result.timeout_s:
            result.seen = seen if last_seen else up.versions(dataset, f"exists {key}")
            return
        wait = max(0.01, 2 * cost)
        time.sleep(wait)


# -- late lines during a bulk load ---------------------------------------------------------------


class LateLines:
    """Appends a line to a completed version's file every LATE_EVERY s; times each until visible."""

    DATASET, VERSION, EXECUTION = "bench-late", "v0", "exec-late"

    def __init__(self, up: Stack) -> None:
        self.up = up
        self.path = up.root / self.EXECUTION / JSONL
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="late-lines", daemon=True)
        self.error: BaseException | None = None

    def prepare(self) -> None:
        """The version, written, staged, completed and visible, before the clock starts."""
        self.path.parent.mkdir()
        uri = f"dataset://{self.DATASET}/{self.VERSION}"
        self.path.write_bytes(version_line(uri, {"late_write": -1}))
        rel = f"{self.EXECUTION}/{JSONL}"
        size = self.path.stat().st_size
        self.up.wait_for(lambda: self.up.staged(rel) >= size, 60, "late version staged")
        self.up.complete_version(self.DATASET, self.VERSION)
        self.up.wait_for(lambda: self._value() == -1, 60, "late version visible")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> list[float]:
        self.done.set()
        self.thread.join(timeout=30)
        if self.error is not None:
            raise self.error
        return self.samples

    def _value(self, client: httpx.Client | None = None) -> Any:
        properties = self.up.version_properties(self.DATASET, self.VERSION, client)
        return None if properties is None else properties.get("late_write")

    def _run(self) -> None:
        uri = f"dataset://{self.DATASET}/{self.VERSION}"
        try:
            with self.up.client() as client, open(self.path, "ab", buffering=0) as f:
                i = 0
                while not self.done.wait(LATE_EVERY):
                    begin = time.perf_counter()
                    f.write(version_line(uri, {"late_write": i}))
                    while self._value(client) != i:
                        if time.perf_counter() - begin > 60:
                            raise TimeoutError(f"late line {i} not visible within 60 s")
                        time.sleep(0.005)
                    self.samples.append(time.perf_counter() - begin)
                    i += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc


# -- the stack -----------------------------------------------------------------------------------


class Stack:
    """A running `sidecar up` on its own root and data folder, and clients of its API and Redis."""

    def __init__(self, ctx: Context, name: str, database_url: str | None) -> None:
        self.root = ctx.folder(f"{name}-root")
        self.data = ctx.folder(f"{name}-data")
        self.port = _free_port()
        self.log_path = ctx.workdir / f"{name}-up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env["PYTHONUNBUFFERED"] = "1"
        if database_url:
            env["SIDECAR_DATABASE_URL"] = database_url
        args = ["up", "--root", str(self.root), "--data-dir", str(self.data), "--port", str(self.port)]
        self.process = Child(args, env, self.log_path)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        self.keys = Keys(PREFIX)
        self.redis: redis.Redis = redis.Redis()  # replaced once `sidecar up` wrote its URL
        self._ready()

    @classmethod
    @contextlib.contextmanager
    def running(cls, ctx: Context, name: str, database_url: str | None) -> Iterator[Stack]:
        stack = cls(ctx, name, database_url)
        try:
            yield stack
        finally:
            stack.stop()

    def _ready(self) -> None:
        url_file = self.data / "redis.url"
        self.wait_for(url_file.exists, START_TIMEOUT, "private Redis")
        self.redis = redis.Redis.from_url(url_file.read_text().strip())
        self.wait_for(self._healthy, START_TIMEOUT, "API")
        self.wait_for(lambda: self.process.log().count(" ready.") >= 2, START_TIMEOUT, "workers")
        marker = write_marker(self.root)  # the watcher's first scan is done once it is staged
        self.wait_for(lambda: bool(self.redis.hexists(self.keys.offsets, marker)), START_TIMEOUT, "watcher")

    def _healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def client(self) -> httpx.Client:
        """Another client of the API (one per thread)."""
        return httpx.Client(base_url=str(self.http.base_url), timeout=60)

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        self.process.wait_for(ready, timeout, what)

    def stop(self) -> None:
        self.http.close()
        self.redis.close()
        self.process.stop(timeout=30)

    # -- what the platform sends --

    def _event(self, body: dict[str, Any]) -> None:
        answer = self.http.post("/webhooks/events", json=body)
        if answer.status_code != 202:
            raise RuntimeError(f"webhook answered {answer.status_code}: {answer.text[:300]}")

    def complete_version(self, dataset: str, version: str) -> None:
        uri = f"dataset://{dataset}/{version}"
        data = {"dataset": {"name": dataset}, "version": {"name": version, "uri": uri}}
        self._event({"type": "dataset_version_created", "data": data})

    def complete_execution(self, execution: str) -> None:
        self._event({"type": "execution_completed", "data": {"valohai.execution-id": execution}})

    # -- what a user sees --

    def _count(self, path: str, params: dict[str, str]) -> int:
        answer = self.http.get(path, params={**params, "limit": "1", "count": "exact"})
        answer.raise_for_status()
        return int(answer.json()["count"])

    def versions(self, dataset: str, filter: str | None) -> int:
        """How many versions of `dataset` match `filter` (all of them: None)."""
        params = {"dataset": dataset} | ({"filter": filter} if filter else {})
        try:
            return self._count("/api/v0/dataset-versions/", params)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:  # no such dataset yet
                return 0
            raise

    def datums(self, execution: str, filter: str) -> int:
        return self._count("/api/v0/data/", {"output_execution": execution, "filter": filter})

    def version_properties(
        self, dataset: str, version: str, client: httpx.Client | None = None
    ) -> dict[str, Any] | None:
        answer = (client or self.http).get(
            "/api/v0/dataset-versions/", params={"dataset": dataset, "name": version, "limit": "1"}
        )
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        results = answer.json()["results"]
        return dict(results[0]["properties"]) if results else None

    def has_key(self, dataset: str, version: str, key: str) -> bool:
        properties = self.version_properties(dataset, version)
        return properties is not None and key in properties

    # -- what Redis holds --

    def staged(self, rel: str) -> int:
        """The offset of the file's checkpoint (0: not read yet)."""
        raw = self.redis.hget(self.keys.offsets, rel)
        return FileState.from_json(raw.decode() if isinstance(raw, bytes) else raw).offset if raw else 0

    def idle(self) -> bool:
        """Nothing due, nothing queued."""
        return int(self.redis.zcard(self.keys.due)) == 0 and int(self.redis.llen(self.keys.queue)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
