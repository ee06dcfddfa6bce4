"""The database unavailable while a real worker applies: SQLite locked, PostgreSQL cut off.

(a) SQLite: another connection holds the write lock (`BEGIN EXCLUSIVE`) while a real `sidecar
worker` subprocess is asked to apply a completed version. With the shipped busy timeout (30 s) the
apply waits for the lock; with a busy timeout shorter than the hold (the worker is started
through a launcher that lowers `worker.store.db.SQLITE_BUSY_MS`, which is not configurable) it
fails with "database is locked", the task retries with backoff, and converges once the lock goes.

(b) PostgreSQL: the shared server is never stopped. A TCP proxy in the test stands between the
worker and PostgreSQL; it is cut (listener and every connection closed) while a big apply runs and
while more completions arrive, then restored. The task retries on OperationalError; the sweep
(called here in the watcher's place) is the backstop.

Both end with the oracle: the database, key by key, equals the fold of the lines.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from tests.e2e_helpers import clean_env, free_port, kill_group, stop_group, wait_until
from tests.helpers import forget_broker_state
from tests.oracle import assert_matches_db, db_state, expected_state
from tests.retention_check import assert_retention_keeps_the_oracle
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.settings import Settings
from worker.staging import Staging
from worker.store.db import make_engine
from worker.store.models import Base
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

DEADLINE = 90.0
JSONL = "valohai.metadata.jsonl"
RECEIVED = "] received"
RETRY = " retry: Retry in "
SUCCEEDED = "] succeeded in "

# Runs `sidecar <args>` with the SQLite busy timeout of worker/store/db.py replaced (it is a
# module constant read when an engine is made, not a setting).
LAUNCHER = (
    "import os, sys\n"
    "import worker.store.db as db\n"
    "db.SQLITE_BUSY_MS = int(os.environ['TEST_SQLITE_BUSY_MS'])\n"
    "from worker.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class Worker:
    """One `sidecar worker --concurrency 1` subprocess in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path, busy_ms: int | None = None) -> None:
        self.redis_url = settings.effective_redis_url()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = clean_env(settings.as_env())
        if busy_ms is None:
            command = [sys.executable, "-m", "worker.cli"]
        else:
            command = [sys.executable, "-c", LAUNCHER]
            env["TEST_SQLITE_BUSY_MS"] = str(busy_ms)
        self.proc = subprocess.Popen(
            [*command, "worker", "--concurrency", "1"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"worker exited:\n{self.log()[-3000:]}"
            return " ready." in self.log()

        wait_until(ready, timeout=DEADLINE, what="worker ready")

    def wait(self, predicate: Callable[[], object], what: str, interval: float = 0.1) -> None:
        """`wait_until`, failing with the reason first and then the worker's log as it is then."""
        try:
            wait_until(predicate, timeout=DEADLINE, interval=interval, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n-- worker log (end):\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_group(self.proc, timeout=30)
        kill_group(self.proc)
        self._log.close()
        # Celery's remote control binds every worker in the shared `_kombu.binding.celery.pidbox`
        # set and never unbinds it: take this worker's binding out (its name is worker/cli.py's).
        client = redis.Redis.from_url(self.redis_url)
        name = f"sidecar-{self.proc.pid}@{socket.gethostname()}.celery.pidbox"
        client.srem("_kombu.binding.celery.pidbox", f"\x06\x16\x06\x16{name}")
        client.close()


@pytest.fixture
def cleanup(redis_url: str, prefix: str) -> Iterator[list[Any]]:
    """Things to stop at the end (workers, proxies), then this test's broker state in Redis."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()
    client = redis.Redis.from_url(redis_url)
    forget_broker_state(client, Keys(prefix).queue, Keys(prefix).bulk_queue)
    client.close()


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    """Engines made with the tables, each disposed at the end, pass or fail."""
    made: list[Engine] = []

    def make(url: str) -> Engine:
        engine = make_engine(url)
        made.append(engine)
        Base.metadata.create_all(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def make_settings(tmp_path: Path, redis_url: str, prefix: str, database_url: str) -> Settings:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return Settings(
        data_dir=tmp_path / "data",
        root=root,
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        sweep_after=1.0,
    )


def append(path: Path, kind: str, uri: str, metas: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps({kind: uri, "metadata": m}) + "\n" for m in metas)


def metas(n: int, tag: str) -> list[dict[str, Any]]:
    """Changes, equal values, deletes; `last` makes the final state depend on the last line."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        meta: dict[str, Any] = {f"k{i % 17}": f"{tag}{i // 17}", "last": i}
        if i % 5 == 0:
            meta[f"k{(i * 3) % 17}"] = None
        out.append(meta)
    return out


class Pipeline:
    """The in-process watcher side: stage a file, complete versions, enqueue like the watcher."""

    def __init__(self, settings: Settings, staging: Staging) -> None:
        self.staging = staging
        self.ingestor = Ingestor(settings.require_root(), staging, line_limit=settings.line_limit)
        self.enqueue = Enqueuer(make_app(settings))

    def ingest(self, path: Path) -> None:
        for key in sorted(self.ingestor.ingest(path).due):
            self.enqueue(key)

    def complete(self, version: Target) -> None:
        for key in self.staging.complete_version(version):
            self.enqueue(key)

    def complete_execution(self, execution: str) -> None:
        for key in self.staging.complete_execution(execution):
            self.enqueue(key)

    def converged(self, engine: Engine, expected: dict[str, dict[str, Any]], completed: list[str]) -> bool:
        """The watcher's sweep (re-sends what waits too long), then the oracle."""
        self.staging.sweep(self.enqueue.drain, older_than=3.0)
        assert_matches_db(engine, expected, completed=completed)
        assert not self.staging.due_targets(older_than=-1), "targets still due"
        return True


# -- (a) SQLite: the write lock held by another connection --------------------------------------


@pytest.mark.parametrize(
    ("busy_ms", "hold"),
    [pytest.param(None, 2.5, id="busy-timeout-30s-outwaits-the-lock"), pytest.param(300, 3.0, id="retry")],
)
def test_sqlite_locked_during_the_apply(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    staging: Staging,
    cleanup: list[Any],
    engines: Callable[[str], Engine],
    busy_ms: int | None,
    hold: float,
) -> None:
    db_path = tmp_path / "sidecar.db"
    engine = engines(f"sqlite:///{db_path}")  # WAL mode, as the worker's
    settings = make_settings(tmp_path, redis_url, prefix, f"sqlite:///{db_path}")
    worker = Worker(settings, tmp_path / "worker.log", busy_ms)
    cleanup.append(worker)
    pipeline = Pipeline(settings, staging)
    v = Target("version", "locked", "v1")
    path = settings.require_root() / "exec-l" / JSONL
    append(path, "dataset", v.dataset_target.key, [{"domain": "x", "gone": 1}, {"gone": None}])
    append(path, "dataset-version", v.key, metas(200, "a"))
    pipeline.ingest(path)
    worker.wait_ready()
    # The first sighting registers the version as building; let that apply finish first.
    worker.wait(lambda: db_state(engine)[1] == {v.key: "building"}, "registered")
    received = worker.log().count(RECEIVED)

    lock = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        pipeline.complete(v)
        append(path, "dataset-version", v.key, metas(50, "late"))  # a write while the version completes
        pipeline.ingest(path)
        if busy_ms is None:
            worker.wait(lambda: worker.log().count(RECEIVED) > received, "apply received")
        else:
            worker.wait(lambda: RETRY in worker.log(), "a retry")
        time.sleep(max(0.0, hold - (time.monotonic() - locked_at)))
        # Nothing could commit while the lock was held (WAL: this connection still reads).
        status = lock.execute("SELECT status FROM dataset_versions").fetchall()
        assert status in ([], [("building",)]), status
        lock.execute("ROLLBACK")
    finally:
        lock.close()

    expected = expected_state([path])
    worker.wait(lambda: pipeline.converged(engine, expected, [v.key]), "convergence after the lock", 0.5)
    if busy_ms is not None:
        assert "database is locked" in worker.log()
    pipeline.complete_execution("exec-l")
    worker.wait(lambda: pipeline.converged(engine, expected, [v.key]), "the execution applied", 0.5)
    root = settings.require_root()
    assert_retention_keeps_the_oracle(engine, staging, root, [path], late=(path, v), completed=[v.key])


# -- (b) PostgreSQL behind a proxy that is cut and restored -------------------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 to an upstream; `cut` closes the listener and every connection
    (new connections are refused), `restore` listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.accepted = 0
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            sockets, self.sockets = self.sockets, set()
        if listener is not None:
            listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    stop = cut

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.settimeout(None)
            with self.lock:
                if self.listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self.sockets |= {client, server}
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.mark.postgres
def test_postgres_unreachable_during_the_apply(
    tmp_path: Path,
    redis_url: str,
    prefix: str,
    staging: Staging,
    pg_schema_url: str,
    cleanup: list[Any],
    engines: Callable[[str], Engine],
) -> None:
    engine = engines(pg_schema_url)  # the test's own path to PostgreSQL: never cut
    direct = make_url(pg_schema_url)
    proxy = Proxy((direct.host or "127.0.0.1", direct.port or 5432))
    cleanup.append(proxy)
    via_proxy = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = make_settings(tmp_path, redis_url, prefix, via_proxy)
    worker = Worker(settings, tmp_path / "worker.log")
    cleanup.append(worker)
    pipeline = Pipeline(settings, staging)

    big, small = Target("version", "cut", "big"), Target("version", "cut", "small")
    path_big = settings.require_root() / "exec-big" / JSONL
    path_small = settings.require_root() / "exec-small" / JSONL
    append(path_big, "dataset", big.dataset_target.key, [{"domain": "x"}])
    append(path_big, "dataset-version", big.key, metas(2000, "b"))
    append(path_small, "dataset-version", small.key, metas(30, "s"))
    pipeline.ingest(path_big)
    pipeline.ingest(path_small)
    worker.wait_ready()
    # Both versions registered as building (through the proxy), and the worker idle again.
    registered = {big.key: "building", small.key: "building"}
    worker.wait(lambda: db_state(engine)[1] == registered, "registered")
    worker.wait(lambda: worker.log().count(RECEIVED) == worker.log().count(SUCCEEDED), "the worker idle")
    assert proxy.accepted > 0

    received = worker.log().count(RECEIVED)
    pipeline.complete(big)
    worker.wait(lambda: worker.log().count(RECEIVED) > received, "big apply received")
    time.sleep(0.3)  # into the big apply (should it have committed already, the cut hits the rest)
    proxy.cut()
    cut_at = time.monotonic()
    pipeline.complete(small)  # completed while the database is unreachable
    append(path_big, "dataset-version", big.key, metas(20, "late"))
    pipeline.ingest(path_big)
    worker.wait(lambda: RETRY in worker.log(), "a retry")
    time.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))
    assert_matches_db(engine, {}, only=[small.key])  # nothing of it could be applied
    proxy.restore()

    expected = expected_state([path_big, path_small])
    worker.wait(
        lambda: pipeline.converged(engine, expected, [big.key, small.key]), "convergence after the cut", 0.5
    )
    cut_mid_query = [
        line for line in worker.log().splitlines() if RETRY in line and "connection failed" not in line
    ]
    print(f"{worker.log().count(RETRY)} retries; cut in the middle of a transaction: {bool(cut_mid_query)}")
    for execution in ("exec-big", "exec-small"):
        pipeline.complete_execution(execution)
    completed = [big.key, small.key]
    worker.wait(lambda: pipeline.converged(engine, expected, completed), "the executions applied", 0.5)
    paths = [path_big, path_small]
    root = settings.require_root()
    assert_retention_keeps_the_oracle(
        engine, staging, root, paths, late=(path_small, small), completed=completed
    )
