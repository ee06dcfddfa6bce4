"""The watcher loop on a real folder: events, the start-up scan, the rescan backstop, the sweep."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from worker.ingest import IngestStats
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target
from worker.watch import QUIET_BYTES, Watcher

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.05)


def vline(**meta: object) -> str:
    return json.dumps({"dataset-version": "dataset://press/v1", "metadata": meta}) + "\n"


class Running:
    def __init__(self, settings: Settings, staging: Staging) -> None:
        self.sent: list[str] = []
        self.stop = threading.Event()
        self.watcher = Watcher(settings, staging, self.sent.append, self.stop)
        self.thread = threading.Thread(target=self.watcher.run, daemon=True)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The watcher never touches the database: one backend is enough here."""
    return f"sqlite:///{tmp_path / 'unused.db'}"


@pytest.fixture
def start(settings: Settings, staging: Staging) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def _start(**changes: object) -> Running:
        r = Running(replace(settings, **changes), staging)  # type: ignore[arg-type]
        r.thread.start()
        running.append(r)
        return r

    yield _start
    for r in running:
        r.stop.set()
        r.thread.join(timeout=10)


def staged(staging: Staging) -> list[dict[str, object]]:
    return [e.metadata for _, e in staging.read_after(V1, None)]


@pytest.mark.parametrize("polling", [False, True])
def test_existing_and_new_files_are_staged(
    settings: Settings, staging: Staging, start: Callable[..., Running], polling: bool
) -> None:
    root = settings.require_root()
    (root / "exec-0").mkdir()
    (root / "exec-0" / "valohai.metadata.jsonl").write_text(vline(before=1))
    start(polling=polling, rescan_interval=60.0)
    wait_until(lambda: staged(staging) == [{"before": 1}])
    (root / "exec-1").mkdir()
    (root / "exec-1" / "valohai.metadata.jsonl").write_text(vline(after=2))
    wait_until(lambda: {"after": 2} in staged(staging))
    with open(root / "exec-1" / "valohai.metadata.jsonl", "a") as f:
        f.write(vline(more=3))
    wait_until(lambda: {"more": 3} in staged(staging))


def test_rescan_catches_what_events_missed(
    settings: Settings, staging: Staging, start: Callable[..., Running]
) -> None:
    r = start(rescan_interval=0.5)
    # Simulate an overflowed inotify queue: stop the event handler from hearing anything.
    r.watcher.dirty.on_any_event = lambda event: None  # type: ignore[method-assign]
    root = settings.require_root()
    (root / "exec-9").mkdir()
    (root / "exec-9" / "valohai.metadata.jsonl").write_text(vline(missed=1))
    wait_until(lambda: staged(staging) == [{"missed": 1}])


def test_late_line_is_enqueued_and_the_sweep_retries(
    settings: Settings, staging: Staging, start: Callable[..., Running]
) -> None:
    staging.complete_version(V1)
    r = start(sweep_after=0.3)
    root = settings.require_root()
    (root / "exec-1").mkdir()
    (root / "exec-1" / "valohai.metadata.jsonl").write_text(vline(late=1))
    wait_until(lambda: V1.key in r.sent)
    # Nobody applies it (no worker here), so the sweep sends it again: a lost task is not lost work.
    wait_until(lambda: r.sent.count(V1.key) >= 2)


def test_execution_completion_flushes_the_last_partial_line(
    settings: Settings, staging: Staging, start: Callable[..., Running]
) -> None:
    start(rescan_interval=60.0)
    root = settings.require_root()
    (root / "exec-1").mkdir()
    (root / "exec-1" / "valohai.metadata.jsonl").write_text(vline(a=1) + vline(b=2).rstrip("\n"))
    wait_until(lambda: staged(staging) == [{"a": 1}])
    staging.complete_execution("exec-1")
    wait_until(lambda: staged(staging) == [{"a": 1}, {"b": 2}])


def test_folders_linked_from_outside_are_not_followed(
    settings: Settings, staging: Staging, tmp_path: Path, start: Callable[..., Running]
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "valohai.metadata.jsonl").write_text(vline(secret=1))
    root = settings.require_root()
    (root / "exec-link").symlink_to(outside)
    (root / "exec-real").mkdir()
    (root / "exec-real" / "valohai.metadata.jsonl").write_text(vline(real=1))
    start(rescan_interval=0.3)
    wait_until(lambda: staged(staging) == [{"real": 1}])
    time.sleep(1.0)  # a few rescans: the linked folder must still not be read
    assert staged(staging) == [{"real": 1}]


def test_a_busy_turn_ends_early_for_a_quiet_file_only(settings: Settings, staging: Staging) -> None:
    root = settings.require_root()
    busy, other, quiet = (
        root / name / "valohai.metadata.jsonl" for name in ("exec-busy", "exec-other", "exec-quiet")
    )
    for path in (busy, other, quiet):
        path.parent.mkdir(parents=True)
    lines = [vline(n=n) for n in range(200)]
    busy.write_text("".join(lines))
    quiet.write_text(vline(quiet=1))
    watcher = Watcher(settings, staging, lambda target: None, threading.Event())
    watcher.ingestor.batch_bytes = len(lines[0]) * 10  # a turn is many batches
    # (The queue takes its clock as an argument: a fixed one keeps its order out of the test.)

    # Another busy file waits in the queue: the turn runs whole, catching up keeps its pace.
    watcher.queue.read(other, QUIET_BYTES * 4)
    watcher.queue.add(other, now=0.0)
    whole, n = turn(watcher, busy)
    assert not whole.unread and n == 200
    assert watcher.queue.pop(now=0.0) == other

    def more() -> None:
        with open(busy, "a") as f:
            f.write("".join(lines))

    # A quiet file waits in the queue (taken in just before the turn): the turn ends after the
    # batch in hand, and the busy file goes back in the queue.
    more()
    watcher.queue.read(quiet, 100)
    watcher.queue.add(quiet, now=0.0)
    cut, n = turn(watcher, busy)
    assert cut.unread and 0 < n <= 10
    assert busy in watcher.queue and quiet in watcher.queue
    assert watcher.queue.pop(now=0.0) == quiet
    assert watcher.queue.pop(now=0.0) == busy

    # A quiet file has news not taken in yet: the same. The busy file's own news never cuts.
    staged_before = len(staged(staging))
    watcher.dirty.add(busy)
    watcher.dirty.add(quiet)
    cut, n = turn(watcher, busy)
    assert cut.unread and 0 < n <= 10
    assert len(staged(staging)) == staged_before + n


def turn(watcher: Watcher, path: Path) -> tuple[IngestStats, int]:
    """One turn of `path`, and the lines it staged (its last batch is carried over: settle it)."""
    stats = watcher._ingest(path)
    assert stats is not None
    return stats, stats.lines + watcher.ingestor.settle().lines
