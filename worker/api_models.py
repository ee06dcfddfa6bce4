"""The shapes of the API's JSON answers, for `/openapi.json` and for checking what we send.

The handlers build plain dicts (`store/queries.py`); these models only describe and validate them.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

# Ids are 64-bit integers in both databases: anything larger names nothing (404), never a 500.
MAX_ID = 2**63 - 1
MAX_LIMIT = 1000
# offset + limit stays a 64-bit integer, which both databases take in LIMIT/OFFSET.
MAX_OFFSET = MAX_ID - MAX_LIMIT
# A path id, range-checked by FastAPI; out of range it names nothing (the API answers 404).
OwnerId = Annotated[int, Path(ge=1, le=MAX_ID)]


class Error(BaseModel):
    """Every error: a short code and a sentence; some carry more (position, key, parameter)."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


class DatasetRef(BaseModel):
    id: int
    name: str


class Dataset(BaseModel):
    id: int
    name: str
    uri: str
    properties: dict[str, Any]
    created_at: str | None


class File(BaseModel):
    execution: str
    path: str
    properties: dict[str, Any]


class Version(BaseModel):
    id: int
    name: str
    dataset: DatasetRef
    uri: str
    status: Literal["building", "completed"]
    properties: dict[str, Any]
    files: list[File]
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

    count: int
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


class ExecutionRef(BaseModel):
    id: str


class Datum(BaseModel):
    """A file, as the platform shows one (`store/queries.py datum_json`)."""

    id: str = Field(description="public id (UUID form, time-ordered)")
    name: str = Field(description="its path in the execution's outputs folder")
    size: int | None = Field(description="bytes, read when its execution completed (null: not yet, or gone)")
    md5: str | None
    sha1: str | None
    sha256: str | None
    ctime: str | None
    mtime: str | None
    uri: None = Field(description="always null: the sidecar stores no file contents")
    purged: bool
    output_execution: ExecutionRef | None
    tags: list[str]
    alias: str | None = Field(description="the datum alias pointing at it, if any")
    properties: dict[str, Any]


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
