"""Graceful shutdown, nothing lost: SIGTERM to each long-running `sidecar` process mid-work.

* `sidecar watch`: writers keep appending (lines split across writes) while the watcher is stopped
  and a new one started; every line ends up staged exactly once, in file order, and applying each
  version gives exactly the fold of its file.
* `sidecar worker`: SIGTERM while it applies a 20,000-line version (Celery's warm shutdown); it
  exits 0, and the version ends up applied exactly once, by it or, if the task went back to the
  queue, by a second worker.
* `sidecar serve`: SIGTERM with ~20 requests in flight; it stops accepting, answers every request
  it had accepted completely, and exits.

Waits are bounded and nothing asserts how fast something happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.e2e_helpers import clean_env, free_port, kill_group, wait_until
from tests.helpers import fold, forget_broker_state
from tests.test_worker_process import (
    RECEIVED,
    Worker,
    big_metas,
    expected_history,
    version_history,
    version_row,
)
from worker.applying import apply_target
from worker.records import Entry, LineOutcome, Source, line_digest
from worker.settings import Settings
from worker.staging import Staging
from worker.store.models import Dataset, DatasetVersion, Watermark
from worker.tail import FileState
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

DEADLINE = 60.0
EXIT_TIMEOUT = 30.0


class Sidecar:
    """One `sidecar <command>` subprocess in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=clean_env(settings.as_env()),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def alive(self) -> bool:
        code = self.proc.poll()
        assert code is None, f"{self.proc.args!r} exited with {code}:\n{self.log()}"
        return True

    def sigterm_and_wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """SIGTERM the process (not its group) and wait for it to exit; fail if it does not."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            pytest.fail(f"{self.proc.args!r} did not exit within {timeout:.0f} s of SIGTERM:\n{self.log()}")

    def close(self) -> None:
        kill_group(self.proc)  # a no-op after a clean exit (the group is gone)
        self._log.close()


@pytest.fixture
def started(staging: Staging, engine: Engine) -> Iterator[list[Sidecar | Worker]]:
    """Processes a test started; all killed at the end, pass or fail (before the tables go)."""
    procs: list[Sidecar | Worker] = []
    yield procs
    for proc in procs:
        if isinstance(proc, Worker):
            proc.stop()
        else:
            proc.close()
    forget_broker_state(staging.redis, staging.keys.queue, staging.keys.bulk_queue)


def start(started: list[Sidecar | Worker], settings: Settings, tmp_path: Path, *args: str) -> Sidecar:
    proc = Sidecar(settings, tmp_path / f"{args[0]}-{len(started)}.log", *args)
    started.append(proc)
    return proc


# -- the watcher --------------------------------------------------------------------------------

# Sized for the time budget: the watcher validates every line against the JSON Schemas, about
# 2,000 lines/s on a busy 2-core machine (docs/benchmarks.md), so 3 x 20,000 lines would take most
# of a minute to stage. 3 x 4,000 still lets SIGTERM land with lines staged, lines waiting and
# writers still writing.
FILES = 3
LINES = 4_000
CHUNK = 50  # lines per writer step


def file_metas(index: int) -> list[dict[str, Any]]:
    """Keys overwritten again and again, values of several types, deletes of present and absent keys."""
    rng = random.Random(index)
    metas: list[dict[str, Any]] = []
    for n in range(LINES):
        meta: dict[str, Any] = {f"k{rng.randrange(40)}": rng.choice([n, str(n), n / 7, [n], {"n": n}, True])}
        if rng.random() < 0.15:
            meta[f"k{rng.randrange(40)}"] = None
        if n % 1000 == 0:
            meta["never-set"] = None
        meta["last"] = n
        metas.append(meta)
    return metas


def append_slowly(
    path: Path, uri: str, metas: list[dict[str, Any]], seed: int, errors: list[BaseException]
) -> None:
    """Append the lines a chunk at a time, each chunk in two writes split mid-line, with pauses."""
    rng = random.Random(seed)
    try:
        with open(path, "ab", buffering=0) as f:
            for start in range(0, len(metas), CHUNK):
                data = b"".join(
                    json.dumps({"dataset-version": uri, "metadata": m}).encode() + b"\n"
                    for m in metas[start : start + CHUNK]
                )
                cut = rng.randrange(1, len(data))
                f.write(data[:cut])  # a partial last line until the next write
                time.sleep(rng.uniform(0, 0.01))
                f.write(data[cut:])
                time.sleep(rng.uniform(0.02, 0.05))
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)
        raise


def checkpoint(staging: Staging, rel: str) -> FileState | None:
    raw = staging.load_state(rel)
    return FileState.from_json(raw) if raw else None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the DB is only the oracle's reader
def test_sigterm_mid_ingest_loses_nothing_and_stages_nothing_twice(
    settings: Settings, staging: Staging, engine: Engine, started: list[Sidecar | Worker], tmp_path: Path
) -> None:
    root = settings.require_root()
    targets = [Target("version", "sd-watch", f"v{i}") for i in range(FILES)]
    metas = [file_metas(i) for i in range(FILES)]
    rels = [f"exec-{i}/valohai.metadata.jsonl" for i in range(FILES)]
    paths = [root / rel for rel in rels]
    for path in paths:
        path.parent.mkdir()
        path.touch()

    first = start(started, settings, tmp_path, "watch", "--root", str(root))
    wait_until(
        lambda: first.alive() and any(h["role"] == "watcher" for h in staging.heartbeats()),
        timeout=DEADLINE,
        what="first watcher up",
    )
    errors: list[BaseException] = []
    writers = [
        threading.Thread(
            target=append_slowly, args=(paths[i], targets[i].key, metas[i], i, errors), daemon=True
        )
        for i in range(FILES)
    ]
    for writer in writers:
        writer.start()

    def some_staged() -> bool:
        first.alive()
        states = [checkpoint(staging, rel) for rel in rels]
        return sum(state.line for state in states if state is not None) >= LINES // 4

    wait_until(some_staged, timeout=DEADLINE, interval=0.02, what="some lines staged")
    writing = sum(w.is_alive() for w in writers)
    code = first.sigterm_and_wait()
    assert code == 0, first.log()
    assert "watcher stopped:" in first.log()
    at_stop = [checkpoint(staging, rel) for rel in rels]
    lines_at_stop = [state.line if state else 0 for state in at_stop]
    print(f"SIGTERM with {writing} writers still writing; the watcher stopped at lines {lines_at_stop}")
    # What it left is consistent: each checkpoint covers exactly the lines staged for its file.
    staged_at_stop = [int(staging.redis.xlen(staging.keys.stream(t))) for t in targets]
    assert staged_at_stop == lines_at_stop

    second = start(started, settings, tmp_path, "watch", "--root", str(root))
    for writer in writers:
        writer.join(timeout=DEADLINE)
        assert not writer.is_alive(), "a writer did not finish"
    assert not errors, errors

    def caught_up() -> bool:
        second.alive()
        for rel, path in zip(rels, paths, strict=True):
            state = checkpoint(staging, rel)
            assert state is not None, f"{rel} never staged"
            if state.offset != path.stat().st_size:
                return False
            assert state.line == LINES, (rel, state)
        return True

    wait_until(caught_up, timeout=DEADLINE, what="every checkpoint at its file's end")
    assert second.sigterm_and_wait() == 0, second.log()
    assert staging.rejects() == []

    for target, file_lines, rel in zip(targets, metas, rels, strict=True):
        # Every line exactly once, in file order: no line lost, none staged twice.
        staged = list(staging.read_after(target, None))
        assert len(staged) == LINES == int(staging.redis.xlen(staging.keys.stream(target)))
        assert [(e.source.file, e.source.line) for _, e in staged] == [(rel, n) for n in range(1, LINES + 1)]
        assert [e.metadata for _, e in staged] == file_lines

        staging.complete_version(target)
        result = apply_target(engine, staging, target)
        assert result.applied == LINES
        assert version_row(engine, target) == ("completed", fold(file_lines))


# -- the worker ---------------------------------------------------------------------------------


def stage_directly(staging: Staging, target: Target, metas: list[dict[str, Any]]) -> None:
    """Stage one `set` entry per line, as the watcher would for a file of these lines, through the
    same staging script but without reading and validating a file (that costs ~10 s for 20,000
    lines here; the watcher test covers it)."""
    execution, rel = "exec-big", "exec-big/valohai.metadata.jsonl"
    offset = 0
    for start in range(0, len(metas), 5000):
        outcomes = []
        for number, meta in enumerate(metas[start : start + 5000], start + 1):
            raw = json.dumps({"dataset-version": target.key, "metadata": meta}).encode()
            outcome = LineOutcome(number, line_digest(raw))
            outcome.entries = [Entry(target, "set", Source("sidecar", execution, rel, number, offset), meta)]
            outcomes.append(outcome)
            offset += len(raw) + 1
        state = FileState(dev=0, inode=0, offset=offset, line=start + len(outcomes), head="", tail="")
        staging.stage_lines(rel, execution, outcomes, state.to_json())
    assert int(staging.redis.xlen(staging.keys.stream(target))) == len(metas)


def waiting_or_held(staging: Staging) -> int:
    """Messages of this test's queue in the broker: in the queue, or unacknowledged."""
    held = 0
    for _, raw in staging.redis.hscan_iter("unacked"):
        try:
            held += json.loads(raw)[2] == staging.keys.queue
        except (ValueError, IndexError, TypeError):
            continue
    return int(staging.redis.llen(staging.keys.queue)) + held


def test_sigterm_mid_apply_finishes_or_requeues_and_nothing_is_applied_twice(
    settings: Settings, staging: Staging, engine: Engine, started: list[Sidecar | Worker], tmp_path: Path
) -> None:
    big = Target("version", "sd-work", "v1")
    first = Worker(settings, tmp_path / "worker-0.log")  # starting takes a while: stage meanwhile
    started.append(first)
    metas = big_metas()
    stage_directly(staging, big, metas)
    expected = fold(metas)
    first.wait_ready()
    enqueue = Enqueuer(make_app(settings))
    due = staging.complete_version(big)
    assert set(due) == {big.key, big.dataset_target.key}
    enqueue(big.key)
    enqueue(big.dataset_target.key)  # waits in the queue behind it (concurrency 1, prefetch 1)
    wait_until(lambda: RECEIVED.search(first.log()), timeout=DEADLINE, interval=0.02, what="task received")
    time.sleep(0.3)  # let the apply get going; if it has not started yet, that is a valid case too
    first.proc.send_signal(signal.SIGTERM)
    try:
        code = first.proc.wait(timeout=120)  # warm shutdown waits for the running apply
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker did not exit within 120 s of SIGTERM:\n{first.log()[-5000:]}")
    assert code == 0, first.log()[-5000:]

    # The apply is one transaction: the database holds all of it or none of it.
    row = version_row(engine, big)
    assert row in (None, ("building", {}), ("completed", expected)), row
    finished = [r for r in first.results() if r["applied"] == len(metas)]
    print(f"the first worker {'finished' if finished else 'did not finish'} the apply before exiting")
    if finished:
        # Warm shutdown: the running apply committed (and was acknowledged); the dataset apply
        # queued behind it was not lost: run by this worker before it exited (it was prefetched), back
        # in the queue for the next worker, or still in kombu's unacked hash until it is restored.
        assert row == ("completed", expected)
        ran = len(first.results())  # both applies, when the prefetched one ran before the exit
        assert ran == 2 or waiting_or_held(staging) == 1, first.log()[-5000:]
        apply_target(engine, staging, big.dataset_target)  # in that next worker's place
    else:
        # The apply went back to the queue (or is unacknowledged until the visibility timeout):
        # a second worker takes over, helped by the sweep the watcher would run.
        second = Worker(settings, tmp_path / "worker-1.log")
        started.append(second)
        second.wait_ready()

        def converged() -> bool:
            assert second.proc.poll() is None, f"second worker died:\n{second.log()[-5000:]}"
            staging.sweep(enqueue.drain, older_than=1.0)
            applied = version_row(engine, big) == ("completed", expected)
            return applied and not staging.due_targets(older_than=-1)

        wait_until(converged, timeout=DEADLINE * 2, interval=0.5, what="convergence after the requeue")
    assert not staging.due_targets(older_than=-1)

    # Exactly one apply did the work; history has one row per real change, none duplicated.
    applied = [r["applied"] for w in started if isinstance(w, Worker) for r in w.results() if r["applied"]]
    assert applied == [len(metas)], applied
    assert version_history(engine, big) == expected_history(metas)
    with Session(engine) as s:
        assert s.scalar(select(Watermark.stream_id).where(Watermark.target == big.key)) is not None


# -- the HTTP server ----------------------------------------------------------------------------

VERSIONS = 200
LISTS = 16
UPLOADS = 4
UPLOAD_BODY = {"drained": 0, "note": "sent in two parts"}


def populate(engine: Engine) -> list[int]:
    """One dataset with VERSIONS completed versions (for slow-ish lists), and UPLOADS small datasets
    to write to; returns the ids of those."""
    now = datetime.now(UTC)
    with Session(engine) as s, s.begin():
        big = Dataset(name="sd-serve", properties={}, created_at=now, updated_at=now)
        s.add(big)
        s.flush()
        for i in range(VERSIONS):
            props = {f"p{j}": {"i": i, "j": j, "text": "x" * 40} for j in range(20)}
            s.add(
                DatasetVersion(
                    dataset_id=big.id,
                    name=f"v{i:04d}",
                    status="completed",
                    properties=props,
                    created_at=now,
                    updated_at=now,
                    completed_at=now,
                )
            )
        small = [
            Dataset(name=f"sd-up-{i}", properties={}, created_at=now, updated_at=now) for i in range(UPLOADS)
        ]
        s.add_all(small)
        s.flush()
        return [d.id for d in small]


def connections(pid: int, port: int, *, server: bool) -> dict[int, int]:
    """The established TCP connections of process `pid` on `port` (from /proc), as the client's
    port -> receive-queue size: the server's sockets (local port `port`) or a client's (remote
    port `port`). Keyed by the client's port, so both ends of one connection share a key."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return {}
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed since the listing (in our own process: the listing's own fd)
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
        if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            if server and local == port:
                found[remote] = int(fields[4].split(":")[1], 16)
            elif not server and remote == port:
                found[local] = int(fields[4].split(":")[1], 16)
    return found


class InFlight:
    """LISTS slow-ish list requests and UPLOADS metadata writes whose bodies come in two parts, the
    second only after `release` is set; each on its own connection, in its own thread."""

    def __init__(self, base: str, upload_ids: list[int]) -> None:
        self.base = base
        self.upload_ids = upload_ids
        self.release = threading.Event()
        self.first_parts = [threading.Event() for _ in upload_ids]
        self.outcomes: dict[str, httpx.Response | Exception] = {}
        self.threads = [
            threading.Thread(target=self._list, args=(f"list-{i}",), daemon=True) for i in range(LISTS)
        ] + [threading.Thread(target=self._upload, args=(i,), daemon=True) for i in range(len(upload_ids))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        for event in self.first_parts:
            assert event.wait(timeout=DEADLINE), "an upload did not start"

    def lists_done(self) -> int:
        return sum(1 for name in list(self.outcomes) if name.startswith("list-"))

    def join(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(timeout=DEADLINE * 2)
            assert not thread.is_alive(), "a request never finished"

    def _list(self, name: str) -> None:
        outcome: httpx.Response | Exception
        try:
            with httpx.Client(base_url=self.base, timeout=120) as client:
                outcome = client.get(
                    "/api/v0/dataset-versions/", params={"dataset": "sd-serve", "limit": VERSIONS}
                )
        except Exception as exc:
            outcome = exc
        self.outcomes[name] = outcome  # only once its connection is closed (see all_accepted)

    def _upload(self, index: int) -> None:
        body = json.dumps(UPLOAD_BODY | {"drained": index}).encode()

        def parts() -> Iterator[bytes]:
            yield body[:10]
            self.first_parts[index].set()
            self.release.wait(timeout=DEADLINE)
            yield body[10:]

        try:
            with httpx.Client(base_url=self.base, timeout=120) as client:
                self.outcomes[f"upload-{index}"] = client.post(
                    f"/api/v0/datasets/{self.upload_ids[index]}/metadata/",
                    content=parts(),
                    headers={"Content-Type": "application/json"},
                )
        except Exception as exc:
            self.outcomes[f"upload-{index}"] = exc

    def check(self) -> None:
        """Every request got a whole, correct 200 answer."""
        assert len(self.outcomes) == LISTS + len(self.upload_ids), self.outcomes
        for name, response in sorted(self.outcomes.items()):
            assert isinstance(response, httpx.Response), f"{name}: {response!r}"
            assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:500]}"
            if name.startswith("list-"):
                page = response.json()
                assert page["count"] == VERSIONS, name
                assert [v["name"] for v in page["results"]] == [f"v{i:04d}" for i in range(VERSIONS)], name
            else:
                assert response.json() == UPLOAD_BODY | {"drained": int(name.split("-")[1])}, name


def refused(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=5)
    except httpx.TransportError:  # refused, or reset from the closed listener's backlog
        return True
    return False


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_drains_requests_in_flight(
    settings: Settings, staging: Staging, engine: Engine, started: list[Sidecar | Worker], tmp_path: Path
) -> None:
    upload_ids = populate(engine)
    port = free_port()
    server = start(started, settings.with_(port=port), tmp_path, "serve")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: server.alive() and not refused(base), timeout=DEADLINE, interval=0.1, what="server up")

    requests = InFlight(base, upload_ids)
    try:
        requests.start()

        # Accepted: the server holds every connection and has read all that was sent on them
        # (empty receive queues), so each request's head is parsed. A list that already got its
        # answer counts too.
        def all_accepted() -> bool:
            #
            # The order of the reads matters. A list records its outcome only after its socket
            # is closed, so reading the finished lists first, then our own sockets, never counts
            # a request twice (counting server sockets instead did: the server's end of a closed
            # connection stays ESTABLISHED until its kernel sees the FIN). Every open client
            # connection must then be one the server holds, with nothing left unread.
            done = requests.lists_done()
            ours = connections(os.getpid(), port, server=False)
            held = connections(server.proc.pid, port, server=True)
            return (
                done + len(ours) >= LISTS + UPLOADS
                and len(ours) >= UPLOADS
                and all(p in held and held[p] == 0 for p in ours)
            )

        wait_until(all_accepted, timeout=DEADLINE, interval=0.01, what="every request accepted")
        server.proc.send_signal(signal.SIGTERM)

        # It stops listening at once, but keeps running while the uploads wait for their bodies.
        wait_until(lambda: refused(base), timeout=DEADLINE, what="the listening socket closed")
        assert server.proc.poll() is None, f"the server exited with requests in flight:\n{server.log()}"
    finally:
        requests.join()
    requests.check()

    try:
        code = server.proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {EXIT_TIMEOUT:.0f} s after draining:\n{server.log()}")
    log = server.log()
    assert "Finished server process" in log, log
    # A drained, graceful stop is a clean exit (uvicorn's re-raised SIGTERM is caught by cmd_serve).
    assert code == 0, log

    # The writes answered during the shutdown are in the database.
    with Session(engine) as s:
        rows = s.execute(select(Dataset.id, Dataset.properties).where(Dataset.id.in_(upload_ids))).all()
    assert {ds_id: props for ds_id, props in rows} == {
        ds_id: UPLOAD_BODY | {"drained": i} for i, ds_id in enumerate(upload_ids)
    }
