"""Many machines: two `sidecar watch` processes on separate roots and two `sidecar worker
--concurrency 2` processes share one Redis prefix and one database, on SQLite and PostgreSQL.

Both roots hold files for the same versions (different executions, one file per execution). Keys
carry the execution id, so they collide only within one file and the oracle (tests/soak_oracle.py)
does not depend on the order in which files are applied. While lines are still being appended,
several threads complete the same versions at once, several times, and enqueue their applies (up
to four applies of one version can run at the same moment). The database must end equal to the
oracle; `property_changes` must hold each change of each key exactly once, in file order (two
applies of the same version that interleaved would apply entries twice or out of order); and the
workers' logs must account for every staged entry exactly once.
"""

from __future__ import annotations

import random
import re
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
    Oracle,
    Sidecar,
    assert_history,
    converged,
    soak_line,
    unstaged,
)
from worker.settings import Settings
from worker.staging import Staging
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

# Each wait has its own generous deadline (DEADLINE); the test as a whole may take several.
pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.timeout(600)]

DEADLINE = 150.0
VERSIONS = [f"dataset://mm/v{i}" for i in range(4)]
EXECUTIONS = {"a": ["mma-0", "mma-1", "mma-2"], "b": ["mmb-0", "mmb-1", "mmb-2"]}
LINES = 240  # per file
APPLIED = re.compile(r"apply (\S+): (\d+) entries, watermark")


@pytest.fixture
def processes(staging: Staging, engine: Engine) -> Iterator[list[Sidecar]]:
    """Started sidecar processes; all stopped at the end, pass or fail (before keys and tables go)."""
    started: list[Sidecar] = []
    yield started
    for proc in started:
        proc.stop()
    forget_broker_state(staging.redis, staging.keys.queue, staging.keys.bulk_queue)


def file_lines(execution: str, seed: int) -> list[bytes]:
    rng = random.Random(f"{seed}-{execution}")
    return [soak_line(rng, execution, VERSIONS)[0] for _ in range(LINES)]


def append(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(exist_ok=True)
    with open(path, "ab") as f:
        f.write(b"".join(lines))


def complete_concurrently(
    settings: Settings, staging: Staging, rounds: int, threads_per_version: int
) -> None:
    """Several threads per version, released together, each completing it and enqueueing `rounds` times."""
    barrier = threading.Barrier(len(VERSIONS) * threads_per_version)
    errors: list[BaseException] = []

    def complete(uri: str) -> None:
        try:
            enqueue = Enqueuer(make_app(settings))
            target = Target.parse(uri)
            barrier.wait(timeout=60)
            for _ in range(rounds):
                for key in staging.complete_version(target):
                    enqueue(key)
                enqueue(uri)  # a duplicate on purpose: two applies of one version at once
                time.sleep(random.uniform(0, 0.2))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=complete, args=(uri,)) for uri in VERSIONS for _ in range(threads_per_version)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE)
    assert not errors, errors


def start_processes(
    settings: Settings, roots: list[Path], logs: Path, processes: list[Sidecar]
) -> list[Sidecar]:
    """A watcher per root and two workers; returns the workers once they are ready."""
    for i, root in enumerate(roots):
        env = settings.with_(root=None, rescan_interval=1.0, sweep_after=1.0).as_env()
        processes.append(Sidecar(["watch", "--root", str(root)], env, logs / f"watch-{i}.log"))
    workers = [
        Sidecar(
            ["worker", "--concurrency", "2"], settings.with_(root=None).as_env(), logs / f"worker-{i}.log"
        )
        for i in range(2)
    ]
    processes.extend(workers)
    wait_until(
        lambda: all(" ready." in w.log() for w in workers) and all(p.alive() for p in processes),
        timeout=DEADLINE,
        what="workers ready",
    )
    return workers


def applied_entries(workers: list[Sidecar]) -> Counter[str]:
    """Entries applied per target, summed over the workers' logs."""
    total: Counter[str] = Counter()
    for w in workers:
        for target, count in APPLIED.findall(w.log()):
            total[target] += int(count)
    return total


def test_two_watchers_two_workers_concurrent_completions_equal_the_oracle(
    settings: Settings, staging: Staging, engine: Engine, processes: list[Sidecar], tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    roots = {name: tmp_path / f"root-{name}" for name in EXECUTIONS}
    lines = {e: file_lines(e, seed) for es in EXECUTIONS.values() for e in es}
    paths = {e: roots[name] / e / JSONL for name, es in EXECUTIONS.items() for e in es}
    for root in roots.values():
        root.mkdir()
    for e, path in paths.items():
        append(path, lines[e][:10])  # read by the start-up scan
    workers = start_processes(settings, list(roots.values()), tmp_path, processes)
    for e, path in paths.items():
        append(path, lines[e][10:30])

    # The rest of the lines arrive while the versions complete, from many threads at once.
    def writer() -> None:
        for start in range(30, LINES, 15):
            for e, path in paths.items():
                append(path, lines[e][start : start + 15])
            time.sleep(0.05)

    write_thread = threading.Thread(target=writer)
    write_thread.start()
    complete_concurrently(settings, staging, rounds=3, threads_per_version=3)
    write_thread.join(timeout=DEADLINE)
    assert not write_thread.is_alive()

    oracle = Oracle()
    for root in roots.values():
        oracle.add_root(root)
    assert oracle.rejects > 0 and len(oracle.versions()) == len(VERSIONS)
    # Dataset lines are applied with the next completed version or their execution's completion:
    # complete the executions once every line is staged, as the platform would when they end.
    wait_until(lambda: not unstaged(staging, list(roots.values())), timeout=DEADLINE, what="all staged")
    enqueue = Enqueuer(make_app(settings))
    for e in paths:
        for key in staging.complete_execution(e):
            enqueue(key)

    wait_until(
        lambda: converged(staging, engine, oracle, list(roots.values()), processes, enqueue),
        timeout=DEADLINE,
        interval=0.5,
        what="the database equal to the oracle",
    )
    assert_history(engine, oracle)
    # Every staged entry was applied exactly once, whichever worker applied it.
    expected = +oracle.entries  # `+` drops zero counts (a skipped apply logs "0 entries")
    wait_until(lambda: +applied_entries(workers) == expected, timeout=30, what=f"applied counts {expected}")
    tasks = {w.log_path.name: w.log().count("] succeeded in ") for w in workers}
    print(f"apply tasks run per worker: {tasks}; entries applied: {dict(expected)}")
    assert len(staging.rejects(limit=10_000)) == oracle.rejects  # each bad line rejected once
    for p in processes:
        assert "Traceback" not in p.log(), p.log()[-5000:]
