"""`sidecar deliveries retry` and `list`, in-process, on both databases: a delivery given up
against a dead port is listed, counted by a dry run, sent again through the broker (a
`sidecar.deliver` message) or from the command itself once the receiver is up."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import Engine

from tests.test_delivering import SECRET, Receiver, _apply_version, _statuses, receiver  # noqa: F401
from worker.cli import main
from worker.delivering import send_due
from worker.notifications import checked
from worker.settings import Settings
from worker.staging import Staging
from worker.store import subscriptions

pytestmark = pytest.mark.redis


def _run(settings: Settings, *argv: str) -> int:
    return main(
        [*argv, "--database-url", settings.effective_database_url, "--redis-url", str(settings.redis_url)]
    )


def test_retry_sends_given_up_deliveries_again(
    settings: Settings,
    engine: Engine,
    staging: Staging,
    redis_client: redis.Redis,
    receiver: Receiver,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    monkeypatch.setenv("SIDECAR_DELIVERY_TIMEOUT", "5")
    url = receiver.url
    receiver.kill()  # the port is closed: every try is refused
    fields = checked({"url": url, "events": ["property.changed"], "secret": SECRET})
    sub = str(subscriptions.create(engine, fields)["id"])
    _apply_version(staging, engine, "v1", ['{"a": 1}'])
    send_due(engine, settings.with_(delivery_attempts=1))
    assert _statuses(engine) == [("failed", 1)]

    assert _run(settings, "deliveries", "list", sub) == 0
    listed = capsys.readouterr().out
    assert "failed" in listed and "property.changed" in listed and "1 of 1 deliveries" in listed
    assert _run(settings, "deliveries", "retry", "--dry-run") == 0
    assert "1 failed deliveries would be sent again" in capsys.readouterr().out
    assert _statuses(engine) == [("failed", 1)]

    # Through a worker: pending again, and one `sidecar.deliver` on the apply queue.
    assert _run(settings, "deliveries", "retry", sub) == 0
    assert "1 failed deliveries pending again" in capsys.readouterr().out
    assert _statuses(engine) == [("pending", 0)]
    assert redis_client.llen(staging.keys.queue) == 1 and redis_client.exists(staging.keys.delivering)

    # From the command itself, once the receiver is back.
    send_due(engine, settings.with_(delivery_attempts=1))
    assert _statuses(engine) == [("failed", 1)]
    receiver.start()
    assert _run(settings, "deliveries", "retry", "--send") == 0
    assert "1 failed deliveries sent again: 1 delivered" in capsys.readouterr().out
    assert _statuses(engine) == [("delivered", 1)] and len(receiver.events()) == 1
    assert _run(settings, "deliveries", "list", "no-such-id") == 1
