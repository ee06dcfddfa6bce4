"""Pure core of the webhook: signatures as valohai-utils makes them, and payload parsing."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from worker.errors import InvalidEntry
from worker.uris import Target
from worker.webhooks import parse_event, sign, signature_problem

BODY = b'{"type": "dataset_version_created"}'


def test_signature_matches_valohai_utils_format() -> None:
    # valohai.webhooks.Webhook: hmac_format=b"%(timestamp)d.%(body)s", prefix "sha256=".
    expected = hmac.new(
        b"s3cret", b"%(timestamp)d.%(body)s" % {b"timestamp": 1700000000, b"body": BODY}, hashlib.sha256
    ).hexdigest()
    assert sign("s3cret", 1700000000, BODY) == "sha256=" + expected


def test_signature_checks() -> None:
    good = sign("k", 1000, BODY)
    assert signature_problem("k", "1000", good, BODY, now=1100) is None
    assert "missing" in (signature_problem("k", None, good, BODY, now=1000) or "")
    assert "does not match" in (signature_problem("k", "1000", good, BODY + b" ", now=1000) or "")
    assert "does not match" in (signature_problem("other", "1000", good, BODY, now=1000) or "")
    assert "300 s" in (signature_problem("k", "1000", good, BODY, now=1301) or "")
    assert "unix seconds" in (signature_problem("k", "soon", good, BODY, now=1000) or "")


def test_parse_events() -> None:
    created = {
        "type": "dataset_version_created",
        "data": {"dataset": {"name": "press"}, "version": {"name": "v1", "uri": "dataset://press/v1"}},
    }
    assert parse_event(created).target == Target("version", "press", "v1")
    no_uri = {"type": "dataset_version_created", "data": {"dataset": {"name": "p"}, "version": {"name": "v"}}}
    assert parse_event(no_uri).target == Target("version", "p", "v")
    done = {"type": "execution_completed", "data": {"valohai.execution-id": "0190-abc"}}
    assert parse_event(done).execution == "0190-abc"
    assert parse_event({"type": "something_else"}).kind == "ignore"


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"type": "dataset_version_created"},
        {"type": "dataset_version_created", "data": {"version": {}}},
        {"type": "dataset_version_created", "data": {"version": {"uri": "dataset://a"}}},
        {"type": "execution_completed", "data": {}},
        {"type": "execution_completed", "data": {"valohai.execution-id": "../x"}},
    ],
)
def test_bad_payloads(payload: object) -> None:
    with pytest.raises(InvalidEntry):
        parse_event(payload)


def test_inputs_named_in_events() -> None:
    data = {
        "valohai.execution-id": "e1",
        "inputs": {"train": ["dataset://press/v1", "s3://bucket/x"], "extra": "dataset://press/latest"},
        "valohai.inputs": [{"uri": "dataset://other/v9"}],
        "note": "dataset://not/an-input",
    }
    action = parse_event({"type": "execution_completed", "data": data})
    assert action.inputs == ("dataset://other/v9", "dataset://press/latest", "dataset://press/v1")


@pytest.mark.parametrize(
    "payload",
    [{"type": None, "data": {}}, {"data": {}}, {"type": "execution_started", "data": "c$"}, {"type": 7}],
)
def test_payloads_that_are_no_notification_are_refused(payload: dict[str, object]) -> None:
    # The fuzzer's finding: `{"type": null, "data": "c$"}` was answered 202 "ignored".
    with pytest.raises(InvalidEntry):
        parse_event(payload)
