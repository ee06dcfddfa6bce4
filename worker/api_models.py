"""The shapes of the API's JSON answers, for `/openapi.json` and for checking what we send.

The handlers build plain dicts (`store/queries.py`); these models only describe and validate them.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from .datum_keys import ALIAS_KEY, TAGS_KEY
from .limits import ID_MAX

T = TypeVar("T")

MAX_ID = ID_MAX
MAX_LIMIT = 10_000  # real clients ask for pages of 5,000 and 10,000
# offset + limit stays a 64-bit integer, which both databases take in LIMIT/OFFSET.
MAX_OFFSET = MAX_ID - MAX_LIMIT
# A path id: our public id (UUID form), the platform's id for the object, or an old integer
# key. Anything else names nothing: the API answers 404 (never 422).
OwnerId = Annotated[str, Path(min_length=1, max_length=200)]


class Error(BaseModel):
    """Every error: a short code and a sentence; some carry more (position, key, parameter)."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


Id = Annotated[str, Field(description="Public id: UUID form, time-ordered (the first 48 bits are ms)")]


class Violation(BaseModel):
    """A value (null: missing) that breaks its key's property definition (`warn` enforcement)."""

    key: str
    rule: Literal["type", "allowed_values", "required"]
    value: Any


Violations = Annotated[list[Violation], Field(description="What the properties break of their definitions")]


class DatasetRef(BaseModel):
    id: Id
    name: str


class VersionRef(BaseModel):
    id: Id
    name: str
    uri: str


class Dataset(BaseModel):
    id: Id
    name: str
    uri: str
    properties: dict[str, Any]
    tags: list[str]
    violations: Violations
    latest_version: VersionRef | None = Field(description="The newest completed version, or null")
    platform_id: str | None = Field(description="The platform's id for it, when an event carried one")
    ctime: str | None
    mtime: str | None
    created_at: str | None


class Execution(BaseModel):
    id: str


class Datum(BaseModel):
    """One file of one execution, as the platform shows one."""

    id: Id
    name: str = Field(description="Its path in the execution's outputs folder")
    size: int | None = Field(description="Bytes, read when its execution completed (null: not read, or gone)")
    md5: str | None
    sha1: str | None
    sha256: str | None
    ctime: str | None
    mtime: str | None
    uri: str | None
    purged: bool
    output_execution: Execution | None
    tags: list[str]
    alias: str | None
    properties: dict[str, Any]
    violations: Violations


class File(BaseModel):
    execution: str
    path: str
    properties: dict[str, Any]
    datum: Datum


class Version(BaseModel):
    id: Id
    name: str
    dataset: DatasetRef
    uri: str
    status: Literal["building", "completed"]
    properties: dict[str, Any]
    tags: list[str]
    violations: Violations
    aliases: list[str]
    previous_version: str | None = Field(description="The id of the version its `from` named, or null")
    files: list[File] = Field(description="A list carries the first 100; the detail a page of `files_limit`")
    files_count: int
    files_offset: int
    platform_id: str | None
    ctime: str | None
    mtime: str | None
    completed_at: str | None


class Change(BaseModel):
    """One key's change: old and new values (null when absent) and where it came from."""

    key: str
    old: Any
    new: Any
    source: dict[str, Any]
    changed_at: str | None


class Page(BaseModel, Generic[T]):
    """The platform's list shape."""

    count: int = Field(
        description="Matches in all; a list of versions or datasets stops counting past 10,000"
    )
    count_exact: bool = Field(
        default=True,
        description="false: `count` is a cap (10,000) and more match; `count=exact` counts them all",
    )
    next: str | None
    previous: str | None
    results: list[T]


class Health(BaseModel):
    status: Literal["ok"]


class Quarantined(BaseModel):
    count: int | None = Field(description="targets held after failed applies (null: Redis unreadable)")
    targets: list[str] = Field(description="the first 20 of them")


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description='"ok", or "failing: <what>" without credentials')
    quarantined: Quarantined | None = Field(
        default=None, description="shown when Redis answers; a quarantine does not make the server unready"
    )


class EventAnswer(BaseModel):
    status: Literal["accepted", "ignored"]
    type: str
    due: list[str] | None = Field(default=None, description="targets whose apply was sent (accepted only)")


ERROR_TEXT = {
    400: "Bad request: a parameter or the body is malformed; the answer names which.",
    401: "Missing or wrong credentials (API token, or webhook signature).",
    403: "A write from a foreign `Origin`.",
    404: "No such dataset, version or route.",
    409: "It exists already (the answer carries its `id`).",
    413: "Body over 1 MiB.",
    415: "A write without `Content-Type: application/json`.",
    503: "Redis or the database does not answer.",
}


def errors(
    *codes: int, also: dict[int | str, dict[str, Any]] | None = None, **text: str
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error codes, all with the Error schema (`text` overrides a
    description, keyed `e400`, ...), plus the responses in `also`."""
    found: dict[int | str, dict[str, Any]] = {
        code: {"model": Error, "description": text.get(f"e{code}", ERROR_TEXT[code])} for code in codes
    }
    return {**(also or {}), **found}


# -- datums (one file of one execution) ---------------------------------------------------------


class DatumAlias(BaseModel):
    id: str
    name: str
    ctime: str | None
    mtime: str | None
    datum: Datum


class ResolvedDatum(BaseModel):
    datum: Datum


class Download(BaseModel):
    url: None = Field(description="always null: the sidecar has no copy of the file to hand out")
    detail: str


class DatumWrite(BaseModel):
    """A bulk write's answer: each datum's full set after it, and which were only staged."""

    datum_metadata: dict[str, dict[str, Any]]
    staged: list[str] = Field(description="datums of executions still running: applied at completion")


# -- rollbacks ----------------------------------------------------------------------------------


class RolledBackKey(BaseModel):
    """A key put back: from `old` (its value before the rollback) to `new` (null: removed)."""

    key: str
    old: Any
    new: Any


class RollbackConflict(BaseModel):
    """A key left as it is: another source changed it after the execution did."""

    key: str
    value: Any = Field(description="its value now (null: absent, or not read again)")
    reason: str


class RollbackOwner(BaseModel):
    """One dataset, version or datum the rolled-back changes touched."""

    kind: Literal["dataset", "version", "datum"]
    id: str
    target: str = Field(description="its staging target: dataset://..., or execution:<id> for a datum")
    path: str | None = Field(description="a datum's path in its execution")
    reverted: list[RolledBackKey]
    conflicts: list[RollbackConflict]


class Rollback(BaseModel):
    """What a rollback did, or with `dry_run` would do; `id` is the rollback's own id (roll it
    back to undo it), null for a dry run or when nothing was reverted."""

    id: str | None
    execution: str
    dry_run: bool
    reverted: int
    conflicts: int
    owners: list[RollbackOwner]


NO_NUL = "^[^\\u0000]*$"  # the database cannot store U+0000 (limits.value_problem)
VALUE_REF = "#/components/schemas/PropertyValue"
# Any JSON value the store takes (`limits.value_problem`): no U+0000 in a string or key, integers
# within 64 bits. Registered by api._describe.
PROPERTY_VALUE: dict[str, Any] = {
    "description": "A property's value: any JSON, without U+0000, integers within 64 bits",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        # Integers past 64 bits are refused too; not said here, since JSON Schema calls 1e22 an
        # integer while the server reads it as the float it is (and stores it).
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": VALUE_REF}},
        {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": {"$ref": VALUE_REF}},
    ],
}


def properties_schema() -> dict[str, Any]:
    """A property set a write sends (datasets and versions)."""
    return {
        "type": "object",
        "description": "Properties to set; a null value deletes the key. At most 32 levels deep.",
        "propertyNames": {
            "minLength": 1,
            "maxLength": 256,
            "pattern": NO_NUL,
            "not": {"pattern": "^valohai\\."},
        },
        "additionalProperties": {"$ref": VALUE_REF},
    }


def datum_properties_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Properties to set; null deletes. `valohai.tags` and `valohai.alias` allowed.",
        "propertyNames": {
            "minLength": 1,
            "maxLength": 256,
            "pattern": NO_NUL,
            "anyOf": [{"not": {"pattern": "^valohai\\."}}, {"enum": [TAGS_KEY, ALIAS_KEY]}],
        },
        "properties": {
            "valohai.tags": {"type": ["array", "null"], "items": {"type": "string", "pattern": NO_NUL}},
            "valohai.alias": {
                "anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,255}$"}]
            },
        },
        "additionalProperties": {"$ref": VALUE_REF},
    }


# -- change notifications -------------------------------------------------------------------------

EventType = Literal["property.changed", "version.completed", "target.quarantined"]


class Subscription(BaseModel):
    """Where change notifications go; its secret is never shown."""

    id: Id
    url: str
    events: list[EventType]
    filter: str = Field(description="Only targets matching it (the list endpoints' language); empty: all")
    created_at: str | None


class Subscriptions(BaseModel):
    count: int
    next: str | None
    previous: str | None
    results: list[Subscription]


class DeliveredEvent(BaseModel):
    """The event a delivery sends: its `id` is the idempotency key (`X-Sidecar-Event-Id`)."""

    id: str
    type: EventType
    target: str = Field(description="Its staging target: dataset://..., or execution:<id>")
    uri: str | None
    created_at: str | None


class Delivery(BaseModel):
    """One event's delivery to one subscription."""

    id: int
    event: DeliveredEvent
    status: Literal["pending", "delivered", "failed"] = Field(
        description="`failed`: given up after the last try (`sidecar deliveries retry` sends it again)"
    )
    attempts: int
    last_error: str
    next_at: str | None = Field(description="When it is tried next (pending only)")
    delivered_at: str | None


class Deliveries(BaseModel):
    count: int
    next: str | None
    previous: str | None
    results: list[Delivery]
