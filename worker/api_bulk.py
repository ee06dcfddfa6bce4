"""Routes of bulk edits by filter: `POST /api/v0/{datasets,dataset-versions,data}/metadata/bulk/`
and `GET /api/v0/bulk/<id>/` (`worker/bulk.py` does the work).

Registered before the `{id}` routes of each list, which would otherwise read `metadata` as an id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from . import bulk
from .api_models import datum_properties_schema, errors, properties_schema
from .applying import apply_targets
from .edge import error_response
from .errors import InvalidEntry
from .query import MAX_LENGTH as MAX_FILTER
from .query import FilterError
from .staging import Staging
from .store import bulk as store_bulk
from .store.search import OwnerKind
from .uris import Target

log = logging.getLogger(__name__)
API_ERRORS = (401, 413, 503)
WRITE_ERRORS = (*API_ERRORS, 400, 403, 415)
BulkId = Annotated[str, Path(max_length=64, description="A bulk edit's id")]
Runner = Callable[[str], None]


def inline_runner(engine: Engine, staging: Staging, batch: int = 250) -> Runner:
    """Run a bulk edit in the request itself (no worker: tests, `create_app` without Celery)."""

    def apply(targets: list[Target]) -> None:
        apply_targets(engine, staging, targets)

    def run(ident: str) -> None:
        try:
            bulk.run(engine, staging, ident, apply, batch=batch)
        except Exception as exc:
            log.exception("bulk edit %s failed", ident)
            store_bulk.finish(engine, ident, "failed", f"{type(exc).__name__}: {exc}")

    return run


def bulk_routes(app: FastAPI, engine: Engine, limit: int, runner: Runner) -> None:
    for kind, base in (("dataset", "datasets"), ("version", "dataset-versions"), ("datum", "data")):
        _bulk_route(app, engine, limit, runner, kind, base)  # type: ignore[arg-type]

    @app.get("/api/v0/bulk/{bulk_id}/", response_model=dict[str, Any], responses=errors(*API_ERRORS, 404))
    def get_bulk(bulk_id: BulkId) -> dict[str, Any]:
        """A bulk edit's state (queued, running, done, failed) and progress: `total` owners
        matched when it was asked, `done` handled so far, of which `applied` at once and
        `staged` until they complete."""
        return store_bulk.edit_json(store_bulk.load(engine, bulk_id))


def _bulk_route(app: FastAPI, engine: Engine, limit: int, runner: Runner, kind: OwnerKind, base: str) -> None:
    @app.post(
        f"/api/v0/{base}/metadata/bulk/",
        name=f"bulk_edit_{kind}s",
        response_model=dict[str, Any],
        status_code=202,
        openapi_extra=_bulk_body(kind),
        responses=errors(
            *WRITE_ERRORS,
            also={200: {"model": dict[str, Any], "description": "A dry run: the count and a preview."}},
            e400="No filter, a filter that does not parse (with its position), a bad `set`, a value "
            "a `reject` definition refuses, or more targets than the limit without `confirm`.",
        ),
    )
    async def bulk_edit(request: Request) -> JSONResponse:
        """Set (null deletes) the keys of `set` on every target the filter matches. `dry_run`:
        the number of targets and, for the first 100, the keys that would change (old → new),
        changing nothing. Otherwise the edit runs in the background, batch by batch, each batch
        one transaction (status at the answer's `url`); targets still building get it staged,
        applied when they complete. Past SIDECAR_BULK_LIMIT targets, `confirm` must be the
        count."""
        body = await request.body()
        try:
            asked = bulk.checked(kind, orjson.loads(body))
            if asked.dry_run:
                return JSONResponse(await run_in_threadpool(bulk.preview, engine, asked, limit))
            ident = await run_in_threadpool(bulk.create, engine, asked, limit)
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"not JSON: {exc}")
        except FilterError:
            raise  # answered with its position by the app's handler
        except bulk.NeedsConfirm as exc:
            answer = {"error": "confirm_required", "detail": str(exc), "key": "confirm"}
            return JSONResponse({**answer, "count": exc.count, "limit": exc.limit}, status_code=400)
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        await run_in_threadpool(runner, ident)
        answer = store_bulk.edit_json(await run_in_threadpool(store_bulk.load, engine, ident))
        url = f"/api/v0/bulk/{ident}/"
        return JSONResponse({**answer, "url": url}, status_code=202, headers={"Location": url})


def _bulk_body(kind: OwnerKind) -> dict[str, Any]:
    changes = datum_properties_schema() if kind == "datum" else properties_schema()
    schema = {
        "type": "object",
        "properties": {
            "filter": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_FILTER,
                "format": "sidecar-filter",
                "description": "Which targets: the list's filter (required, or every target would match)",
            },
            "set": {
                **changes,
                "minProperties": 1,
                "description": "Keys to set on each; null deletes the key",
            },
            "dry_run": {"type": "boolean", "default": False},
            "confirm": {
                "type": ["integer", "null"],
                "description": "The count, past SIDECAR_BULK_LIMIT targets",
            },
        },
        "required": ["filter", "set"],
        "additionalProperties": False,
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
