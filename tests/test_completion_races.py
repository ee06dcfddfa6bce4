"""Completion events against a burst of appends, and delivered twice, early or out of order.

The in-process pieces run in threads for speed: a writer appends lines to a real file and stages
them with the watcher's `Ingestor`, applying whatever staging says became due (the late-line
path); a completer delivers `dataset_version_created` or `execution_completed` at a random moment
of the burst and applies what the completion made due. Some of those applies are skipped, as if
the task was lost: the due set and the sweep must then bring them back. Finally the sweep applies
whatever is still due. Every round, the whole database must equal the oracle
(tests/oracle.py) and the due set must be empty. Against real Redis, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.oracle import assert_files_match_db, assert_matches_db, expected_files, expected_state
from tests.retention_check import assert_retention_keeps_the_oracle
from worker.applying import apply_target, apply_targets
from worker.ingest import Ingestor
from worker.records import Source, user_write
from worker.staging import Staging
from worker.store.models import Dataset, DatasetVersion, PropertyChange, VersionFile
from worker.uris import Target

pytestmark = pytest.mark.redis

# Rounds per database backend; raise it for a longer soak (each round is about ten applies).
ROUNDS = int(os.environ.get("SIDECAR_TEST_RACE_ROUNDS", "30"))
# SIDECAR_TEST_RACE_SEED=<seed base> replays the data of a failed run.
JSONL = "valohai.metadata.jsonl"


# -- helpers ------------------------------------------------------------------------------------


def version_line(uri: str, meta: dict[str, Any]) -> bytes:
    return json.dumps({"dataset-version": uri, "metadata": meta}).encode()


def dataset_line(uri: str, meta: dict[str, Any]) -> bytes:
    return json.dumps({"dataset": uri, "metadata": meta}).encode()


def datum_line(path: str, versions: list[str], meta: dict[str, Any]) -> bytes:
    return json.dumps({"file": path, "metadata": {**meta, "valohai.dataset-versions": versions}}).encode()


def append(path: Path, lines: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def value(rng: random.Random) -> Any:
    """Any JSON value, null (a delete) one time in six."""
    return rng.choice([None, rng.randint(0, 9), f"s{rng.randint(0, 9)}", [rng.randint(0, 3)], {"n": 1}, True])


class Applier:
    """What a worker does, in-process: apply a target; what the watcher's enqueue would send."""

    def __init__(self, engine: Engine, staging: Staging) -> None:
        self.engine = engine
        self.staging = staging

    def __call__(self, key: str) -> None:
        apply_target(self.engine, self.staging, Target.parse(key))

    def all(self, keys: Iterable[str]) -> None:
        for key in sorted(set(keys)):
            self(key)

    def drain(self, older_than: float) -> None:
        """What the drain task does: every target due too long, applied in one batch."""
        try:
            due = [Target.parse(k) for k in self.staging.due_targets(older_than)]
            apply_targets(self.engine, self.staging, due)
        finally:
            self.staging.drain_done()

    def settle(self) -> None:
        """The sweep, until nothing is due (bounded); then nothing may be left due."""
        for _ in range(20):
            if not self.staging.due_targets(older_than=-1):
                return
            self.staging.sweep(self.drain, older_than=0)
        assert not self.staging.due_targets(older_than=-1), "targets still due after 20 sweeps"


def run_together(*functions: Callable[[], None], timeout: float = 60.0) -> None:
    """Run functions in threads released at the same instant; re-raise the first failure."""
    barrier = threading.Barrier(len(functions))
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=timeout)
            fn()
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in functions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a racing thread did not finish"
    if errors:
        raise errors[0]


def api_write(applier: Applier, target: Target, meta: dict[str, Any]) -> None:
    """An API write, the way worker/applying.py makes it: staged in the target's stream, applied at
    once if the version is complete (else at completion, in order with the lines before it)."""
    done = applier.staging.stage_entry(user_write(target, meta, Source("api")))
    if done or applier.staging.is_done(target):
        applier(target.key)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


# -- many rounds of a completion racing with a burst of appends ---------------------------------


class Round:
    """One execution writing to one file: version lines, dataset lines and (in "execution" mode)
    datum lines naming the version; keys never collide across targets of different rounds."""

    def __init__(self, number: int, mode: str, rng: random.Random) -> None:
        self.mode, self.rng = mode, rng
        self.execution = f"exec-{number}"
        self.version = Target("version", f"race{number}", "v1")
        self.dataset = self.version.dataset_target
        self.rel = f"{self.execution}/{JSONL}"
        self.lines: list[bytes] = []
        self.api: list[tuple[str, dict[str, Any]]] = []
        self.completed_at = self.first_staged = self.last_staged = 0.0

    def burst(self) -> list[list[bytes]]:
        """The lines to append, in small batches."""
        batches = []
        for i in range(self.rng.randint(2, 6)):
            batch: list[Any] = []
            for _ in range(self.rng.randint(1, 4)):
                meta = {f"k{self.rng.randint(0, 5)}": value(self.rng), "seq": len(self.lines) + len(batch)}
                batch.append(version_line(self.version.key, meta))
                if self.rng.random() < 0.3:
                    batch.append(
                        dataset_line(self.dataset.key, {f"d{self.rng.randint(0, 2)}": value(self.rng)})
                    )
                if self.mode == "execution" and (i == 0 or self.rng.random() < 0.4):
                    meta = {"label": value(self.rng), "i": i}
                    batch.append(datum_line(f"out/{self.rng.randint(0, 2)}.png", [self.version.key], meta))
            batches.append(batch)
            self.lines += batch
        return batches


def race_round(
    number: int, root: Path, staging: Staging, applier: Applier, seed: int, *, pinned: bool = False
) -> Round:
    """One round. `pinned`: the writer waits for the completion after its first batch(es), so that
    this round surely completes in the middle of the burst (the others race freely)."""
    rng = random.Random(seed)
    r = Round(number, rng.choice(["version", "execution"]), rng)
    path = root / r.rel
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    batches = r.burst()
    api_meta = {"api_a": rng.randint(0, 9), "api_b": None if rng.random() < 0.5 else "set"}
    api_first = rng.random() < 0.5
    # The completion lands after a random number of batches (0: before the first line; all of
    # them: after the last), plus a random delay while the writer goes on.
    after_batches = rng.randint(1, len(batches) - 1) if pinned else rng.randint(0, len(batches))
    reached, completed = threading.Event(), threading.Event()

    def writer() -> None:
        for i, batch in enumerate(batches):
            if i == after_batches:
                reached.set()
                if pinned:
                    assert completed.wait(timeout=30), "the completion did not come"
            append(path, batch)
            due = ingestor.ingest(path).due
            if rng.random() < 0.7:  # the late-line path: due right after staging; else the task is lost
                applier.all(due)
            r.last_staged = time.monotonic()
            r.first_staged = r.first_staged or r.last_staged
            time.sleep(rng.uniform(0, 0.003))
        reached.set()

    def completer() -> None:
        reached.wait(timeout=30)
        time.sleep(rng.uniform(0, 0.003))
        if api_first:
            api_write(applier, r.version, api_meta)
        if r.mode == "version":
            due = staging.complete_version(r.version)
        else:
            due = staging.complete_execution(r.execution)
        r.completed_at = time.monotonic()
        completed.set()
        if rng.random() < 0.7:  # else the completion's tasks are lost: the sweep must find them
            applier.all(due)
        if not api_first:
            api_write(applier, r.version, api_meta)

    run_together(writer, completer)
    r.api.append((r.version.key, api_meta))
    # The execution ends: in "version" mode its completion still has to come (the dataset lines
    # staged after the version completed wait for it). No second dataset_version_created in
    # "execution" mode: it would re-apply the version and hide a line the first applies missed.
    if r.mode == "version":
        applier.all(staging.complete_execution(r.execution))
    applier.all(ingestor.ingest(path).due)  # nothing new: a no-op
    applier.settle()  # the sweep: the only way to the tasks that were "lost" above
    return r


@pytest.mark.timeout(300)
def test_completion_racing_with_a_burst_of_appends_equals_the_oracle_every_round(
    root: Path, staging: Staging, engine: Engine
) -> None:
    applier = Applier(engine, staging)
    files: dict[str, list[bytes]] = {}
    api: list[tuple[str, dict[str, Any]]] = []
    completed: list[str] = []
    mid_burst = pinned = 0
    # The data of every round comes from its seed (the thread timing does not): a failure names it.
    base = int(os.environ.get("SIDECAR_TEST_RACE_SEED") or random.randrange(1 << 30))
    for number in range(ROUNDS):
        pin = number % 3 == 0
        pinned += pin
        r = race_round(number, root, staging, applier, seed=base + number, pinned=pin)
        files[r.rel] = r.lines
        api += r.api
        completed.append(r.version.key)
        mid_burst += r.first_staged < r.completed_at < r.last_staged
        try:
            assert_matches_db(engine, expected_state(files, api_writes=api), completed=completed)
        except AssertionError as exc:
            raise AssertionError(
                f"round {number} ({r.mode} completion, seed {base + number}): {exc}"
            ) from None
    # Retention then takes every round's staging state out of Redis: the oracle still holds.
    paths = [root / rel for rel in files]
    first = Target("version", "race0", "v1")
    assert_retention_keeps_the_oracle(
        engine, staging, root, paths, late=(paths[0], first), api_writes=api, completed=completed
    )
    print(f"{ROUNDS} rounds, {mid_burst} completed in the middle of the burst (seed base {base})")
    # The point of the test is the overlap: the pinned rounds surely completed while lines were
    # being staged (an order of events, not a speed: the writer waited for the completion).
    assert mid_burst >= pinned > 0


# -- the same completion twice; both orders of the two events; completion before any line -------


def test_the_same_completion_delivered_twice_applies_once(
    root: Path, staging: Staging, engine: Engine
) -> None:
    applier = Applier(engine, staging)
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    v = Target("version", "twice", "v1")
    path = root / "exec-t" / JSONL
    append(path, [version_line(v.key, {"a": 1, "b": "x"}), version_line(v.key, {"a": 2, "c": [1]})])
    applier.all(ingestor.ingest(path).due)
    for _ in range(2):  # delivered twice in a row, each with its apply
        applier.all(staging.complete_version(v))
    with Session(engine) as s:
        changes = s.scalar(select(func.count()).select_from(PropertyChange))
    applier.all(staging.complete_version(v))  # a third delivery, much later
    assert apply_target(engine, staging, v).applied == 0
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(PropertyChange)) == changes
    append(path, [version_line(v.key, {"b": None, "d": True})])  # a late line, then a fourth delivery
    applier.all(ingestor.ingest(path).due)
    applier.all(staging.complete_version(v))
    applier.settle()
    assert_matches_db(engine, expected_state([path]), completed=[v.key])

    # Two deliveries at the same instant, each applying, while a late line is staged and applied.
    def deliver() -> None:
        applier.all(staging.complete_version(v))

    def late() -> None:
        append(path, [version_line(v.key, {"e": 5, "a": None})])
        applier.all(ingestor.ingest(path).due)

    run_together(deliver, deliver, late)
    applier.settle()
    assert_matches_db(engine, expected_state([path]), completed=[v.key])


@pytest.mark.parametrize("first", ["execution_completed", "dataset_version_created"])
def test_both_completion_events_in_either_order(
    root: Path, staging: Staging, engine: Engine, first: str
) -> None:
    applier = Applier(engine, staging)
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    v = Target("version", "order", "v1")
    execution = "exec-o"
    path = root / execution / JSONL
    append(
        path,
        [
            dataset_line(v.dataset_target.key, {"domain": "x"}),
            version_line(v.key, {"a": 1}),
            datum_line("a.png", [v.key], {"camera": "top"}),
            datum_line("b.png", [v.key], {"camera": "side"}),
            version_line(v.key, {"a": 2, "b": 1}),
        ],
    )
    applier.all(ingestor.ingest(path).due)
    events: dict[str, Callable[[], list[str]]] = {
        "execution_completed": lambda: staging.complete_execution(execution),
        "dataset_version_created": lambda: staging.complete_version(v),
    }
    applier.all(events[first]())
    # Either event alone completes the version (execution_completed through its datums); the
    # datums' own properties wait for execution_completed.
    assert_matches_db(engine, expected_state([path]), completed=[v.key], only=[v.key])
    applier.all(events[next(e for e in events if e != first)]())
    append(path, [version_line(v.key, {"b": None}), datum_line("a.png", [v.key], {"camera": "low"})])
    applier.all(ingestor.ingest(path).due)
    applier.settle()
    assert_matches_db(engine, expected_state([path]), completed=[v.key])
    assert members(engine, v) == 2
    assert_files_match_db(engine, expected_files([path]), only=[v.key])


def test_completion_before_any_line_was_written(root: Path, staging: Staging, engine: Engine) -> None:
    applier = Applier(engine, staging)
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    # dataset_version_created before the execution wrote anything.
    v1 = Target("version", "early", "v1")
    applier.all(staging.complete_version(v1))
    assert_matches_db(engine, {}, completed=[v1.key])  # registered, completed, empty
    p1 = root / "exec-e1" / JSONL
    append(p1, [version_line(v1.key, {"a": 1}), dataset_line(v1.dataset_target.key, {"d": 1})])
    due = ingestor.ingest(p1).due
    assert v1.key in due  # a line for a completed version is due by itself
    applier.all(due)
    # execution_completed before the execution's file existed: its datum lines then complete the
    # version they name, and a version line staged before the datum line is applied with it.
    v2 = Target("version", "early", "v2")
    applier.all(staging.complete_execution("exec-e2"))
    p2 = root / "exec-e2" / JSONL
    append(p2, [version_line(v2.key, {"b": 1}), datum_line("x.png", [v2.key], {"k": 1})])
    applier.all(ingestor.ingest(p2).due)
    applier.all(staging.complete_execution("exec-e1"))  # the dataset line of exec-e1 is due now
    applier.settle()
    assert_matches_db(engine, expected_state([p1, p2]), completed=[v1.key, v2.key])
    assert members(engine, v2) == 1
    assert_files_match_db(engine, expected_files([p1, p2]))


def members(engine: Engine, version: Target) -> int:
    with Session(engine) as s:
        version_id = s.scalar(
            select(DatasetVersion.id)
            .join(Dataset)
            .where(Dataset.name == version.dataset, DatasetVersion.name == version.version)
        )
        return int(
            s.scalar(
                select(func.count()).select_from(VersionFile).where(VersionFile.version_id == version_id)
            )
            or 0
        )
