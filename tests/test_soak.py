"""The soak test: several writer processes, many versions, random faults, for a bounded time; the final
state equals the oracle.

A real `sidecar watch` and two `sidecar worker --concurrency 2` run while three writer processes
(`python -m tests.soak_oracle write`) append to and rewrite the files of four executions each, for
thirteen versions of three datasets. Writers rewrite valohai-utils style: truncate and write the
whole file (at once or slowly), or write a new file and rename it over the old one. They only ever
add lines at the end, keeping the earlier ones byte-identical and in place, so the oracle per file
is the fold of the lines of its final content: the staging layer dedupes the unchanged start of a
rewritten file (`lines:<file>` digests), so a rewrite stages only what is new. Some lines are
written in two pieces, some are invalid (each must become exactly one reject). One version is
completed before any line names it.

Faults, at random moments (each kind at least once): SIGKILL and restart of the watcher (while the
writers append: no line may be lost or reordered), SIGKILL and restart of a worker, duplicate
completions of a version from several threads at once, completions racing appends (versions
completed while their writers are still writing), floods of duplicate apply tasks, and lines
appended to (or the whole file rewritten for) an execution that has already completed (two
executions the test itself writes; their appends never expose half a line, since a completed
execution's last line counts even without its newline). Truncation is seen by the watcher whenever
a writer rewrites a file slowly (truncate, then write it back in pieces).

At the end the writers stop, every version is completed twice (from two threads at once) and every
execution once, and the database must equal the oracle key by key, with each key's history exactly
once and in file order.

`SIDECAR_SOAK_SECONDS` (default 40) sets how long the writers and faults run: CI uses the default;
set it to e.g. 900 for a long soak. `SIDECAR_SOAK_DATABASES` (default `postgres`, the deployment
that has several workers on several machines; `sqlite,postgres` for both) picks the databases, to
keep CI under its time budget. `SIDECAR_SOAK_SEED` replays a run's random choices (the writers' and
the faults'; not the timing).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.e2e_helpers import wait_until
from tests.helpers import forget_broker_state
from tests.soak_oracle import (
    JSONL,
    REPO,
    Oracle,
    Sidecar,
    assert_history,
    converged,
    soak_line,
)
from worker.settings import Settings
from worker.staging import REJECTS_KEPT, Staging
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SOAK_SECONDS = float(os.environ.get("SIDECAR_SOAK_SECONDS", "40"))
DATABASES = [d.strip() for d in os.environ.get("SIDECAR_SOAK_DATABASES", "postgres").split(",") if d.strip()]
WRITERS = 3
EXECUTIONS_PER_WRITER = 4
# The last one is completed before any line names it (a completion that comes first of all).
VERSIONS = [f"dataset://soak{d}/v{k}" for d in range(3) for k in range(4)] + ["dataset://soak0/early"]
FAULTS = [
    "kill-watcher",
    "kill-worker",
    "duplicate-completion",
    "completion-racing-appends",
    "enqueue-flood",
    "append-after-execution-completed",
]
LATE = ["soak-late-0", "soak-late-1"]  # executions completed first, written to afterwards
PAGE = 4096
CONVERGE = 240.0


@pytest.fixture(
    params=[pytest.param(d, marks=[pytest.mark.postgres]) if d == "postgres" else d for d in DATABASES]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Like conftest's, restricted to SIDECAR_SOAK_DATABASES."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sidecar.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


class Cluster:
    """The watcher, the workers and the writers; restarts keep each process's log file."""

    def __init__(self, settings: Settings, root: Path, logs: Path) -> None:
        self.settings = settings
        self.root = root
        self.logs = logs
        self.watch_env = settings.with_(root=None, rescan_interval=1.0, sweep_after=1.0).as_env()
        self.worker_env = settings.with_(root=None).as_env()
        self.watcher: Sidecar | None = None
        self.workers: list[Sidecar] = []
        self.dead: list[Sidecar] = []  # killed on purpose
        self.writers: list[subprocess.Popen[bytes]] = []
        self.starts = Counter[str]()

    def start_watcher(self) -> None:
        self.starts["watch"] += 1
        log = self.logs / f"watch-{self.starts['watch']}.log"
        self.watcher = Sidecar(["watch", "--root", str(self.root)], self.watch_env, log)

    def start_worker(self) -> Sidecar:
        self.starts["worker"] += 1
        worker = Sidecar(
            ["worker", "--concurrency", "2"],
            self.worker_env,
            self.logs / f"worker-{self.starts['worker']}.log",
        )
        self.workers.append(worker)
        return worker

    def kill_watcher(self) -> None:
        assert self.watcher is not None
        self.watcher.sigkill()
        self.dead.append(self.watcher)
        self.start_watcher()

    def kill_worker(self, rng: random.Random) -> None:
        worker = self.workers.pop(rng.randrange(len(self.workers)))
        worker.sigkill()
        self.dead.append(worker)
        self.start_worker()

    def live(self) -> list[Sidecar]:
        return ([self.watcher] if self.watcher else []) + self.workers

    def check_alive(self) -> None:
        """Nothing we did not kill may have died."""
        for proc in self.live():
            assert proc.alive(), f"{proc.args} exited with {proc.proc.returncode}:\n{proc.log()[-5000:]}"
        for w in self.writers:
            assert w.poll() in (None, 0), f"a writer exited with {w.returncode}"

    def stop(self) -> None:
        for w in self.writers:
            if w.poll() is None:
                w.kill()
            w.wait()
        for proc in self.live():
            proc.stop()


@pytest.fixture
def cluster(settings: Settings, staging: Staging, engine: Engine, tmp_path: Path) -> Iterator[Cluster]:
    root = settings.require_root()  # made by the settings fixture
    logs = tmp_path / "logs"
    logs.mkdir()
    c = Cluster(settings, root, logs)
    try:
        yield c
    finally:
        c.stop()
        forget_broker_state(staging.redis, staging.keys.queue, staging.keys.bulk_queue)


def complete_at_once(settings: Settings, staging: Staging, uri: str, threads: int) -> None:
    """`threads` threads, released together, each completing `uri` and enqueueing what it made due."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enqueue = Enqueuer(make_app(settings))
            barrier.wait(timeout=60)
            for key in staging.complete_version(Target.parse(uri)):
                enqueue(key)
        except BaseException as exc:  # reported below
            errors.append(exc)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=90)
    assert not errors, errors


def start_writers(cluster: Cluster, executions: list[str], seed: int, stop_file: Path) -> None:
    for w in range(WRITERS):
        mine = executions[w * EXECUTIONS_PER_WRITER : (w + 1) * EXECUTIONS_PER_WRITER]
        cluster.writers.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.soak_oracle", "write", "--root", str(cluster.root)]
                + ["--executions", ",".join(mine), "--versions", ",".join(VERSIONS), "--seed", str(seed + w)]
                + ["--stop-file", str(stop_file), "--limit", str(SOAK_SECONDS + 120)],
                cwd=REPO,
            )
        )


def append_after_completion(
    root: Path, staging: Staging, enqueue: Enqueuer, rng: random.Random, lines: int
) -> None:
    """Complete one of the LATE executions (again), then add whole lines to its file: appended, or
    the whole file written anew and renamed over the old one (valohai-utils style).

    The sidecar flushes a completed execution's last line even without its newline, so a reader
    must never see half a line here: an append stays within one 4 KiB page (the kernel publishes
    a write's new size page by page), padded with blank lines (which count as nothing) if needed."""
    execution = rng.choice(LATE)
    for key in staging.complete_execution(execution):
        enqueue(key)
    path = root / execution / JSONL
    path.parent.mkdir(exist_ok=True)
    data = b"".join(soak_line(rng, execution, VERSIONS)[0] for _ in range(lines))
    assert len(data) < PAGE
    size = path.stat().st_size if path.exists() else 0
    if rng.random() < 0.3:
        tmp = path.with_name(JSONL + ".tmp")
        tmp.write_bytes((path.read_bytes() if size else b"") + data)
        os.replace(tmp, path)
        return
    with open(path, "ab") as f:
        if size % PAGE + len(data) > PAGE:
            f.write(b"\n" * (PAGE - size % PAGE))
            f.flush()
        f.write(data)


def run_faults(
    cluster: Cluster, settings: Settings, staging: Staging, enqueue: Enqueuer, rng: random.Random
) -> Counter[str]:
    """Random faults until SOAK_SECONDS have passed; every kind at least once."""
    done: Counter[str] = Counter()
    completed: set[str] = set()
    pending = rng.sample(FAULTS, len(FAULTS))
    deadline = time.monotonic() + SOAK_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, rng.uniform(0.5, 2.5)))  # when the next fault lands: random, not judged
        cluster.check_alive()
        fault = pending.pop() if pending else rng.choice(FAULTS)
        if fault == "kill-watcher":
            cluster.kill_watcher()
        elif fault == "kill-worker":
            cluster.kill_worker(rng)
        elif fault == "duplicate-completion":
            uri = rng.choice(VERSIONS)
            complete_at_once(settings, staging, uri, threads=3)
            completed.add(uri)
        elif fault == "completion-racing-appends":  # the writers keep writing to it
            uri = rng.choice(sorted(set(VERSIONS) - completed) or VERSIONS)
            for key in staging.complete_version(Target.parse(uri)):
                enqueue(key)
            completed.add(uri)
        elif fault == "append-after-execution-completed":
            append_after_completion(cluster.root, staging, enqueue, rng, lines=rng.randrange(1, 6))
        else:  # enqueue-flood: the same apply many times at once
            uri = rng.choice(VERSIONS + sorted({v.rsplit("/", 1)[0] for v in VERSIONS}))
            for _ in range(5):
                enqueue(uri)
        done[fault] += 1
    done["versions completed during the run"] = len(completed)
    return done


@pytest.mark.timeout(int(SOAK_SECONDS) + 420)
def test_soak_with_faults_equals_the_oracle(
    settings: Settings, staging: Staging, engine: Engine, cluster: Cluster, tmp_path: Path
) -> None:
    seed = int(os.environ.get("SIDECAR_SOAK_SEED") or random.randrange(1 << 30))
    print(f"soak: {SOAK_SECONDS:.0f} s, seed {seed} (SIDECAR_SOAK_SEED={seed} replays the choices)")
    rng = random.Random(seed)
    enqueue = Enqueuer(make_app(settings))
    cluster.start_watcher()
    for _ in range(2):
        cluster.start_worker()
    wait_until(
        lambda: all(" ready." in w.log() for w in cluster.workers) and all(p.alive() for p in cluster.live()),
        timeout=120,
        what="workers ready",
    )
    complete_at_once(settings, staging, VERSIONS[-1], threads=2)
    stop_file = tmp_path / "stop-writers"
    executions = [f"soak-{w}-{e}" for w in range(WRITERS) for e in range(EXECUTIONS_PER_WRITER)]
    start_writers(cluster, executions, seed, stop_file)
    print(f"faults: {dict(run_faults(cluster, settings, staging, enqueue, rng))}")

    # The end: the writers stop, everything completes, the database converges.
    stop_file.touch()
    for w in cluster.writers:
        assert w.wait(timeout=60) == 0
    cluster.check_alive()
    for uri in VERSIONS:  # every version twice, at once
        complete_at_once(settings, staging, uri, threads=2)
    for execution in executions + LATE:  # for dataset lines staged after the last version completion
        for key in staging.complete_execution(execution):
            enqueue(key)
    ended = time.monotonic()

    oracle = Oracle()
    files = oracle.add_root(cluster.root)
    late = [e for e in LATE if (cluster.root / e / JSONL).exists()]
    assert late and len(files) == len(executions) + len(late)
    print(
        f"oracle: {sum(p.stat().st_size for p in files)} bytes, {sum(oracle.entries.values())} entries "
        f"for {len(oracle.entries)} targets, {oracle.rejects} rejects"
    )
    wait_until(
        lambda: converged(staging, engine, oracle, [cluster.root], cluster.live(), enqueue),
        timeout=CONVERGE,
        interval=1.0,
        what="the database equal to the oracle",
    )
    print(f"converged {time.monotonic() - ended:.1f} s after the writers stopped")
    assert_history(engine, oracle)
    # Each bad line rejected once (the list keeps the newest REJECTS_KEPT only).
    assert len(staging.rejects(limit=REJECTS_KEPT)) == min(oracle.rejects, REJECTS_KEPT)
    errors = [
        line
        for proc in cluster.live() + cluster.dead
        for line in proc.log().splitlines()
        if " ERROR " in line or line.startswith("Traceback")
    ]
    print(f"{len(errors)} error lines in the logs" + "".join(f"\n  {e}" for e in errors[:20]))
