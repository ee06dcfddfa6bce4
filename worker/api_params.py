"""The query parameters routes share, with their ranges and formats for `/openapi.json`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query

from .api_models import MAX_LIMIT, MAX_OFFSET
from .query import MAX_LENGTH as MAX_FILTER

FILTER_TEXT = "The filter language (see README, Search); a filter that does not parse answers 400."
ORDERING_TEXT = (
    "A field (`id`, `name`, `ctime`, `mtime`) or a property (`properties.<key>`); `-` first: descending."
)
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
# The filter language and an ordering key are grammars no JSON Schema can hold: named formats.
Filter = Annotated[
    str | None,
    Query(max_length=MAX_FILTER, json_schema_extra={"format": "sidecar-filter"}, description=FILTER_TEXT),
]
Ordering = Annotated[
    str | None,
    Query(json_schema_extra={"format": "sidecar-ordering"}, description=ORDERING_TEXT),
]
VersionURI = Annotated[str, Query(pattern=r"^dataset://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]

# `count=exact`: count every match (a list counts up to 10,000 and then says `count_exact: false`).
CountMode = Annotated[
    Literal["exact"] | None,
    Query(description="`exact`: count every match (else past 10,000: 10,000 and `count_exact: false`)."),
]
# A keyset position from a `next` link; the page starts after that row. Every text the pattern
# takes is a position (no row of that key: the page starts where it would be).
Cursor = Annotated[
    str | None,
    Query(
        pattern=r"^i[0-9]{1,18}$",
        description="From a `next` link: where the page starts (instead of `offset`). Opaque.",
    ),
]
