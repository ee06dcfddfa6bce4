"""Pure core of the webhook: check the HMAC signature, and turn a platform payload into an action."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from .errors import BadURI, InvalidEntry
from .limits import NAME_MAX
from .uris import Target, version_target

MAX_SKEW_SECONDS = 300
PLATFORM_ID_MAX = 64  # `platform_id` columns; the platform's ids are 36 characters


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Sidecar-Signature` value for a body: what valohai-utils' Webhook sends with
    hmac_format=b"%(timestamp)d.%(body)s", auth_secret_prefix="sha256="."""
    digest = hmac.new(secret.encode(), b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()
    return "sha256=" + digest


def signature_problem(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float
) -> str | None:
    """Why a request's signature is not acceptable, or None when it is."""
    if not timestamp or not signature:
        return "missing X-Sidecar-Timestamp or X-Sidecar-Signature header"
    try:
        ts = int(timestamp)
    except ValueError:
        return "X-Sidecar-Timestamp is not unix seconds"
    if abs(now - ts) > MAX_SKEW_SECONDS:
        return f"timestamp is more than {MAX_SKEW_SECONDS} s off"
    if not hmac.compare_digest(sign(secret, ts, body).encode(), signature.strip().encode()):
        return "signature does not match"
    return None


@dataclass(frozen=True)
class Action:
    """What an event asks for: complete a version, complete an execution, or nothing."""

    kind: str  # "version" | "execution" | "ignore"
    target: Target | None = None
    execution: str = ""
    event_type: str = ""
    inputs: tuple[str, ...] = ()  # dataset version URIs the event names as inputs
    platform: PlatformIds | None = None  # a version event's own ids and tags for the objects


@dataclass(frozen=True)
class PlatformIds:
    """What the platform calls a dataset and a version it announced: its ids and tags, kept so
    that a user can paste an id from the platform (`{id}` paths find an object by either)."""

    dataset_id: str | None = None
    version_id: str | None = None
    dataset_tags: tuple[str, ...] = ()
    version_tags: tuple[str, ...] = ()


def input_uris(data: Any) -> tuple[str, ...]:
    """Dataset version URIs found under any key that mentions "input" (e.g. `inputs`,
    `valohai.inputs`), at any depth: the versions an execution used, for `valohai.last-used`."""
    found: list[str] = []
    stack: list[tuple[bool, Any]] = [(False, data)]
    while stack:
        under_input, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((under_input or "input" in str(k).lower(), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((under_input, v) for v in node)
        elif under_input and isinstance(node, str) and node.startswith("dataset://") and node.count("/") == 3:
            found.append(node)
    return tuple(dict.fromkeys(sorted(found)))


def parse_event(payload: Any) -> Action:
    """Map a notification payload to an Action; raise InvalidEntry naming the missing field."""
    if not isinstance(payload, dict):
        raise InvalidEntry("expected a JSON object")
    event_type = payload.get("type")
    data = payload.get("data")
    # The platform always sends a string type and an object of data: anything else is not one of
    # its notifications, and answering "ignored" (202) would hide a broken sender.
    if not isinstance(event_type, str):
        raise InvalidEntry("type: expected a string")
    if data is not None and not isinstance(data, dict):
        raise InvalidEntry("data: expected an object")
    inputs = input_uris(data)
    if event_type == "dataset_version_created":
        if data is None:
            raise InvalidEntry("data: expected an object")
        target = _version_of(data)
        return Action("version", target, event_type=event_type, inputs=inputs, platform=_platform_ids(data))
    if event_type == "execution_completed":
        execution = data.get("valohai.execution-id") if isinstance(data, dict) else None
        if not isinstance(execution, str) or not execution or "/" in execution or execution in (".", ".."):
            raise InvalidEntry("data.valohai.execution-id: expected an execution id")
        return Action("execution", execution=execution, event_type=event_type, inputs=inputs)
    return Action("ignore", event_type=event_type, inputs=inputs)


def _version_of(data: dict[str, Any]) -> Target:
    version = _object(data.get("version"))
    uri = version.get("uri")
    if not uri:
        dataset = _object(data.get("dataset"))
        if not dataset.get("name") or not version.get("name"):
            raise InvalidEntry("data.version.uri (or data.dataset.name and data.version.name) is required")
        uri = f"dataset://{dataset['name']}/{version['name']}"
    try:
        return version_target(uri)
    except BadURI as exc:
        raise InvalidEntry(f"data.version.uri: {exc}") from None


def _platform_ids(data: dict[str, Any]) -> PlatformIds:
    """The ids and tags of a `dataset_version_created` event; a malformed one is left out (they
    are extras: the completion stands without them)."""
    dataset, version = _object(data.get("dataset")), _object(data.get("version"))
    return PlatformIds(_id(dataset.get("id")), _id(version.get("id")), _tags(dataset), _tags(version))


def _id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    if isinstance(value, str) and 0 < len(value) <= PLATFORM_ID_MAX and value.isprintable():
        return value
    return None


def _tags(owner: dict[str, Any]) -> tuple[str, ...]:
    tags = owner.get("tags")
    if not isinstance(tags, list):
        return ()
    return tuple(t for t in tags if isinstance(t, str) and 0 < len(t) <= NAME_MAX and "\x00" not in t)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
