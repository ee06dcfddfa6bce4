"""The apply queue on RabbitMQ (`SIDECAR_BROKER_URL=amqp://...`), with real `sidecar worker`s.

* A worker SIGKILLed inside an apply: RabbitMQ gives the unacked task back as soon as the
  worker's connection closes, and a second worker gets the same task (no sweep, no visibility
  timeout: that is what a Redis broker needs).
* Retries with a countdown (the quarantine backoff) travel as delayed AMQP messages.
* RabbitMQ restarted: a worker reconnects; a task sent before the restart is delivered after it;
  while RabbitMQ is down, lines are still staged and completions accepted (Redis holds them), and
  the sweep sends the applies once it is back.
* An apply held past RabbitMQ's `consumer_timeout`: the task goes back to the queue, the worker
  exits after its apply, another worker gets the task, and the apply counts once.

The first two use the machine's RabbitMQ (`SIDECAR_TEST_AMQP_URL`, default
amqp://guest:guest@127.0.0.1:5672//), each test on its own queue. The last two start a private
RabbitMQ node on free loopback ports under the test's folder (its own epmd, node name, database,
logs and configuration) and restart or configure that one: the machine's shared node is never
stopped or changed. Locally a
missing RabbitMQ skips with the reason shown; with CI=true it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import Engine

from tests.conftest import IN_CI
from tests.e2e_helpers import free_port, wait_until
from tests.oracle import assert_matches_db, db_state, expected_state
from tests.test_e2e_up import Up
from tests.test_metrics import samples
from tests.test_quarantine import _cure, _poison
from tests.test_worker_process import (  # noqa: F401 - `workers` is a fixture
    Worker,
    big_metas,
    expected_history,
    start_worker,
    version_history,
    workers,
    write_lines,
)
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.settings import Settings
from worker.staging import Staging
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.amqp]

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
DEADLINE = 120.0
# Any apply: one target (`sidecar.apply`), a batch, or the drain a sweep sends.
RECEIVED = re.compile(r"Task sidecar\.(?:apply|apply_batch|drain)\[([0-9a-f-]+)\] received")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"RabbitMQ is required in CI: {reason}")
    pytest.skip(reason)


def _reachable(url: str) -> bool:
    with kombu.Connection(url, connect_timeout=3) as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except OperationalError:
            return False
    return True


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: what is tested here is the broker (the databases are covered elsewhere)."""
    return f"sqlite:///{tmp_path / 'sidecar.db'}"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("SIDECAR_TEST_AMQP_URL", DEFAULT_AMQP)
    if not _reachable(url):
        _unavailable(f"no RabbitMQ at {url} (set SIDECAR_TEST_AMQP_URL)")
    return url


def _delete_queue(url: str, queue: str) -> None:
    """Drop a test's queue and its exchange (Celery names both after the queue)."""
    with kombu.Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        with contextlib.suppress(Exception):
            channel.queue_delete(queue)  # type: ignore[attr-defined]  # a kombu Channel; stubs say StdChannel
        with contextlib.suppress(Exception):
            channel.exchange_delete(queue)  # type: ignore[attr-defined]


@pytest.fixture
def on_rabbitmq(settings: Settings, amqp_url: str) -> Iterator[Settings]:
    """The test's settings with the machine's RabbitMQ as the broker; the queue goes afterwards."""
    yield settings.with_(broker_url=amqp_url)
    _delete_queue(amqp_url, Keys(settings.redis_prefix).queue)
    _delete_queue(amqp_url, Keys(settings.redis_prefix).bulk_queue)


# -- `sidecar up` with RabbitMQ as the broker -----------------------------------------------------


@pytest.mark.timeout(300)
def test_sidecar_up_with_rabbitmq_as_the_broker(amqp_url: str, tmp_path: Path) -> None:
    """`up` hands SIDECAR_BROKER_URL to its children: applies go through RabbitMQ, and the
    private Redis holds staging only (no Celery queue in it)."""
    prefix = f"test-up-{uuid.uuid4().hex[:8]}"
    up = Up(tmp_path, {"SIDECAR_BROKER_URL": amqp_url, "SIDECAR_REDIS_PREFIX": prefix})
    try:
        up.wait_ready()
        path = up.execution("exec-up")
        metas: list[dict[str, Any]] = [{"a": 1}, {"b": "two"}, {"a": None}]
        write_lines(path, metas, "dataset://rmq-up/v1")
        wait_until(
            lambda: samples(up.http.get("/metrics").text, "sidecar_lines_ingested_total") == {"": 3},
            timeout=DEADLINE,
            what=f"lines staged (log:\n{up.log()[-3000:]})",
        )
        assert up.version_created("rmq-up", "v1").status_code == 202
        wait_until(
            lambda: (up.version("rmq-up", "v1") or {}).get("properties") == {"b": "two"},
            timeout=DEADLINE,
            what=f"the version applied through RabbitMQ (log:\n{up.log()[-3000:]})",
        )
        assert "Connected to amqp://" in up.log()
        # kombu's Redis transport would have declared its bindings (`_kombu.binding.*`) here.
        assert not list(up.staging.redis.scan_iter(match="_kombu*")), "Celery used the staging Redis"
        assert up.stop() == 0
    finally:
        up.stop()
        _delete_queue(amqp_url, Keys(prefix).queue)
        _delete_queue(amqp_url, Keys(prefix).bulk_queue)


# -- a worker SIGKILLed mid-apply ----------------------------------------------------------------


@contextlib.contextmanager
def _applies_held(database_url: str) -> Iterator[None]:
    """Hold the lock every apply on this SQLite file queues on first (`store.apply._sqlite_queue`),
    so a worker that took a task is certainly inside the apply, not yet acknowledged."""
    fd = os.open(database_url.removeprefix("sqlite:///") + ".apply-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.timeout(600)
def test_a_worker_sigkilled_mid_apply_gets_its_task_back_from_rabbitmq(
    on_rabbitmq: Settings,
    staging: Staging,
    engine: Engine,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    settings = on_rabbitmq
    big = Target("version", "rmq", "big")
    root = settings.require_root()
    path = root / "exec-big" / "valohai.metadata.jsonl"
    metas = big_metas()
    write_lines(path, metas, big.key)
    stats = Ingestor(root, staging, line_limit=settings.line_limit).ingest(path)
    assert stats.rejects == 0
    enqueue = Enqueuer(make_app(settings))
    first = start_worker(settings, workers, tmp_path)
    first.wait_ready()

    with _applies_held(str(settings.database_url)):
        for key in [big.key, *sorted(set(staging.complete_version(big)) - {big.key})]:
            enqueue(key)
        task_id = wait_until(
            lambda: RECEIVED.search(first.log()), timeout=DEADLINE, interval=0.02, what="task received"
        ).group(1)
        first.sigkill()
    assert not first.results(), "the first worker finished an apply: the kill did not land inside it"

    # No sweep runs here (nothing calls Staging.sweep): only the broker can bring the task back.
    second = start_worker(settings, workers, tmp_path)
    second.wait_ready()
    wait_until(
        lambda: task_id in RECEIVED.findall(second.log()),
        timeout=DEADLINE,
        what=f"the killed task {task_id} redelivered (second worker log:\n{second.log()[-3000:]})",
    )
    wait_until(
        lambda: not staging.due_targets(older_than=-1),
        timeout=DEADLINE * 2,
        interval=0.5,
        what=f"every target applied (second worker log:\n{second.log()[-3000:]})",
    )
    assert_matches_db(engine, expected_state([path]), completed=[big.key])
    assert version_history(engine, big) == expected_history(metas)  # nothing applied twice


# -- retries with a countdown ----------------------------------------------------------------------


def test_apply_retries_with_a_countdown_travel_over_rabbitmq(
    on_rabbitmq: Settings,
    staging: Staging,
    engine: Engine,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """A failing apply is retried with backoff (`self.retry(countdown=...)`: a new message with an
    ETA, held by the worker until then), then quarantined; cured and retried, it applies."""
    settings = on_rabbitmq.with_(apply_retries=2, apply_retry_backoff=0.5)
    bad = Target("version", "rmq", "bad")
    root = settings.require_root()
    path = root / "exec-bad" / "valohai.metadata.jsonl"
    write_lines(path, [{"a": 1}, {"poison": True}, {"a": 2}], bad.key)
    Ingestor(root, staging, line_limit=settings.line_limit).ingest(path)
    enqueue = Enqueuer(make_app(settings))
    worker = start_worker(settings, workers, tmp_path)
    worker.wait_ready()
    enqueue(bad.key)  # registers the version (building) before the poison goes in
    wait_until(lambda: db_state(engine)[1] == {bad.key: "building"}, timeout=DEADLINE, what="registered")
    _poison(engine)
    for key in staging.complete_version(bad):
        enqueue(key)
    wait_until(
        lambda: bad.key in staging.quarantined(),
        timeout=DEADLINE,
        what=f"quarantine after the retries\n{worker.log()[-3000:]}",
    )
    assert staging.quarantined()[bad.key]["attempts"] == 3
    assert worker.log().count(f"apply {bad.key} failed") == 2
    # Each retry was a message sent back to RabbitMQ with its countdown, and came back.
    assert len(re.findall(r"Task sidecar\.apply\[[0-9a-f-]+\] retry: Retry in", worker.log())) == 2

    _cure(engine)
    for key in staging.quarantined():
        staging.release(Target.parse(key))
        enqueue(key)
    wait_until(lambda: not staging.due_targets(older_than=-1), timeout=DEADLINE, what="the retried version")
    assert_matches_db(engine, expected_state([path]), completed=[bad.key])


# -- RabbitMQ restarted ------------------------------------------------------------------------------


class RabbitNode:
    """A private RabbitMQ node: its own ports, epmd, node name, database and logs under `folder`.

    Never the machine's node: every path and port is the test's own, and the machine's
    `rabbitmq-env.conf` (which names the shared node) is not read.
    """

    def __init__(self, binary: Path, folder: Path, conf: str = "", advanced: str = "[].\n") -> None:
        self.binary = binary
        self.conf, self.advanced = conf, advanced
        self.folder = folder
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _env(self) -> dict[str, str]:
        f = self.folder
        (f / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n{self.conf}")
        (f / "advanced.config").write_text(self.advanced)
        (f / "enabled_plugins").write_text("[].\n")
        (f / "rabbitmq-env.conf").write_text("")
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(f),  # the Erlang cookie goes here
            "RABBITMQ_CONF_ENV_FILE": str(f / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(f / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(f / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
            "RABBITMQ_NODENAME": f"sidecar-test-{f.name}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(f / "mnesia"),
            "RABBITMQ_LOG_BASE": str(f / "log"),
            "RABBITMQ_PID_FILE": str(f / "rabbit.pid"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        env = self._env()
        if self.epmd is None:
            # Our own epmd, started (and stopped) by us: the node would otherwise daemonize one.
            epmd = shutil.which("epmd") or "epmd"
            self.epmd = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"], env=env, start_new_session=True
            )
        self.starts += 1
        with open(self.folder / f"start-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [str(self.binary)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(self._up, timeout=DEADLINE, interval=0.5, what=f"private RabbitMQ on {self.port}")

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            f"rabbitmq-server exited: {(self.folder / f'start-{self.starts}.log').read_text()[-3000:]}"
        )
        return _reachable(self.url)

    def stop(self) -> None:
        """A clean stop (SIGTERM: the node shuts down and keeps its durable queues on disk)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # the shell script exits with the node; make sure nothing of its group is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.epmd is not None:
            self.epmd.terminate()
            self.epmd.wait(timeout=10)


def _rabbitmq_server() -> Path | None:
    """The script that runs a node as the calling user. Debian's /usr/sbin/rabbitmq-server is a
    wrapper that switches to the rabbitmq user and the system's paths; the script it runs sits
    next to the wrapper's target."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    script = Path(found).resolve().with_name("rabbitmq-server")
    return script if script.exists() else None


@pytest.fixture
def rabbit_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitNode]:
    """A started private node; `@pytest.mark.rabbitmq_conf(conf, advanced)` adds configuration
    (rabbitmq.conf lines, and an advanced.config for what rabbitmq.conf cannot set)."""
    binary = _rabbitmq_server()
    if binary is None:
        _unavailable("no rabbitmq-server on PATH to start a private node")
        raise AssertionError("unreachable")
    marker = request.node.get_closest_marker("rabbitmq_conf")
    node = RabbitNode(
        binary, tmp_path_factory.mktemp(f"rmq{uuid.uuid4().hex[:6]}"), *(marker.args if marker else ())
    )
    try:
        node.start()
        yield node
    finally:
        node.close()


def _stage_and_complete(
    settings: Settings, staging: Staging, name: str, metas: list[dict[str, object]]
) -> Path:
    target = Target("version", "restart", name)
    path = settings.require_root() / f"exec-{name}" / "valohai.metadata.jsonl"
    write_lines(path, metas, target.key)
    stats = Ingestor(settings.require_root(), staging, line_limit=settings.line_limit).ingest(path)
    assert stats.lines == len(metas) and stats.rejects == 0
    staging.complete_version(target)
    return path


def _applied(engine: Engine, staging: Staging, files: list[Path]) -> bool:
    if staging.due_targets(older_than=-1):
        return False
    try:
        assert_matches_db(engine, expected_state(files))
    except AssertionError:
        return False
    return True


@pytest.mark.timeout(600)
def test_rabbitmq_restarted_loses_no_apply(
    settings: Settings,
    rabbit_node: RabbitNode,
    staging: Staging,
    engine: Engine,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    settings = settings.with_(broker_url=rabbit_node.url)
    enqueue = Enqueuer(make_app(settings))
    files: list[Path] = []

    def apply_all() -> None:
        staging.sweep(enqueue.drain, older_than=-1)  # every due target, as the watcher's sweep would

    def converged(what: str, worker: Worker) -> None:
        wait_until(
            lambda: _applied(engine, staging, files),
            timeout=DEADLINE,
            interval=0.5,
            what=f"{what} (worker log:\n{worker.log()[-3000:]})",
        )

    worker = start_worker(settings, workers, tmp_path)
    worker.wait_ready()
    files.append(_stage_and_complete(settings, staging, "before", [{"a": 1}, {"b": 2}]))
    apply_all()
    converged("applied before the restart", worker)

    # 1. Restarted under a running worker: it reconnects and takes new tasks.
    rabbit_node.stop()
    rabbit_node.start()
    files.append(_stage_and_complete(settings, staging, "after", [{"a": 3}, {"c": None}]))
    apply_all()
    converged("applied after the restart, by the reconnected worker", worker)

    # 2. Down: staging and completion go on (Redis holds them); sending fails, the target stays
    # due, and the sweep sends it once RabbitMQ is back.
    rabbit_node.stop()
    files.append(_stage_and_complete(settings, staging, "down", [{"d": "while down"}]))
    with pytest.raises(OperationalError):
        enqueue("dataset://restart/down")
    assert "dataset://restart/down" in staging.due_targets(older_than=-1)
    rabbit_node.start()
    apply_all()
    converged("applied once RabbitMQ was back", worker)

    # 3. A task waiting in the queue, no worker running, RabbitMQ restarted: the durable queue
    # and the persistent message survive it, and a new worker applies it.
    worker.stop()
    files.append(_stage_and_complete(settings, staging, "queued", [{"q": True}]))
    apply_all()
    rabbit_node.stop()
    rabbit_node.start()
    second = start_worker(settings, workers, tmp_path)
    second.wait_ready()
    wait_until(
        lambda: _applied(engine, staging, files),
        timeout=DEADLINE,
        interval=0.5,
        what=f"the queued task after the restart (log:\n{second.log()[-3000:]})",
    )
    assert RECEIVED.search(second.log())  # delivered by the broker, not applied by anyone else


# -- an apply held past RabbitMQ's consumer_timeout ---------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.rabbitmq_conf("consumer_timeout = 2000\n", "[{rabbit, [{channel_tick_interval, 500}]}].\n")
def test_an_apply_held_past_the_consumer_timeout_is_applied_once(
    settings: Settings,
    rabbit_node: RabbitNode,
    staging: Staging,
    engine: Engine,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """RabbitMQ closes the channel of a delivery unacknowledged for longer than `consumer_timeout`
    (30 min by default; checked every channel tick, 60 s by default, 0.5 s here) and puts the task
    back in the queue. Celery takes the closed channel as unrecoverable: the worker finishes its
    running apply, cannot acknowledge it, and exits. Another worker gets the task meanwhile; the
    watermark makes the two applies one."""
    settings = settings.with_(broker_url=rabbit_node.url)
    target = Target("version", "slow", "v1")
    root = settings.require_root()
    path = root / "exec-slow" / "valohai.metadata.jsonl"
    metas: list[dict[str, object]] = [{"a": 1}, {"b": 2}, {"a": None}]
    write_lines(path, metas, target.key)
    Ingestor(root, staging, line_limit=settings.line_limit).ingest(path)
    staging.complete_version(target)
    enqueue = Enqueuer(make_app(settings))
    first = start_worker(settings, workers, tmp_path)
    first.wait_ready()
    with _applies_held(str(settings.database_url)):
        enqueue(target.key)
        task_id = wait_until(
            lambda: RECEIVED.search(first.log()), timeout=DEADLINE, interval=0.05, what="task received"
        ).group(1)
        wait_until(
            lambda: "Unrecoverable error: PreconditionFailed" in first.log(),
            timeout=DEADLINE,
            interval=0.2,
            what=f"the channel closed by the consumer timeout (log:\n{first.log()[-3000:]})",
        )
        second = start_worker(settings, workers, tmp_path)
        second.wait_ready()
        wait_until(
            lambda: task_id in RECEIVED.findall(second.log()), timeout=DEADLINE, what="the task redelivered"
        )
        assert first.proc.poll() is None  # still inside its apply: Celery waits for running tasks
    wait_until(lambda: first.proc.poll() is not None, timeout=DEADLINE, what="the first worker to exit")
    staging.sweep(enqueue.drain, older_than=-1)  # the dataset target, which nothing else sent
    wait_until(
        lambda: _applied(engine, staging, [path]),
        timeout=DEADLINE,
        interval=0.5,
        what=f"applied (second worker log:\n{second.log()[-3000:]})",
    )
    assert version_history(engine, target) == expected_history(metas)  # once, not twice
    print(f"first worker exited with {first.proc.returncode}")


# -- the sweep waits while batched applies are queued ----------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_enqueuer_is_busy_while_the_bulk_queue_holds_messages(
    broker: str, settings: Settings, amqp_url: str, redis_client: Any
) -> None:
    """`Enqueuer.busy` reads the broker's count of the bulk queue (a passive declare), on Redis
    and on RabbitMQ: the watcher's sweep sends no drain while it is not empty."""
    if broker == "rabbitmq":
        settings = settings.with_(broker_url=amqp_url)
    keys = Keys(settings.redis_prefix)
    enqueue = Enqueuer(make_app(settings))
    try:
        assert not enqueue.busy()  # no queue yet (RabbitMQ: unknown to the broker), or empty
        enqueue.drain(5.0)  # a task on the bulk queue, which no worker takes here
        assert wait_until(enqueue.busy, timeout=DEADLINE, what="the bulk queue counted")
        enqueue("dataset://busy/v1")  # the apply queue is not what a drain would race
        with enqueue.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(keys.bulk_queue)  # type: ignore[attr-defined]  # see above
        assert not enqueue.busy()
    finally:
        if broker == "rabbitmq":
            _delete_queue(amqp_url, keys.queue)
            _delete_queue(amqp_url, keys.bulk_queue)


def test_a_broker_that_cannot_answer_is_not_busy(settings: Settings) -> None:
    """The sweep is the backstop: a broker it cannot reach must not turn it off, nor hold the
    watcher's loop (no connection retries)."""
    enqueue = Enqueuer(make_app(settings.with_(broker_url=f"redis://127.0.0.1:{free_port()}/0")))
    assert not enqueue.busy()
