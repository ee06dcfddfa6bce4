"""Pure core of change notifications: what a subscription is, which events it wants, the body
and headers of an event as POSTed, and when a failed delivery is tried again. No IO.

The flow (docs/design.md, "Change notifications"): the apply writes events to an outbox table
in its own transaction (`store/outbox.py`); a Celery task sends them (`delivering.py`).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidEntry
from .query import And, Node, Not, Or, Violates, matches, parse
from .webhooks import sign

PROPERTY_CHANGED = "property.changed"
VERSION_COMPLETED = "version.completed"
TARGET_QUARANTINED = "target.quarantined"
EVENT_TYPES = (PROPERTY_CHANGED, VERSION_COMPLETED, TARGET_QUARANTINED)
URL_MAX = 2048  # `subscriptions.url`
SECRET_MAX = 255  # `subscriptions.secret`
ERROR_MAX = 500  # what a delivery keeps of its last error
MAX_DELAY = 3600.0  # the longest wait between two tries of one delivery, in seconds

EVENT_ID_HEADER = "X-Sidecar-Event-Id"
EVENT_TYPE_HEADER = "X-Sidecar-Event"
TIMESTAMP_HEADER = "X-Sidecar-Timestamp"
SIGNATURE_HEADER = "X-Sidecar-Signature"


def checked(body: Any) -> dict[str, Any]:
    """The fields of a subscription from a request body: `url` (http or https), `events` (a
    non-empty list of `EVENT_TYPES`), `filter` (optional; FilterError, with the position, if it
    does not parse) and `secret`. InvalidEntry naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise InvalidEntry("expected a JSON object")
    unknown = sorted(set(body) - {"url", "events", "filter", "secret"})
    if unknown:
        raise InvalidEntry(f"{unknown[0]}: not a field of a subscription", unknown[0])
    url = check_url(body.get("url"))
    events = body.get("events")
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(e, str) and e in EVENT_TYPES for e in events)
    ):
        raise InvalidEntry(f"events: a non-empty list of {', '.join(EVENT_TYPES)}", "events")
    text = body.get("filter", "")
    if not isinstance(text, str):
        raise InvalidEntry("filter: a string", "filter")
    if text.strip():
        parse(text)  # FilterError: a 400 with the position, as the list endpoints answer
    secret = body.get("secret")
    if not isinstance(secret, str) or not 0 < len(secret) <= SECRET_MAX or _control(secret):
        raise InvalidEntry(f"secret: 1..{SECRET_MAX} characters, no control characters", "secret")
    return {
        "url": url,
        "events": sorted(set(events), key=EVENT_TYPES.index),
        "filter": text,
        "secret": secret,
    }


# What a subscription URL may be, exactly (the API's schema says the same, anchored): http or
# https, a host name or IPv4 address (letters, digits, `.`, `-`, `_`), a port in range, then
# printable ASCII. No user:password@ (a secret does not belong in a URL shown by the API), no
# IPv6 literal.
_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
URL_PATTERN = f"https?://[A-Za-z0-9._-]+(:{_PORT})?([/?#][!-~]*)?"
_URL = re.compile(URL_PATTERN)


def check_url(url: Any) -> str:
    """`url` if events can be POSTed to it (`URL_PATTERN`, at most `URL_MAX` characters);
    InvalidEntry (field `url`) otherwise."""
    if not isinstance(url, str) or len(url) > URL_MAX or not _URL.fullmatch(url):
        raise InvalidEntry(
            f"url: an http:// or https:// URL with a host, at most {URL_MAX} printable ASCII characters",
            "url",
        )
    return url


def _control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


@dataclass(frozen=True)
class Subscriber:
    """A subscription as the apply matches events against it."""

    id: int
    events: frozenset[str]
    filter: Node | None  # None: every target

    @property
    def needs_violations(self) -> bool:
        """Whether its filter reads the owner's violations (`violates`), which cost a check."""
        return self.filter is not None and _has_violates(self.filter)

    def wants(
        self, event_type: str, properties: Mapping[str, Any], violations: Sequence[Mapping[str, Any]] = ()
    ) -> bool:
        """Whether an event of `event_type` about a target holding `properties` (after the
        change) goes to this subscriber."""
        if event_type not in self.events:
            return False
        return self.filter is None or matches(self.filter, properties, violations)


def subscriber(sub_id: int, events: Sequence[str], text: str) -> Subscriber:
    """A stored subscription as a `Subscriber` (its filter parsed)."""
    return Subscriber(sub_id, frozenset(events), parse(text) if text.strip() else None)


def _has_violates(node: Node) -> bool:
    if isinstance(node, Violates):
        return True
    if isinstance(node, And | Or):
        return any(_has_violates(item) for item in node.items)
    return isinstance(node, Not) and _has_violates(node.expr)


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRef:
    """What an event is about: a dataset, a version, a datum, or (quarantined) an execution's
    staging target. `key` is the staging target (`dataset://...`, `execution:<id>`)."""

    kind: str
    key: str
    id: str | None = None  # the public id, None when the object does not exist (yet)
    dataset: str | None = None
    version: str | None = None
    execution: str | None = None
    path: str | None = None

    @property
    def uri(self) -> str | None:
        """`dataset://<name>[/<version>]`, `datum://<id>`, or None (an execution)."""
        if self.kind == "dataset":
            return f"dataset://{self.dataset}"
        if self.kind == "version":
            return f"dataset://{self.dataset}/{self.version}"
        if self.kind == "datum" and self.id:
            return f"datum://{self.id}"
        return None

    def as_json(self) -> dict[str, Any]:
        shown = {
            "kind": self.kind,
            "id": self.id,
            "key": self.key,
            "dataset": self.dataset,
            "version": self.version,
            "execution": self.execution,
            "path": self.path,
        }
        return {k: v for k, v in shown.items() if v is not None or k == "id"}


def event(event_id: str, event_type: str, target: TargetRef, at: str, **fields: Any) -> dict[str, Any]:
    """An event's body (before JSON): its id (the idempotency key), type, time, target and URI,
    then what its type adds (`changes`; `completed_at`; `error` and `attempts`)."""
    return {
        "id": event_id,
        "type": event_type,
        "created_at": at,
        "target": target.as_json(),
        "uri": target.uri,
        **fields,
    }


def changes_json(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History rows (as the apply records them) as an event's `changes`: key, old, new and
    source (origin; for a sidecar line its execution, file, line and offset), in order."""
    return [{"key": r["key"], "old": r["old"], "new": r["new"], "source": r["source"]} for r in rows]


def body_of(payload: Mapping[str, Any]) -> bytes:
    """The bytes POSTed (and signed) for an event."""
    return orjson.dumps(payload)


def headers_for(
    secret: str, payload: Mapping[str, Any], body: bytes, now: float | None = None
) -> dict[str, str]:
    """The headers of one try: JSON, the event id and type, and the signature made as incoming
    webhooks' are checked (`webhooks.sign`: HMAC-SHA256 of `<timestamp>.<body>`)."""
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        EVENT_ID_HEADER: str(payload["id"]),
        EVENT_TYPE_HEADER: str(payload["type"]),
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


# -- retries ------------------------------------------------------------------------------------


def retry_delay(attempts: int, base: float, jitter: float = 1.0, cap: float = MAX_DELAY) -> float:
    """Seconds before the next try of a delivery that has failed `attempts` times: `base`
    doubled per failure, at most `cap`, then scaled by `jitter` (0..1, drawn by the caller)
    into its upper half, so that deliveries failed together do not come back together."""
    delay = min(cap, base * 2.0 ** max(0, attempts - 1))
    return delay * (0.5 + 0.5 * min(1.0, max(0.0, jitter)))


def gives_up(attempts: int, limit: int) -> bool:
    """Whether a delivery that has failed `attempts` times is given up (`failed`)."""
    return attempts >= limit


def short_error(text: str) -> str:
    """An error as a delivery keeps it: one line, at most `ERROR_MAX` characters."""
    line = " ".join(text.split())
    return line if len(line) <= ERROR_MAX else line[: ERROR_MAX - 3] + "..."
