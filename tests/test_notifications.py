"""The pure core of change notifications: subscriptions checked, events matched, bodies signed,
and the retry schedule."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import InvalidEntry
from worker.notifications import (
    EVENT_TYPES,
    MAX_DELAY,
    TargetRef,
    body_of,
    checked,
    event,
    gives_up,
    headers_for,
    retry_delay,
    short_error,
    subscriber,
)
from worker.query import FilterError
from worker.webhooks import signature_problem

GOOD = {"url": "https://hooks.example.com/sidecar?x=1", "events": ["property.changed"], "secret": "s"}


def test_a_good_subscription_is_taken_with_its_events_in_order_and_deduplicated() -> None:
    body = {**GOOD, "events": ["target.quarantined", "property.changed", "target.quarantined"]}
    fields = checked({**body, "filter": 'shift = "night"'})
    assert fields == {
        "url": GOOD["url"],
        "events": ["property.changed", "target.quarantined"],
        "filter": 'shift = "night"',
        "secret": "s",
    }
    assert checked(GOOD)["filter"] == ""


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://",
        "http:///path",
        "example.com/hook",
        "https://example.com:99999/",
        "https://exa mple.com/",
        "https://example.com/\x00",
        "https://exämple.com/",
        "x" * 10,
        "https://example.com/" + "a" * 3000,
        None,
        42,
    ],
)
def test_a_url_that_is_not_http_or_https_with_a_host_is_refused(url: Any) -> None:
    with pytest.raises(InvalidEntry) as raised:
        checked({**GOOD, "url": url})
    assert raised.value.key == "url"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**GOOD, "events": []}, "events"),
        ({**GOOD, "events": ["property.deleted"]}, "events"),
        ({**GOOD, "events": "property.changed"}, "events"),
        ({**GOOD, "secret": ""}, "secret"),
        ({**GOOD, "secret": "a\nb"}, "secret"),
        ({**GOOD, "secret": "s" * 256}, "secret"),
        ({k: v for k, v in GOOD.items() if k != "secret"}, "secret"),
        ({**GOOD, "filter": 5}, "filter"),
        ({**GOOD, "extra": 1}, "extra"),
    ],
)
def test_a_bad_field_is_named(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEntry) as raised:
        checked(body)
    assert raised.value.key == field and not isinstance(raised.value, FilterError)


def test_a_bad_filter_is_a_filter_error_with_its_position() -> None:
    with pytest.raises(FilterError) as raised:
        checked({**GOOD, "filter": "a = 1 and"})
    assert raised.value.position == 9


def test_a_subscriber_wants_its_event_types_of_targets_matching_its_filter() -> None:
    sub = subscriber(1, ["property.changed"], 'shift = "night" and not violates')
    assert sub.needs_violations
    assert sub.wants("property.changed", {"shift": "night"})
    assert not sub.wants("version.completed", {"shift": "night"})
    assert not sub.wants("property.changed", {"shift": "day"})
    broken = [{"key": "shift", "rule": "type", "value": 1}]
    assert not sub.wants("property.changed", {"shift": "night"}, broken)
    every = subscriber(2, list(EVENT_TYPES), "  ")
    assert every.filter is None and not every.needs_violations
    assert all(every.wants(kind, {}) for kind in EVENT_TYPES)


def test_an_event_names_its_target_and_uri() -> None:
    version = TargetRef("version", "dataset://press/v1", "0190-id", dataset="press", version="v1")
    body = event("e1", "version.completed", version, "2026-12-04T00:00:00+00:00", completed_at="x")
    assert body == {
        "id": "e1",
        "type": "version.completed",
        "created_at": "2026-12-04T00:00:00+00:00",
        "target": {
            "kind": "version",
            "id": "0190-id",
            "key": "dataset://press/v1",
            "dataset": "press",
            "version": "v1",
        },
        "uri": "dataset://press/v1",
        "completed_at": "x",
    }
    datum = TargetRef("datum", "execution:e-1", "d-id", execution="e-1", path="a/b.png")
    assert datum.uri == "datum://d-id" and datum.as_json()["path"] == "a/b.png"
    assert TargetRef("execution", "execution:e-1", None, execution="e-1").uri is None
    assert TargetRef("dataset", "dataset://press", None, dataset="press").as_json()["id"] is None


def test_the_headers_carry_the_event_id_and_a_signature_the_webhook_check_accepts() -> None:
    payload = {"id": "e1", "type": "property.changed", "changes": [{"key": "é", "new": 1}]}
    body = body_of(payload)
    now = time.time()
    headers = headers_for("s3cret", payload, body, now)
    assert headers["X-Sidecar-Event-Id"] == "e1" and headers["Content-Type"] == "application/json"
    assert headers["X-Sidecar-Signature"].startswith("sha256=")
    assert (
        signature_problem("s3cret", headers["X-Sidecar-Timestamp"], headers["X-Sidecar-Signature"], body, now)
        is None
    )
    wrong = signature_problem(
        "other", headers["X-Sidecar-Timestamp"], headers["X-Sidecar-Signature"], body, now
    )
    assert wrong == "signature does not match"
    tampered = signature_problem(
        "s3cret", headers["X-Sidecar-Timestamp"], headers["X-Sidecar-Signature"], body + b" ", now
    )
    assert tampered == "signature does not match"


def test_the_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 5.0) for n in range(1, 6)] == [5.0, 10.0, 20.0, 40.0, 80.0]
    assert retry_delay(30, 5.0) == MAX_DELAY
    assert retry_delay(1, 5.0, jitter=0.0) == 2.5
    assert retry_delay(0, 5.0) == 5.0
    assert gives_up(10, 10) and not gives_up(9, 10)


@given(st.integers(0, 200), st.floats(0, 1000), st.floats(-1, 2))
def test_the_retry_delay_is_within_the_upper_half_of_its_step_and_never_over_the_cap(
    attempts: int, base: float, jitter: float
) -> None:
    full = min(MAX_DELAY, base * 2.0 ** max(0, attempts - 1))
    delay = retry_delay(attempts, base, jitter)
    assert full / 2 <= delay <= full <= MAX_DELAY


def test_an_error_is_kept_on_one_short_line() -> None:
    assert short_error("a\n  b\tc") == "a b c"
    long = short_error("x" * 2000)
    assert len(long) == 500 and long.endswith("...")
