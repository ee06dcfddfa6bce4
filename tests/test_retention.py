"""Retention: Redis holds in-flight state only (worker/retention.py), on SQLite and PostgreSQL.

The finding: after 100,000 lines in 100 executions were completed and applied, 30 bytes per line
stayed in Redis (line digests, target sets, emptied streams, done flags, known versions), on the
Redis that is also the Celery broker, with `noeviction`. Memory is measured as the sum of
`MEMORY USAGE` over this test's prefix (other processes share the Redis: `used_memory` is not
this test's to judge).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import cast

import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.oracle import assert_matches_db, expected_state
from tests.retention_check import apply_all
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.replay import replay
from worker.retention import Retention
from worker.settings import Settings
from worker.staging import Staging
from worker.status import _print, collect
from worker.store import finished
from worker.store.models import PropertyChange
from worker.uris import Target

pytestmark = pytest.mark.redis

JSONL = "valohai.metadata.jsonl"
EXECUTIONS, LINES = 50, 1000


def prefix_memory(client: redis.Redis, keys: Keys) -> int:
    """Bytes Redis holds under this prefix: MEMORY USAGE summed over its keys."""
    total = 0
    for key in client.scan_iter(match=keys.pattern(), count=1000):
        total += int(cast(int, client.memory_usage(key, samples=0)) or 0)
    return total


def lines_of(i: int, count: int, start: int = 0) -> list[str]:
    """An execution's lines: its own version (version lines and datums naming it), the shared dataset."""
    version = f"dataset://ret/v{i}"
    out = []
    for n in range(start, start + count):
        if n % 10 < 6:
            doc: dict[str, object] = {"dataset-version": version, "metadata": {f"k{n % 7}": n, "n": n}}
        elif n % 10 < 9:
            meta = {"size": n, "valohai.dataset-versions": [version]}
            doc = {"file": f"out/{n}.png", "metadata": meta}
        else:
            doc = {"dataset": "dataset://ret", "metadata": {f"e{i}": n}}
        out.append(json.dumps(doc) + "\n")
    return out


def apply_due(engine: Engine, staging: Staging, also: set[str] | frozenset[str] = frozenset()) -> None:
    apply_all(engine, staging, also, rounds=10)


def finished_execution(staging: Staging, engine: Engine, ingestor: Ingestor, lines: int = 20) -> Path:
    """exec-0 with `lines` lines, read, completed and applied: what retention may forget."""
    path = ingestor.root / "exec-0" / JSONL
    path.parent.mkdir()
    path.write_text("".join(lines_of(0, lines)))
    apply_due(engine, staging, ingestor.ingest(path).due)
    staging.complete_execution("exec-0")
    apply_due(engine, staging)
    return path


def history_rows(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(PropertyChange)) or 0)


@pytest.fixture
def ingestor(settings: Settings, staging: Staging, engine: Engine) -> Ingestor:
    return Ingestor(
        settings.require_root(), staging, line_limit=1 << 20, finished=lambda f: finished.find(engine, f)
    )


def test_completed_and_applied_executions_leave_redis(
    settings: Settings, staging: Staging, engine: Engine, redis_client: redis.Redis, ingestor: Ingestor
) -> None:
    root = settings.require_root()
    keys = staging.keys
    before = prefix_memory(redis_client, keys)
    paths = []
    for i in range(EXECUTIONS):
        path = root / f"exec-{i}" / JSONL
        path.parent.mkdir()
        path.write_text("".join(lines_of(i, LINES)))
        paths.append(path)
    handed: set[str] = set()
    for path in paths:
        handed |= ingestor.ingest(path).due
    for i in range(EXECUTIONS):
        staging.complete_execution(f"exec-{i}")
    apply_due(engine, staging, handed)
    applied = prefix_memory(redis_client, keys)
    expected = expected_state(paths, root=root)
    assert_matches_db(engine, expected)

    stats = Retention(staging, lambda: engine, retention_seconds=0).run()
    assert len(stats.forgotten) == EXECUTIONS, stats
    after = prefix_memory(redis_client, keys)
    per_line = (after - before) / (EXECUTIONS * LINES)
    print(
        f"Redis under the prefix: {before} B at start, {applied} B once applied "
        f"({(applied - before) / (EXECUTIONS * LINES):.1f} B/line), {after} B after retention "
        f"({per_line:.3f} B/line); keys left: {sorted(redis_client.scan_iter(keys.pattern()))}"
    )
    assert after - before <= EXECUTIONS * LINES, f"{per_line:.2f} bytes per line stayed in Redis"
    assert_matches_db(engine, expected)

    # A rescan stages nothing: every finished file is known to the database, unchanged.
    changes = history_rows(engine)
    for path in paths:
        rescanned = ingestor.ingest(path)
        assert (rescanned.lines, rescanned.due) == (0, set())
    assert prefix_memory(redis_client, keys) == after

    # `sidecar replay` stages only what is missing: nothing.
    assert replay(engine, staging, ingestor, paths[:3], dry_run=True).changes == []
    summary = replay(engine, staging, ingestor, paths[:3])
    assert summary.applied == 0 and summary.lines == 3 * LINES
    assert history_rows(engine) == changes
    apply_due(engine, staging)
    assert history_rows(engine) == changes

    # A late line (version, datum) for a completed version of a retained execution is applied.
    late = lines_of(7, 10, start=LINES)
    with open(paths[7], "a") as f:
        f.write("".join(late))
    got = ingestor.ingest(paths[7])
    assert got.lines == 10
    apply_due(engine, staging, got.due)
    assert_matches_db(engine, expected_state(paths, root=root))
    assert history_rows(engine) > changes
    # ... and that execution leaves Redis again at the next pass (with those replay put back).
    again = Retention(staging, lambda: engine, retention_seconds=0).run().forgotten
    assert again == ["exec-0", "exec-1", "exec-2", "exec-7"]
    assert prefix_memory(redis_client, keys) - before <= EXECUTIONS * LINES


def test_status_shows_redis_memory_and_the_oldest_retained_execution(
    settings: Settings,
    staging: Staging,
    engine: Engine,
    ingestor: Ingestor,
    capsys: pytest.CaptureFixture[str],
) -> None:
    finished_execution(staging, engine, ingestor)
    report = collect(staging, stuck_after=300)
    assert report["redis"]["used_memory_human"]
    assert report["redis"]["oldest_retained"] == "exec-0"
    assert report["redis"]["oldest_retained_seconds"] >= 0
    _print(report)
    assert "oldest retained execution exec-0" in capsys.readouterr().out
    Retention(staging, lambda: engine, retention_seconds=0).run()
    assert collect(staging, stuck_after=300)["redis"]["oldest_retained"] is None


def test_a_line_staged_while_retention_runs_keeps_the_execution(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    """The forget script deletes nothing when a batch moved a checkpoint since it was read."""
    root = settings.require_root()
    path = finished_execution(staging, engine, ingestor)
    held = staging.held("exec-0")
    with open(path, "a") as f:
        f.write("".join(lines_of(0, 3, start=20)))
    ingestor.ingest(path)  # staged between the read of `held` and the forget script
    marks = finished.watermarks(engine, held.targets)
    assert not staging.forget(held, marks, whole=True)
    assert staging.load_state(f"exec-0/{JSONL}") is not None
    apply_due(engine, staging)
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]
    assert_matches_db(engine, expected_state([path], root=root))


def test_a_batch_read_before_retention_and_sent_after_is_refused(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    """The staging script's checkpoint check: the batch would land without the done flag."""
    finished_execution(staging, engine, ingestor)
    rel = f"exec-0/{JSONL}"
    read_from = staging.load_state(rel)
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]
    with pytest.raises(redis.ResponseError, match="STALE"):
        staging.stage_lines(rel, "exec-0", [], '{"x": 1}', expect=read_from)
    assert staging.load_state(rel) is None


def test_a_deleted_folder_is_forgotten_by_its_watcher(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    """Not completed: its files' state goes, its staged entries wait for its completion."""
    root = settings.require_root()
    path = root / "exec-0" / JSONL
    path.parent.mkdir()
    path.write_text("".join(lines_of(0, 20)))
    handed = ingestor.ingest(path).due
    apply_due(engine, staging, handed)
    retention = Retention(
        staging, lambda: engine, retention_seconds=0, root=ingestor.root, root_id=ingestor.root_id
    )
    assert retention.run().forgotten == []  # the folder is there
    path.unlink()
    path.parent.rmdir()
    assert retention.run().forgotten == []  # missing once: noted
    assert retention.run().forgotten == ["exec-0"]
    assert staging.load_state(f"exec-0/{JSONL}") is None
    assert staging.redis.exists(staging.keys.stream(Target.for_execution("exec-0")))
    # A late completion still applies what it had staged.
    staging.complete_execution("exec-0")
    apply_due(engine, staging)
    folded = expected_state({f"exec-0/{JSONL}": [line.encode() for line in lines_of(0, 20)]})
    assert_matches_db(engine, folded)
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]
    assert not list(staging.redis.scan_iter(match=f"{staging.keys.tag}:*exec-0*"))


def test_a_rewritten_finished_file_stages_only_what_changed(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    """valohai-utils rewrites the whole file: the digests kept in the database skip its start."""
    root = settings.require_root()
    path = root / "exec-0" / JSONL
    path.parent.mkdir()
    lines = lines_of(0, 20)
    path.write_text("".join(lines))
    apply_due(engine, staging, ingestor.ingest(path).due)
    staging.complete_execution("exec-0")
    apply_due(engine, staging)
    Retention(staging, lambda: engine, retention_seconds=0).run()
    changes = history_rows(engine)
    new = root / "exec-0" / "tmp"
    new.write_text("".join(lines + lines_of(0, 2, start=20)))
    new.replace(path)  # a new inode: a rewrite
    got = ingestor.ingest(path)
    assert got.rewrites == 1
    apply_due(engine, staging, got.due)
    assert_matches_db(engine, expected_state([path], root=root))
    assert history_rows(engine) - changes <= 2 * 3  # only the two new lines' keys


def test_retention_waits_for_its_time_and_for_the_applies(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    root = settings.require_root()
    path = root / "exec-0" / JSONL
    path.parent.mkdir()
    path.write_text("".join(lines_of(0, 20)))
    handed = ingestor.ingest(path).due
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == []  # running
    staging.complete_execution("exec-0")
    assert Retention(staging, lambda: engine, retention_seconds=0).run().kept == ["exec-0"]  # due
    apply_due(engine, staging, handed)
    assert Retention(staging, lambda: engine, retention_seconds=3600).run().forgotten == []  # too early
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]


def test_the_watcher_runs_retention_and_does_not_read_a_finished_file_again(
    settings: Settings, staging: Staging, engine: Engine
) -> None:
    """The watcher loop: a pass beside each scan; a rescan falls back to the database's record."""
    from dataclasses import replace

    from tests.test_watch import wait_until
    from worker.watch import Watcher

    root = settings.require_root()
    path = root / "exec-0" / JSONL
    path.parent.mkdir()
    path.write_text("".join(lines_of(0, 20)))
    sent: list[str] = []
    stop = threading.Event()
    watcher = Watcher(
        replace(settings, retention_seconds=0.0, rescan_interval=0.2), staging, sent.append, stop
    )
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: staging.load_state(f"exec-0/{JSONL}") is not None)
        staging.complete_execution("exec-0")
        wait_until(lambda: bool(sent))
        apply_due(engine, staging, set(sent))
        wait_until(lambda: not staging.redis.hlen(staging.keys.executions))
        lines = watcher.stats.lines
        time.sleep(1.0)  # rescans: the finished file is not read again
        assert watcher.stats.lines == lines
        assert staging.load_state(f"exec-0/{JSONL}") is None
        with open(path, "a") as f:
            f.write("".join(lines_of(0, 1, start=20)))
        wait_until(lambda: watcher.stats.lines == lines + 1)
        wait_until(lambda: bool(staging.due_targets(older_than=-1)))
        apply_due(engine, staging)
        assert_matches_db(engine, expected_state([path], root=root))
    finally:
        stop.set()
        thread.join(timeout=10)


def test_a_file_that_appears_after_its_completed_execution_was_forgotten(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    """The completion came first (nothing staged yet) and left Redis: it comes back with the file."""
    staging.complete_execution("exec-0")
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]
    assert not staging.is_done(Target.for_execution("exec-0"))
    root = settings.require_root()
    path = root / "exec-0" / JSONL
    path.parent.mkdir()
    path.write_text("".join(lines_of(0, 10)))
    apply_due(engine, staging, ingestor.ingest(path).due)
    # The datum lines are due by the restored completion, and complete the version they name.
    assert_matches_db(engine, expected_state([path], root=root), completed=["dataset://ret/v0"])


def test_a_target_shared_with_a_running_execution_stays_while_the_completed_one_goes(
    settings: Settings, staging: Staging, engine: Engine, ingestor: Ingestor
) -> None:
    root = settings.require_root()
    paths = [root / f"exec-{i}" / JSONL for i in range(2)]
    for path in paths:
        path.parent.mkdir()
    paths[0].write_text("".join(lines_of(0, 20)))  # dataset lines to dataset://ret among others
    apply_due(engine, staging, ingestor.ingest(paths[0]).due)
    staging.complete_execution("exec-0")
    apply_due(engine, staging)
    # exec-1, still running, stages dataset lines that wait for its completion.
    paths[1].write_text("".join(lines_of(1, 20)))
    apply_due(engine, staging, ingestor.ingest(paths[1]).due)
    dataset = Target("dataset", "ret")
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-0"]
    assert staging.redis.exists(staging.keys.stream(dataset))  # exec-1's dataset lines wait in it
    staging.complete_execution("exec-1")
    apply_due(engine, staging)
    assert Retention(staging, lambda: engine, retention_seconds=0).run().forgotten == ["exec-1"]
    assert not staging.redis.exists(staging.keys.stream(dataset))
    assert_matches_db(engine, expected_state(paths, root=root))


def test_a_stream_created_again_goes_on_above_the_floor(staging: Staging) -> None:
    """Redis's clock behind the last deleted id (it went back): the new stream still starts above."""
    from tests.helpers import outcome

    ahead = int(time.time() * 1000) + 3_600_000
    staging.redis.set(staging.keys.stream_floor, f"{ahead}-5")
    line = b'{"dataset-version": "dataset://ret/v9", "metadata": {"a": 1}}'
    staging.stage_lines(f"exec-0/{JSONL}", "exec-0", [outcome(line)], "s")
    ((stream_id, _),) = staging.read_after(Target("version", "ret", "v9"), None)
    assert int(stream_id.split("-")[0]) > ahead
