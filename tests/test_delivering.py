"""Change notifications end to end, on both databases: properties applied from staged lines, the
events sent by `delivering.send_due` to a real HTTP receiver this test runs on 127.0.0.1, which
answers 500, is slow, is killed and comes back. Every event arrives, with a signature that
verifies, and exactly once after dedup by its id."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.e2e_helpers import wait_until
from tests.helpers import outcome
from tests.test_worker_process import Worker, start_worker, workers  # noqa: F401 - fixture
from worker.applying import apply_target
from worker.delivering import send_due
from worker.notifications import checked
from worker.settings import Settings
from worker.staging import Staging
from worker.store import outbox, subscriptions
from worker.store.models import Delivery
from worker.tasks import Enqueuer, make_app
from worker.uris import Target
from worker.watch import Watcher
from worker.webhooks import signature_problem

pytestmark = pytest.mark.redis

SECRET = "receiver-s3cret"
FILE = "exec-1/valohai.metadata.jsonl"
# Short waits, so that a test takes seconds; a timeout long enough for a loaded machine's
# receiver thread to answer an ordinary request (an extra try would still be deduplicated).
FAST = Settings(delivery_attempts=8, delivery_backoff=0.05, delivery_timeout=1.0)


@dataclass
class Receiver:
    """A small HTTP server that records every POST and answers as `script` says, in turn
    (`ok`, `500`, `slow`: past the sender's timeout, then 200; `redirect`: 302), then `ok`."""

    script: list[str] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    port: int = 0
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.paths.append(self.path)
                    receiver.got.append((dict(self.headers.items()), body))
                    step = receiver.script.pop(0) if receiver.script else "ok"
                if step == "slow":
                    time.sleep(FAST.delivery_timeout * 2)
                code = {"ok": 200, "slow": 200, "500": 500, "redirect": 302}[step]
                self.send_response(code)
                if code == 302:
                    self.send_header("Location", f"http://localhost:{receiver.port}/trap")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 - where a followed 302 would go
                with receiver.lock:
                    receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self) -> dict[str, dict[str, Any]]:
        """What arrived, deduplicated by event id; each checked for its signature first."""
        found: dict[str, dict[str, Any]] = {}
        with self.lock:
            got = list(self.got)
        for headers, body in got:
            problem = signature_problem(
                SECRET,
                headers.get("X-Sidecar-Timestamp"),
                headers.get("X-Sidecar-Signature"),
                body,
                time.time(),
            )
            assert problem is None, problem
            event = orjson.loads(body)
            assert headers["X-Sidecar-Event-Id"] == event["id"]
            found[event["id"]] = event
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    if r.server is not None:
        r.kill()


def _subscribe(engine: Engine, url: str, events: list[str], text: str = "") -> str:
    body = {"url": url, "events": events, "filter": text, "secret": SECRET}
    return str(subscriptions.create(engine, checked(body))["id"])


def _apply_version(staging: Staging, engine: Engine, name: str, metas: list[str], start: int = 1) -> None:
    target = Target("version", "press", name)
    lines = [
        outcome(b'{"dataset-version": "dataset://press/%s", "metadata": %s}' % (name.encode(), m.encode()), n)
        for n, m in enumerate(metas, start)
    ]
    staging.stage_lines(FILE, "exec-1", lines, "s")
    staging.complete_version(target)
    apply_target(engine, staging, target)


def _send_until(engine: Engine, done: Callable[[], bool], deadline: float = 15.0) -> None:
    """Run the sender (as the deliver task and the sweep would) until `done`."""
    end = time.monotonic() + deadline
    while not done():
        assert time.monotonic() < end, "deliveries did not finish in time"
        send_due(engine, FAST)
        time.sleep(0.05)


def _statuses(engine: Engine) -> list[tuple[str, int]]:
    with Session(engine) as session:
        return [(d.status, d.attempts) for d in session.scalars(select(Delivery).order_by(Delivery.id))]


def _all_delivered(engine: Engine) -> Callable[[], bool]:
    return lambda: all(status == "delivered" for status, _ in _statuses(engine))


def test_a_change_is_delivered_signed_with_its_source(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    _subscribe(engine, receiver.url, ["property.changed", "version.completed"])
    _apply_version(staging, engine, "v1", ['{"shift": "night", "count": 3}'])
    _send_until(engine, _all_delivered(engine))
    events = receiver.events()
    by_type = {e["type"]: e for e in events.values()}
    assert set(by_type) == {"property.changed", "version.completed"} and len(events) == 2
    changed = by_type["property.changed"]
    assert changed["uri"] == "dataset://press/v1" and changed["target"]["kind"] == "version"
    assert changed["target"]["key"] == "dataset://press/v1" and changed["target"]["id"]
    assert [(c["key"], c["old"], c["new"]) for c in changed["changes"]] == [
        ("shift", None, "night"),
        ("count", None, 3),
    ]
    source = changed["changes"][0]["source"]
    assert (source["execution"], source["file"], source["line"]) == ("exec-1", FILE, 1)
    assert by_type["version.completed"]["completed_at"]
    assert _statuses(engine) == [("delivered", 1), ("delivered", 1)]


def test_a_500_then_a_slow_answer_are_tried_again_and_each_event_arrives_once(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    receiver.script = ["500", "slow", "redirect"]
    _subscribe(engine, receiver.url, ["property.changed"])
    _apply_version(staging, engine, "v1", ['{"a": 1}'])
    _send_until(engine, _all_delivered(engine))
    # Four tries of one event (more, if the loaded machine made one more time out): a 500, a
    # timeout (the receiver got it anyway), a redirect not followed, then a 200. The receiver
    # dedups by id: one event.
    tries = len(receiver.got)
    assert tries >= 4 and receiver.paths == ["/hook"] * tries  # the redirect was not followed
    assert len(receiver.events()) == 1
    assert _statuses(engine) == [("delivered", tries)]


def test_a_killed_receiver_gets_everything_once_it_is_back(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    sub = _subscribe(engine, receiver.url, ["property.changed", "version.completed"])
    receiver.kill()
    _apply_version(staging, engine, "v1", ['{"a": 1}', '{"b": 2}'])
    _apply_version(staging, engine, "v2", ['{"a": 3}'], start=3)
    for _ in range(3):  # connection refused, each try
        send_due(engine, FAST)
        time.sleep(0.1)
    assert {s for s, _ in _statuses(engine)} == {"pending"}
    with Session(engine) as session:
        _, log = outbox.deliveries_of(session, sub, 10, 0)
    assert all(d["attempts"] >= 1 and d["last_error"] for d in log), log
    receiver.start()  # the same port again
    _send_until(engine, _all_delivered(engine))
    events = receiver.events()
    assert len(events) == 4  # two versions: a change and a completion each
    assert sorted((e["type"], e["uri"]) for e in events.values()) == [
        ("property.changed", "dataset://press/v1"),
        ("property.changed", "dataset://press/v2"),
        ("version.completed", "dataset://press/v1"),
        ("version.completed", "dataset://press/v2"),
    ]


def test_a_receiver_that_never_answers_well_is_given_up_and_retry_sends_it_again(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    receiver.script = ["500"] * FAST.delivery_attempts
    _subscribe(engine, receiver.url, ["property.changed"])
    _apply_version(staging, engine, "v1", ['{"a": 1}'])
    _send_until(engine, lambda: _statuses(engine) == [("failed", FAST.delivery_attempts)])
    assert len(receiver.got) == FAST.delivery_attempts
    assert outbox.retry_failed(engine, None, _now()) == 1
    _send_until(engine, _all_delivered(engine))
    assert _statuses(engine) == [("delivered", 1)] and len(receiver.events()) == 1


def test_two_senders_at_once_never_send_one_delivery_twice(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    _subscribe(engine, receiver.url, ["property.changed"])
    for n in range(12):
        _apply_version(staging, engine, f"v{n}", [f'{{"a": {n}}}'], start=n + 1)
    patient = FAST.with_(delivery_timeout=10.0)  # a try that timed out would be sent again
    threads = [threading.Thread(target=send_due, args=(engine, patient)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Session(engine) as session:
        errors = [d.last_error for d in session.scalars(select(Delivery)) if d.last_error]
    assert len(receiver.got) == 12 == len(receiver.events()), errors  # every one, none twice
    assert _statuses(engine) == [("delivered", 1)] * 12


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_a_post_in_flight_holds_no_lock_an_apply_waits_for(
    engine: Engine, staging: Staging, receiver: Receiver
) -> None:
    receiver.script = ["slow"]  # answers after 2x the timeout: the POST stays in flight
    _subscribe(engine, receiver.url, ["property.changed"])
    _apply_version(staging, engine, "v1", ['{"a": 1}'])
    sender = threading.Thread(target=send_due, args=(engine, FAST))
    sender.start()
    wait_until(lambda: len(receiver.got) == 1, timeout=10, what="the POST in flight")
    started = time.monotonic()
    _apply_version(staging, engine, "v2", ['{"a": 2}'], start=2)  # writes its own outbox rows
    took = time.monotonic() - started
    assert sender.is_alive(), "the POST should still be waiting for its answer"
    sender.join()
    assert took < FAST.delivery_timeout / 2, f"the apply waited {took:.2f} s for the sender"
    _send_until(engine, _all_delivered(engine))
    assert len(receiver.events()) == 2


# -- through a real `sidecar worker`: the apply task asks for a send, the sweep retries ---------


@pytest.mark.e2e
def test_a_real_worker_sends_what_its_applies_wrote_and_the_sweep_resends_after_an_outage(
    settings: Settings,
    staging: Staging,
    engine: Engine,
    receiver: Receiver,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    settings = settings.with_(delivery_backoff=0.2, delivery_timeout=2.0)
    _subscribe(engine, receiver.url, ["property.changed", "version.completed"])
    worker = start_worker(settings, workers, tmp_path)
    enqueue = Enqueuer(make_app(settings))
    target = Target("version", "press", "v1")
    staging.stage_lines(
        FILE, "exec-1", [outcome(b'{"dataset-version": "dataset://press/v1", "metadata": {"a": 1}}')], "s"
    )
    for key in staging.complete_version(target):
        enqueue(key)
    worker.wait_ready()
    # The apply task wrote the events and sent `sidecar.deliver` itself: no sweep needed.
    wait_until(
        lambda: len(receiver.events()) == 2, timeout=60, what=f"events (worker log:\n{worker.log()[-3000:]})"
    )
    receiver.kill()
    staging.stage_lines(
        FILE, "exec-1", [outcome(b'{"dataset-version": "dataset://press/v1", "metadata": {"a": 2}}', 2)], "s"
    )
    enqueue(target.key)
    wait_until(
        lambda: any(s == "pending" and n >= 1 for s, n in _statuses(engine)), timeout=60, what="a failed try"
    )
    receiver.start()
    # Nothing is sent until a delivery is due again and the watcher's sweep sees it.
    watcher = Watcher(settings, staging, enqueue, threading.Event())

    def swept() -> bool:
        watcher._deliveries()
        return len(receiver.events()) == 3

    try:
        wait_until(
            swept, timeout=60, interval=0.5, what=f"the event after the outage (log:\n{worker.log()[-3000:]})"
        )
    finally:
        if watcher._engine is not None:  # `run` disposes of it at its end; this watcher never ran
            watcher._engine.dispose()
    assert [
        e["changes"][0]["new"] for e in receiver.events().values() if e["type"] == "property.changed"
    ] == [1, 2]
    wait_until(_all_delivered(engine), timeout=30, what="every delivery recorded")
