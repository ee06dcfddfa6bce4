"""Routes that look at a whole filtered set: facets, keys and exports (`.../facets/`,
`.../keys/`, `.../export/` under `/api/v0/datasets/`, `/api/v0/dataset-versions/` and
`/api/v0/data/`).

Registered before the `{id}` routes, which would otherwise take `facets` for an id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .api_models import OwnerId, errors
from .api_params import Filter
from .edge import error_response
from .errors import BadURI, InvalidEntry
from .query import FilterError, Key
from .store import datums, diff, export, facets, queries, saved, sets
from .store.search import OwnerKind, ordering_key

log = logging.getLogger(__name__)
API_ERRORS = (401, 413, 503)
MAX_FACET_KEYS = 50
Keys = Annotated[
    str,
    Query(
        min_length=1,
        max_length=4000,  # a URL past ~16 KB is refused by the HTTP server itself
        json_schema_extra={"format": "sidecar-keys"},
        description=f"Comma-separated keys in the filter language's syntax (at most {MAX_FACET_KEYS}).",
    ),
]
Against = Annotated[
    str | None, Query(max_length=600, description="A version id, or dataset://<name>/<version|alias|latest>")
]
Prefix = Annotated[str, Query(max_length=1000, description="Keys that start with this, written with dots")]
Columns = Annotated[
    str | None, Query(max_length=4000, description="Comma-separated top-level keys; default: all")
]


def parse_keys(text: str) -> list[Key]:
    """`a, b.c, `x,y`` → keys; a comma inside backticks belongs to the key. FilterError if one
    does not parse or there are too many."""
    parts, start, quoted = [], 0, False
    for i, ch in enumerate(text):
        if ch == "`":
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append((start, text[start:i]))
            start = i + 1
    parts.append((start, text[start:]))
    keys = []
    for offset, part in parts:
        if not part.strip():
            continue
        try:
            key, descending = ordering_key(part.strip())
        except FilterError as exc:
            raise FilterError(offset + exc.position, exc.expected, exc.problem) from None
        if descending:
            raise FilterError(offset, "a key", "a key cannot start with '-'")
        keys.append(key)
    if not keys:
        raise FilterError(0, "a key", "name at least one key")
    if len(keys) > MAX_FACET_KEYS:
        raise FilterError(0, "fewer keys", f"at most {MAX_FACET_KEYS} keys")
    return keys


def explore_routes(app: FastAPI, engine: Engine) -> None:
    _routes(app, engine, "dataset", "datasets")
    _routes(app, engine, "version", "dataset-versions")
    _routes(app, engine, "datum", "data")

    @app.get(
        "/api/v0/dataset-versions/{version_id}/diff/",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 400, 404),
    )
    def get_diff(version_id: OwnerId, against: Against = None) -> Any:
        """Properties added, removed and changed (old → new), and files added, removed and
        changed (by checksum), from `against` (an id or a version URI; default: the version its
        `from` named, else the dataset's version before it) to this version."""
        with Session(engine) as session:
            try:
                return diff.diff(session, version_id, against)
            except BadURI as exc:
                return error_response(400, "bad_request", f"against: {exc}")


def saved_routes(app: FastAPI, engine: Engine) -> None:
    """`/api/v0/saved-searches/`: list (`?scope=`), create, get and delete saved searches."""
    plain = "[^\\x00-\\x1f\\x7f-\\x9f]"  # no control characters; and not only spaces:
    name = {"type": "string", "maxLength": 255, "pattern": f"^{plain}*[^\\s\\x00-\\x1f\\x7f-\\x9f]{plain}*$"}
    columns = {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": 256},
        "maxItems": 100,
    }
    body = {
        "type": "object",
        "properties": {
            "name": name,
            "scope": {"type": "string", "enum": list(saved.SCOPES)},
            "filter": {"type": "string", "format": "sidecar-filter"},
            "ordering": {"type": "string", "format": "sidecar-ordering"},
            "columns": columns,
        },
        "required": ["name", "scope"],
    }

    @app.get("/api/v0/saved-searches/", response_model=dict[str, Any], responses=errors(*API_ERRORS, 400))
    def list_saved(scope: Literal["datasets", "dataset-versions", "data"] | None = None) -> dict[str, Any]:
        """Saved searches (of one list, with `scope`), by scope and name."""
        found = saved.listed(engine, scope)
        return {"count": len(found), "next": None, "previous": None, "results": found}

    @app.post(
        "/api/v0/saved-searches/",
        status_code=201,
        response_model=dict[str, Any],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}},
        responses=errors(
            *API_ERRORS, 400, 403, 409, 415, e409="A saved search of that name exists in that scope."
        ),
    )
    async def create_saved(request: Request) -> JSONResponse:
        """Save a search: `name`, `scope` (`datasets`, `dataset-versions` or `data`), `filter`,
        `columns` (property keys), `ordering`. Answers it with its `id` and `url` (the list page
        with the search applied)."""
        try:
            fields = saved.checked(orjson.loads(await request.body()))
            found = await run_in_threadpool(saved.create, engine, fields)
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"not JSON: {exc}")
        except saved.Taken as exc:
            return JSONResponse({"error": "exists", "detail": str(exc), "id": exc.existing}, status_code=409)
        except FilterError:
            raise
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        return JSONResponse(found, status_code=201)

    @app.get(
        "/api/v0/saved-searches/{search_id}/",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 404),
    )
    def get_saved(search_id: OwnerId) -> dict[str, Any]:
        return saved.get(engine, search_id)

    @app.delete(
        "/api/v0/saved-searches/{search_id}/", status_code=204, responses=errors(*API_ERRORS, 403, 404)
    )
    def delete_saved(search_id: OwnerId) -> Response:
        saved.remove(engine, search_id)
        return Response(status_code=204)


def _dataset_ask(filter: Filter = None, name: str | None = None) -> sets.Ask:
    return queries.ListQuery(name=name, filter=filter)


def _version_ask(filter: Filter = None, name: str | None = None, dataset: str | None = None) -> sets.Ask:
    return queries.ListQuery(name=name, dataset=dataset, filter=filter)


def _datum_ask(
    filter: Filter = None,
    output_execution: str | None = None,
    name: str | None = None,
    tag: str | None = None,
) -> sets.Ask:
    return datums.DatumQuery(execution=output_execution, name=name, tag=tag, filter=filter)


# Each kind's set is named as its list names it (`/api/v0/data/` by execution, path and tag).
_ASKS: dict[OwnerKind, Callable[..., sets.Ask]] = {
    "dataset": _dataset_ask,
    "version": _version_ask,
    "datum": _datum_ask,
}


def _routes(app: FastAPI, engine: Engine, kind: OwnerKind, base: str) -> None:
    # A default, not an Annotated alias: the annotations are strings, read in the module's scope.
    asked = Depends(_ASKS[kind])

    @app.get(
        f"/api/v0/{base}/facets/",
        name=f"{kind}_facets",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 400),
    )
    def get_facets(keys: Keys, ask: sets.Ask = asked) -> dict[str, Any]:
        """For each key, within the filtered set: how many have it (by type) and how many do not;
        the 20 most frequent strings and the booleans with counts (then `other`); for numbers,
        min, max and a 10-bucket histogram."""
        wanted = parse_keys(keys)
        with Session(engine) as session:
            ids = sets.owner_ids(session, kind, ask)
            if ids is False:
                return {"count": 0, "facets": [facets.facets_of_nothing(k) for k in wanted]}
            return facets.facets(session, kind, ids, wanted)

    @app.get(
        f"/api/v0/{base}/keys/",
        name=f"{kind}_keys",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 400),
    )
    def get_keys(prefix: Prefix = "", ask: sets.Ask = asked) -> dict[str, Any]:
        """The distinct property keys of the filtered set (nested ones as `a.b`), each with how
        many have it and by which JSON type."""
        with Session(engine) as session:
            ids = sets.owner_ids(session, kind, ask)
            found = [] if ids is False else facets.key_counts(session, kind, ids, prefix)
        return {"count": len(found), "results": found}

    @app.get(
        f"/api/v0/{base}/export/",
        name=f"{kind}_export",
        response_class=StreamingResponse,
        responses={
            200: {"description": "The rows, streamed", "content": {m: {} for m in export.MEDIA.values()}},
            **errors(*API_ERRORS, 400),
        },
    )
    def get_export(
        format: Literal["csv", "jsonl", "parquet"] = "jsonl",
        columns: Columns = None,
        ask: sets.Ask = asked,
    ) -> StreamingResponse:
        """Every row of the filtered set in id order, streamed in constant memory: the object's
        fields, then its properties (JSON Lines: the property set; CSV: one column per key,
        nested values as JSON text; Parquet: typed columns `properties.<key>`)."""
        chosen = tuple(c.strip() for c in (columns or "").split(",") if c.strip())
        job = export.Export(kind, ask, format, chosen)
        with Session(engine) as session:
            if ask.filter:  # a filter that does not parse is a 400 now, not a broken stream
                sets.owner_ids(session, kind, ask)
        suffix = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[format]
        headers = {"Content-Disposition": f'attachment; filename="{base}.{suffix}"'}
        return StreamingResponse(
            _logged(export.stream(engine, job), base), media_type=export.MEDIA[format], headers=headers
        )


def _logged(chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
    """An export that fails once its first bytes are sent can only be cut short (the status is
    gone): say why in the log, where an operator can see it."""
    try:
        yield from chunks
    except Exception:
        log.exception("export of %s failed while streaming; the response was cut short", what)
        raise
