"""Redis killed (and restarted from its append-only file) while a real watcher stages lines.

A private `redis-server` with `appendonly yes` (one per test, in tmp_path), a real `sidecar watch`
subprocess on it (rescan and sweep every second), a writer thread appending to two executions'
files, and an in-process applier standing in for the worker (it applies whatever is due, as the
watcher's enqueue plus a worker would). Version A completes while lines for it are still being
written; then redis-server is SIGKILLed mid-stream, stays down while the writer goes on, and is
restarted on the same folder and port. Version B completes at the end. The database must equal
the oracle (tests/oracle.py).

What each `appendfsync` mode may lose is simulated faithfully. A SIGKILL of the process alone
loses nothing in either mode: Redis writes the AOF buffer to the file (the page cache) before it
answers the client, and the kernel keeps the page cache when a process dies. What `everysec` can
lose is what the machine loses in a power cut or kernel crash: the writes not yet fsynced, up to
about the last second. So with `everysec` the test cuts the AOF back to its size of one second
before the kill (and tears the last few bytes, as a crash mid-write would): every staged batch of
that second disappears together with the file offsets checkpointed in the same script, and the
watcher must read those lines again. With `always` Redis fsyncs before answering, so nothing it
acknowledged may be lost; the file is left as the kill left it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import sqlalchemy.exc
from sqlalchemy import Engine

from tests.e2e_helpers import clean_env, free_port, kill_group, stop_group, wait_until
from tests.oracle import assert_matches_db, expected_state
from tests.retention_check import assert_retention_keeps_the_oracle
from worker.applying import apply_target
from worker.keys import Keys
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

DEADLINE = 60.0
JSONL = "valohai.metadata.jsonl"
A = Target("version", "fa", "a")
B = Target("version", "fa", "b")
FILES = {"exec-a": [A, A.dataset_target], "exec-b": [B]}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The subject here is Redis: one database backend is enough (test_faults_db covers both)."""
    return f"sqlite:///{tmp_path / 'sidecar.db'}"


# -- the pieces ---------------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test only, with an append-only file in `folder`."""

    def __init__(self, folder: Path, fsync: str) -> None:
        self.folder, self.fsync = folder, fsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        # The log goes to a file (never a pipe nobody reads); --auto-aof-rewrite-percentage 0
        # keeps the one incremental AOF file the test cuts.
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
            + ["--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""]
            + ["--auto-aof-rewrite-percentage", "0", "--maxmemory-policy", "noeviction"]
            + ["--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            wait_until(lambda: self._ping(client), timeout=DEADLINE, interval=0.05, what="redis-server up")
        finally:
            client.close()

    def _ping(self, client: redis.Redis) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()[-2000:]
        try:
            return bool(client.ping())
        except redis.ConnectionError:  # refused, or still loading the AOF
            return False

    def sigkill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def incr_aof(self) -> Path:
        """The incremental AOF file named by the manifest (Redis 7's multi-part AOF)."""
        folder = self.folder / "appendonlydir"
        manifest = next(folder.glob("*.manifest")).read_text().split("\n")
        names = [line.split()[1] for line in manifest if line.endswith(" type i")]
        return folder / names[-1]

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Watcher:
    """A real `sidecar watch` subprocess, in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "watch"],
            env=clean_env(settings.as_env()),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            stop_group(self.proc, timeout=20)
        kill_group(self.proc)
        self._log.close()


def value(rng: random.Random) -> Any:
    return rng.choice([None, rng.randint(0, 99), f"v{rng.randint(0, 9)}", [1, rng.randint(0, 3)], {"x": 1}])


@dataclass
class Writer:
    """Appends lines to the executions' files until stopped (each line flushed as written)."""

    root: Path
    rng: random.Random
    stop: threading.Event = field(default_factory=threading.Event)
    lines: int = 0

    def path(self, execution: str) -> Path:
        return self.root / execution / JSONL

    def run(self) -> None:
        files = {e: open(self.path(e), "ab") for e in FILES}  # noqa: SIM115 - closed below
        try:
            while not self.stop.is_set():
                execution = self.rng.choice(list(FILES))
                for _ in range(self.rng.randint(1, 3)):
                    files[execution].write(self.line(execution) + b"\n")
                    files[execution].flush()
                time.sleep(0.01)
        finally:
            for f in files.values():
                f.close()

    def line(self, execution: str) -> bytes:
        self.lines += 1
        target = self.rng.choice(FILES[execution])
        kind = "dataset" if target.kind == "dataset" else "dataset-version"
        meta = {f"k{self.rng.randint(0, 7)}": value(self.rng), "seq": self.lines}
        return json.dumps({kind: target.key, "metadata": meta}).encode()


class Applier:
    """The worker's part, in-process: apply every due target, again and again, surviving outages."""

    def __init__(self, engine: Engine, staging: Staging) -> None:
        self.engine, self.staging = engine, staging
        self.lock = threading.Lock()  # held while applying: `with applier.lock` pauses it
        self.stop = threading.Event()
        self.errors = 0
        self.failure: Exception | None = None  # anything else: the test reports it

    def run(self) -> None:
        while self.failure is None and not self.stop.wait(0.05):
            with self.lock:
                try:
                    for key in self.staging.due_targets(older_than=0):
                        apply_target(self.engine, self.staging, Target.parse(key))
                except (redis.RedisError, sqlalchemy.exc.OperationalError):
                    self.errors += 1  # Redis is down: try again, as the task would
                except Exception as exc:
                    self.failure = exc


def staged_lines(client: redis.Redis, prefix: str) -> int:
    """Lines the offsets in Redis say were staged, over every file."""
    offsets = cast(dict[bytes, bytes], client.hgetall(Keys(prefix).offsets))
    return sum(json.loads(v)["line"] for v in offsets.values())


def all_staged(client: redis.Redis, prefix: str, writer: Writer) -> bool:
    """Every file checkpointed at its end."""
    raw = cast(dict[bytes, bytes], client.hgetall(Keys(prefix).offsets))
    offsets = {k.decode(): json.loads(v)["offset"] for k, v in raw.items()}
    for execution in FILES:
        size = writer.path(execution).stat().st_size
        assert offsets.get(f"{execution}/{JSONL}") == size, f"{execution}: {offsets} vs size {size}"
    return True


class Sampler:
    """Every 50 ms: (time, AOF size, staged lines), to know what the last second wrote."""

    def __init__(self, server: PrivateRedis, client: redis.Redis, prefix: str) -> None:
        self.server, self.client, self.prefix = server, client, prefix
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            with contextlib.suppress(redis.RedisError, OSError, StopIteration):
                size = self.server.incr_aof().stat().st_size
                self.samples.append((time.monotonic(), size, staged_lines(self.client, self.prefix)))

    def before(self, t: float) -> tuple[float, int, int]:
        """The last sample taken at or before `t` (the first one if none is that old)."""
        older = [s for s in self.samples if s[0] <= t]
        return older[-1] if older else self.samples[0]


class OnStop:
    """Something to do at the end, in the `running` list."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.stop = action


@pytest.fixture
def running() -> Iterator[list[Any]]:
    """Everything started (each with a `stop`), stopped at the end in reverse order, pass or fail."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop()


def start_thread(run: Callable[[], None], stop: threading.Event, things: list[Any]) -> threading.Thread:
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    things.append(OnStop(lambda: thread.join(timeout=30)))
    things.append(OnStop(stop.set))  # stopped before it is joined
    return thread


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_redis_killed_while_staging_loses_nothing(
    tmp_path: Path, engine: Engine, database_url: str, prefix: str, running: list[Any], fsync: str
) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder, fsync)
    running.append(server)
    root = tmp_path / "root"
    for execution in FILES:
        (root / execution).mkdir(parents=True)
    settings = Settings(
        data_dir=tmp_path / "data",
        root=root,
        database_url=database_url,
        redis_url=server.url,
        redis_prefix=prefix,
        rescan_interval=1.0,
        sweep_after=1.0,
    )
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    running.append(OnStop(client.close))
    staging = Staging(client, Keys(prefix))
    seed = random.randrange(1 << 30)
    writer, applier = Writer(root, random.Random(seed)), Applier(engine, staging)
    sampler = Sampler(server, client, prefix)

    watcher = Watcher(settings, tmp_path / "watch.log")
    running.append(watcher)
    start_thread(sampler.run, sampler.stop, running)
    start_thread(applier.run, applier.stop, running)
    writing = start_thread(writer.run, writer.stop, running)

    wait_until(lambda: staged_lines(client, prefix) >= 50, timeout=DEADLINE, what="the watcher staging")
    staging.complete_version(A)  # while lines for A are still being written
    # Keep the completion out of what the crash loses: unlike a line, a completion event has no
    # file it could be read again from (Redis has written it to the AOF before answering). Then
    # wait for lines staged in the last moments, so that the cut below has staged lines to lose.
    completion_durable_at = server.incr_aof().stat().st_size
    time.sleep(1.2)

    def busy_second() -> bool:
        now = sampler.samples[-1]
        return now[2] > sampler.before(now[0] - 0.8)[2]

    wait_until(busy_second, timeout=DEADLINE, interval=0.02, what="lines staged in the last 0.8 s")

    acknowledged = staged_lines(client, prefix)
    killed_at = time.monotonic()
    server.sigkill()
    cut = 0
    if fsync == "everysec":
        # The machine lost what was not fsynced: the last second of the AOF, torn mid-write.
        aof = server.incr_aof()
        keep = sampler.before(killed_at - 1.0)[1] - random.Random(seed).randint(1, 40)
        keep = max(keep, completion_durable_at)
        cut = aof.stat().st_size - keep
        os.truncate(aof, keep)
    time.sleep(1.0)  # down: the watcher keeps meeting connection errors, the writer keeps writing

    # Restart on the same folder and port; look at what it remembers before the watcher does.
    watcher.pause()
    with applier.lock:
        server.start()
        remembered = staged_lines(client, prefix)
        queued = client.llen(Keys(prefix).queue)  # apply tasks in the broker (no worker takes them)
    watcher.resume()
    print(
        f"appendfsync {fsync}: {acknowledged} lines acknowledged as staged before the kill, {remembered} "
        f"remembered after the restart ({cut} bytes of AOF cut); applier errors so far {applier.errors}"
    )
    if fsync == "always":
        assert remembered >= acknowledged, "Redis lost writes it had acknowledged"
    else:
        assert remembered < acknowledged, "the simulated crash lost nothing: the test proves nothing"

    time.sleep(1.0)  # writing on after the restart
    writer.stop.set()
    writing.join(timeout=30)
    assert not writing.is_alive()
    staging.complete_version(B)
    for execution in FILES:
        staging.complete_execution(execution)

    expected = expected_state([writer.path(e) for e in FILES])

    def converged() -> bool:
        assert watcher.alive(), f"the watcher died:\n{watcher.log()[-3000:]}"
        assert applier.failure is None, f"the applier failed: {applier.failure!r}"
        all_staged(client, prefix, writer)
        assert not staging.due_targets(older_than=-1), "targets still due"
        assert_matches_db(engine, expected, completed=[A.key, B.key])
        return True

    wait_until(converged, timeout=DEADLINE, interval=0.25, what="convergence after the restart")
    assert watcher.alive()
    assert "failed" in watcher.log()  # it did meet the outage, and lived through it
    # ... and its enqueue reaches the restarted broker again (late lines of A, the sweep).
    assert client.llen(Keys(prefix).queue) > queued

    # Retention after the crash: the oracle still holds, a rescan and a replay stage nothing, and
    # a late line for A is applied (the watcher is stopped so that the check alone reads the files).
    watcher.stop()
    paths = [writer.path(e) for e in FILES]
    assert_retention_keeps_the_oracle(
        engine, staging, root, paths, late=(writer.path("exec-a"), A), completed=[A.key, B.key]
    )
