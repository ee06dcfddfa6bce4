"""Fuzz the whole `/openapi.json` with schemathesis against a running server with data in it.

Every operation the description lists is driven with generated requests, valid and invalid, and
every answer is checked: never a 5xx, only documented status codes and content types, and bodies
that match their schema. It runs on every CI run (real Redis and SQLite, uvicorn on loopback), in
two configurations: open (no token, no secret) and locked (API token and webhook secret).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.schemas import APIOperation
from sqlalchemy import Engine

from tests.helpers import outcome
from tests.test_query import keys, nodes
from worker.api import create_app
from worker.applying import apply_target
from worker.edge import MAX_REQUEST_HEAD
from worker.keys import Keys
from worker.query import Exists, key_text, render
from worker.staging import Staging
from worker.store.db import make_engine
from worker.store.models import Base
from worker.uris import Target

pytestmark = pytest.mark.redis

TOKEN = "fuzz-t0ken"
SECRET = "fuzz-s3cret"
FILE = "exec-1/valohai.metadata.jsonl"
LINES = [
    b'{"dataset": "dataset://press", "metadata": {"domain": "manufacturing", "line": 4}}',
    b'{"dataset-version": "dataset://press/v1", "metadata": {"sample_count": 4700, "shift": "night"}}',
    b'{"dataset-version": "dataset://press/v2", "metadata": {"sample_count": 12, "tags": ["a", "b"]}}',
    b'{"file": "img/1.png", "metadata": {"camera": "top", "valohai.dataset-versions": ["dataset://press/v1"]}}',
    b'{"dataset-version": "dataset://press/v3", "metadata": {"building": true}}',
    b'{"file": "model.pt", "metadata": {"acc": 0.9, "valohai.alias": "prod", "valohai.tags": ["x"]}}',
]


@dataclass(frozen=True)
class Server:
    url: str
    headers: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seed(engine: Engine, staging: Staging) -> None:
    """Two completed versions (one with a file), a building one, a dataset and some history."""
    staging.stage_lines(FILE, "exec-1", [outcome(raw, n) for n, raw in enumerate(LINES, 1)], "s")
    for key in staging.complete_execution("exec-1"):
        apply_target(engine, staging, Target.parse(key))
    for name in ("v1", "v2"):
        for key in staging.complete_version(Target("version", "press", name)):
            apply_target(engine, staging, Target.parse(key))
    apply_target(engine, staging, Target("version", "press", "v3"))  # registered, still building
    # A watcher that scanned just now, so /readyz is ready (its 503 is for a sick deployment).
    staging.beat("watcher", "fuzz:1", {"last_scan_age": 0.0}, ttl=600)


@pytest.fixture(scope="module", params=["open", "locked"])
def server(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    locked = request.param == "locked"
    folder: Path = tmp_path_factory.mktemp("fuzz")
    engine = make_engine(f"sqlite:///{folder / 'sidecar.db'}")
    Base.metadata.create_all(engine)
    client = redis.Redis.from_url(redis_url)
    keys = Keys(f"test-fuzz-{uuid.uuid4().hex[:8]}")
    staging = Staging(client, keys)
    _seed(engine, staging)

    def enqueue(key: str) -> None:  # the worker's apply, inline: completions really apply
        apply_target(engine, staging, Target.parse(key))

    app = create_app(
        engine,
        staging,
        enqueue,
        api_token=TOKEN if locked else None,
        webhook_secret=SECRET if locked else None,
    )
    port = _free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,  # as `sidecar serve` runs it
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    yield Server(f"http://127.0.0.1:{port}", {"Authorization": f"Token {TOKEN}"} if locked else {})
    uv.should_exit = True
    thread.join(timeout=10)
    for key in client.scan_iter(match=keys.pattern(), count=1000):
        client.delete(key)
    client.close()
    engine.dispose()


# The description names the filter language and ordering keys as formats: valid data is text
# the parser takes (the same strategies the parser's round-trip property test uses).
# Lone surrogates (which the parser's strategies may draw) cannot travel in a URL at all.
def _encodable(text: str) -> bool:
    return not any("\ud800" <= c <= "\udfff" for c in text)


schemathesis.openapi.format("sidecar-filter", nodes.map(render).filter(_encodable))
schemathesis.openapi.format(
    "sidecar-ordering",
    st.tuples(st.sampled_from(["", "-"]), keys)
    .map(lambda p: p[0] + render(Exists(p[1]))[len("exists ") :])
    .filter(_encodable),
)
schemathesis.openapi.format(
    "sidecar-keys",
    st.lists(keys.map(key_text), min_size=1, max_size=5).map(", ".join).filter(_encodable),
)

# Per operation and mode: ~30 s for both configurations on 2 shared cores; more for a long run.
EXAMPLES = int(os.environ.get("SIDECAR_FUZZ_EXAMPLES", "20"))


def _fuzz(server: Server, operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Case[Any]) -> None:
        case.call_and_validate(base_url=server.url, headers=server.headers, timeout=30)

    with contextlib.suppress(Unsatisfiable):  # negative data for an operation with no inputs
        run()


def test_openapi_conformance(server: Server) -> None:
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    # The token is sent with every request (server.headers); generating it would only mutate it.
    # ignored_auth still checks that a request without it is refused.
    api.config.generation.update(with_security_parameters=False)
    operations = [result.ok() for result in api.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 12, [op.label for op in operations]
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(server, operation, mode)
            except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failures
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
