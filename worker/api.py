"""The HTTP server: webhooks in, properties out (`/api/v0/...`, shaped like the platform's API)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

import orjson
import sqlalchemy.exc
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from . import __version__, metrics
from .api_bulk import bulk_routes, inline_runner
from .api_definitions import definition_routes
from .api_explore import explore_routes, saved_routes
from .api_models import (
    PROPERTY_VALUE,
    Change,
    Dataset,
    Datum,
    DatumAlias,
    DatumWrite,
    Download,
    EventAnswer,
    Health,
    OwnerId,
    Page,
    Readiness,
    ResolvedDatum,
    Rollback,
    Version,
    datum_properties_schema,
    errors,
    properties_schema,
)
from .api_params import CountMode, Cursor, Filter, Limit, Offset, Ordering, VersionURI
from .api_subscriptions import subscription_routes
from .applying import roll_back, rollback_json, write_datum_properties, write_properties
from .edge import MAX_BODY, WriteGuard, error_response
from .enqueue import Enqueue, Sender, sender
from .errors import BadURI, InvalidEntry, NotFound
from .query import FilterError
from .staging import RedisError, Staging
from .store import datums, definitions, queries, writes
from .store.last_used import touch_last_used
from .store.models import Dataset as DatasetRow
from .store.platform import record_platform_ids
from .store.queries import FILES_PAGE
from .store.writes import current_properties
from .uris import Target
from .web import mount_web
from .webhooks import Action, parse_event, signature_problem

log = logging.getLogger(__name__)

DatumOrdering = Annotated[
    str | None,
    Query(
        json_schema_extra={"format": "sidecar-ordering"},
        description="`id`, `name`, `ctime`, `mtime`, or a property key (`properties.<key>`); `-` descends.",
    ),
]
FilesLimit = Annotated[int, Query(ge=0, le=FILES_PAGE)]
# Every /api/ route may answer these: no token, a body over the cap, Redis or the database down.
API_ERRORS = (401, 413, 503)
WRITE_ERRORS = (*API_ERRORS, 400, 403, 404, 415)


def create_app(
    engine: Engine,
    staging: Staging,
    enqueue: Enqueue | Sender,
    *,
    webhook_secret: str | None = None,
    api_token: str | None = None,
    watcher_max_age: float = 120.0,
    allowed_origins: Sequence[str] = (),
    recheck: Callable[[], None] | None = None,
    bulk_edit: Callable[[str], None] | None = None,
    bulk_limit: int = 100_000,
) -> FastAPI:
    """The ASGI app. Read handlers are plain functions (run in a thread pool) over one engine.
    `recheck` asks for the background re-check after a definition change (without one, it waits
    for `sidecar definitions recheck`; `sidecar status` shows it pending). `bulk_edit` sends a
    bulk edit just recorded to a worker (without one, it runs in the request)."""
    app = FastAPI(title="Dataset properties sidecar", version=__version__)
    _error_handlers(app)
    _health_routes(app, engine, staging, watcher_max_age)

    if api_token:
        _require_token(app, api_token)
    _describe(app, token=bool(api_token))
    # Starlette's limiter counts bytes while a handler reads the body and stops past the cap (a
    # 413 rendered by _http). WriteGuard is added last, so it runs first: a Content-Length over
    # the cap or a refused write never reaches the token check, the limiter or a handler.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=MAX_BODY)
    app.add_middleware(WriteGuard, allowed_origins=allowed_origins, max_body=MAX_BODY)
    _webhook_routes(app, engine, staging, sender(enqueue), webhook_secret)
    _resolve_route(app, engine)  # before /dataset-versions/{id}/, which would match "resolve"
    explore_routes(app, engine)  # before /{id}/ routes too: "facets" is no id
    saved_routes(app, engine)
    definition_routes(app, engine, recheck or (lambda: None))
    subscription_routes(app, engine)
    bulk_routes(app, engine, bulk_limit, bulk_edit or inline_runner(engine, staging))  # before {id}
    _read_routes(app, engine)
    for kind, base in (("dataset", "datasets"), ("version", "dataset-versions")):
        _metadata_routes(app, engine, staging, kind, base)
    _datum_routes(app, engine)
    _datum_write_routes(app, engine, staging)
    _datum_alias_routes(app, engine)
    _rollback_route(app, engine, staging)
    mount_web(app, engine, staging)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error is `{"error", "detail"}` JSON; a 5xx body never carries exception text (it can
    hold a database URL with its password): that goes to the log."""

    @app.exception_handler(FilterError)
    def _bad_filter(_request: Request, exc: FilterError) -> JSONResponse:
        body = {"error": "bad_filter", "detail": str(exc), "position": exc.position, "expected": exc.expected}
        return JSONResponse(body, status_code=400)

    @app.exception_handler(RedisError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        service = "redis" if isinstance(exc, RedisError) else "database"
        log.warning("%s unavailable during %s %s: %s", service, request.method, request.url.path, exc)
        return _error(503, "unavailable", f"{service} unavailable; try again later")

    @app.exception_handler(NotFound)
    def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)

    @app.exception_handler(HTTPException)
    def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes (404), wrong methods (405, with Allow), bodies past the cap (413).
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "error")
        detail = f"body over {MAX_BODY} bytes" if exc.status_code == 413 else str(exc.detail)
        return JSONResponse({"error": code, "detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_answer(exc)

    @app.exception_handler(Exception)
    def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", "internal error; the server log has the details")


def _validation_answer(exc: RequestValidationError) -> JSONResponse:
    """A path id that is not a 64-bit id names nothing (404); a bad query parameter is a 400
    naming the parameter and the rule it broke."""
    first = exc.errors()[0]
    where, name = (list(first.get("loc", ())) + ["request", "?"])[:2]
    if where == "path":
        return _error(404, "not_found", f"not found: {name} {first.get('input')!r}"[:200])
    body = {"error": "bad_request", "detail": f"{name}: {first.get('msg', 'invalid')}", "parameter": name}
    return JSONResponse(body, status_code=400)


def _health_routes(app: FastAPI, engine: Engine, staging: Staging, watcher_max_age: float) -> None:
    metrics.register_backlog(staging)
    registry = metrics.scrape_registry()

    @app.get("/healthz", response_model=Health, responses=errors(413))
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses=errors(
            413, also={503: {"model": Readiness, "description": "Not ready: the failing part is named."}}
        ),
    )
    def readyz() -> JSONResponse:
        """Redis and the database answer, and a watcher has scanned recently; 503 naming what fails."""
        checks = {"redis": _check_redis(staging), "database": _check_database(engine)}
        checks["watcher"] = (
            _check_watchers(staging, watcher_max_age) if checks["redis"] == "ok" else "unknown"
        )
        ready = all(v == "ok" for v in checks.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
        if checks["redis"] == "ok":
            # Shown, not failed on: one poisoned target must not take the API out of service.
            body["quarantined"] = _quarantined(staging)
        return JSONResponse(body, 200 if ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses=errors(
            413, also={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}}
        ),
    )
    def metrics_endpoint() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _quarantined(staging: Staging) -> dict[str, Any]:
    try:
        held = staging.quarantined()
    except RedisError:
        return {"count": None, "targets": []}
    return {"count": len(held), "targets": sorted(held)[:20]}


def _check_redis(staging: Staging) -> str:
    try:
        staging.ping()
        return "ok"
    except Exception as exc:  # any failure is "not ready"
        return _failing("redis", exc)


def _check_database(engine: Engine) -> str:
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return "ok"
    except Exception as exc:
        return _failing("database", exc)


def _failing(part: str, exc: Exception) -> str:
    """Name the part and the exception type only: the message can carry a URL with a password."""
    log.warning("readiness: %s failing: %s", part, exc)
    return f"failing: {type(exc).__name__}"


def _check_watchers(staging: Staging, max_age: float) -> str:
    watchers = [h for h in staging.heartbeats() if h.get("role") == "watcher"]
    if not watchers:
        return "failing: no watcher has reported"
    freshest = min(float(h.get("last_scan_age", 1e9)) for h in watchers)
    if freshest > max_age:
        return f"failing: last full scan {freshest:.0f} s ago (limit {max_age:.0f} s)"
    return "ok"


def _require_token(app: FastAPI, token: str) -> None:
    """`Authorization: Token <token>` on every /api/ request, compared in constant time."""
    expected = f"Token {token}".encode()

    @app.middleware("http")
    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "unauthorized", "missing or wrong 'Authorization: Token <token>' header")
        return await call_next(request)


def _describe(app: FastAPI, token: bool) -> None:
    """Finish `/openapi.json`: FastAPI lists a 422 on every operation with parameters, but ours
    answer validation errors 400 (a parameter) or 404 (a path id); and with a token set, every
    /api/ operation says it needs it."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = plain()  # caches itself in app.openapi_schema; completed here once
            for path, operations in spec["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if token and path.startswith("/api/"):
                        operation["security"] = [{"token": []}]
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas["PropertyValue"] = PROPERTY_VALUE  # what the write bodies' values refer to
            if token:
                scheme = {"type": "apiKey", "in": "header", "name": "Authorization"}
                spec["components"]["securitySchemes"] = {"token": scheme | {"description": "Token <token>"}}
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _metadata_routes(app: FastAPI, engine: Engine, staging: Staging, kind: str, base: str) -> None:
    @app.get(
        f"/api/v0/{base}/{{owner_id}}/metadata/",
        name=f"get_{kind}_metadata",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 404),
    )
    def get_metadata(owner_id: OwnerId) -> dict[str, Any]:
        return current_properties(engine, kind, owner_id)

    @app.post(
        f"/api/v0/{base}/{{owner_id}}/metadata/",
        name=f"set_{kind}_metadata",
        response_model=dict[str, Any],
        openapi_extra=_properties_body(),
        responses=errors(
            *WRITE_ERRORS,
            also={202: {"model": dict[str, Any], "description": "The version is still building: staged."}},
            e400="Not JSON, not an object, a reserved `valohai.` key, a bad key or depth.",
            e404="No such dataset or version.",
        ),
    )
    async def set_metadata(owner_id: OwnerId, request: Request) -> JSONResponse:
        """Set each key of the JSON object body; null deletes. Answers the full set after the change."""
        body = await request.body()  # capped while read (RequestBodyLimitMiddleware): past 1 MiB it is a 413
        try:
            payload = orjson.loads(body)
            result = await run_in_threadpool(write_properties, engine, staging, kind, owner_id, payload)
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"not JSON: {exc}")
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        if result.staged:
            # The version is still building: the write is staged and applied at completion.
            return JSONResponse(result.properties, status_code=202, headers={"X-Sidecar-Staged": "true"})
        return JSONResponse(result.properties)

    @app.get(
        f"/api/v0/{base}/{{owner_id}}/metadata/history/",
        name=f"{kind}_history",
        response_model=Page[Change],
        responses=errors(*API_ERRORS, 400, 404),
    )
    def get_history(
        request: Request, owner_id: OwnerId, limit: Limit = 100, offset: Offset = 0
    ) -> dict[str, Any]:
        with Session(engine) as session:
            owner = (
                queries.get_dataset(session, owner_id)
                if kind == "dataset"
                else queries.get_version(session, owner_id)
            )
            count, rows = queries.history(session, kind, owner.id, limit=limit, offset=offset)
        return _page(request, count, limit, offset, rows)


def _resolve_route(app: FastAPI, engine: Engine) -> None:
    @app.get(
        "/api/v0/dataset-versions/resolve/",
        response_model=Version,
        responses=errors(*API_ERRORS, 400, 404, e400="Not a dataset://<name>/<version> URI."),
    )
    def resolve_version(uri: VersionURI) -> Any:
        """Resolve `dataset://<name>/<version>` (`latest` = newest completed) and mark it used."""
        with Session(engine) as session:
            try:
                kind, version_id = queries.find_by_uri(session, uri)
            except BadURI as exc:
                return _error(400, "bad_request", str(exc))
            if kind != "version":
                return _error(400, "bad_request", "expected dataset://<name>/<version>")
            row = queries.get_version(session, version_id)
            target = Target("version", row.dataset.name, row.name)
        touch_last_used(engine, target)
        with Session(engine) as session:
            return queries.version_json(session, queries.get_version(session, version_id))


def _mark_used(engine: Engine, uris: tuple[str, ...]) -> None:
    """`valohai.last-used` on the versions an event names as inputs (unknown ones are skipped)."""
    for uri in uris:
        try:
            with Session(engine) as session:
                _, version_id = queries.find_by_uri(session, uri)
                row = queries.get_version(session, version_id)
                target = Target("version", row.dataset.name, row.name)
        except (BadURI, NotFound):
            continue
        touch_last_used(engine, target)


def _webhook_routes(
    app: FastAPI, engine: Engine, staging: Staging, enqueue: Sender, secret: str | None
) -> None:
    @app.post(
        "/webhooks/events",
        status_code=202,
        response_model=EventAnswer,
        openapi_extra=_event_body(),
        responses=errors(
            400,
            401,
            403,
            413,
            415,
            503,
            e400="Not JSON, or a required field is missing.",
            e401="Missing or wrong signature, or a stale timestamp (when SIDECAR_WEBHOOK_SECRET is set).",
        ),
    )
    async def events(request: Request) -> JSONResponse:
        """Validate and enqueue, nothing more: the apply happens in the worker."""
        body = await request.body()  # capped while read, before the signature is checked
        problem = _signature_problem(secret, request, body)
        if problem:
            metrics.WEBHOOKS.labels("unauthorized").inc()
            return _error(401, "unauthorized", problem)
        try:
            action = parse_event(orjson.loads(body))
        except orjson.JSONDecodeError as exc:
            metrics.WEBHOOKS.labels("bad_request").inc()
            return _error(400, "bad_request", f"not JSON: {exc}")
        except InvalidEntry as exc:
            metrics.WEBHOOKS.labels("bad_request").inc()
            return _error(400, "bad_request", str(exc))
        metrics.WEBHOOKS.labels("ignored" if action.kind == "ignore" else "accepted").inc()
        if action.kind == "ignore":
            await run_in_threadpool(_mark_used, engine, action.inputs)
            return JSONResponse({"status": "ignored", "type": action.event_type}, status_code=202)
        # Redis calls block: run them off the event loop so one slow Redis stalls one request.
        # The completion goes first: if it fails the answer is a 503 and nothing was written.
        due = await run_in_threadpool(_complete, staging, enqueue, action)
        await run_in_threadpool(_mark_used_or_log, engine, action.inputs)
        await run_in_threadpool(_record_platform_ids_or_log, engine, action)
        return JSONResponse({"status": "accepted", "type": action.event_type, "due": due}, status_code=202)


def _signature_problem(secret: str | None, request: Request, body: bytes) -> str | None:
    if not secret:
        return None
    headers = request.headers
    return signature_problem(
        secret, headers.get("x-sidecar-timestamp"), headers.get("x-sidecar-signature"), body, time.time()
    )


def _mark_used_or_log(engine: Engine, uris: tuple[str, ...]) -> None:
    """After a completion was accepted, a failed `valohai.last-used` touch must not turn the
    answer into an error (the completion stands, and would be applied anyway)."""
    try:
        _mark_used(engine, uris)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        log.warning("could not mark %d input versions used: %s", len(uris), exc)


def _record_platform_ids_or_log(engine: Engine, action: Action) -> None:
    """The platform's ids and tags of an announced version; like last-used, an extra that must
    not turn an accepted completion into an error."""
    if action.target is None or action.platform is None:
        return
    try:
        record_platform_ids(engine, action.target, action.platform)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        log.warning("could not keep the platform ids of %s: %s", action.target.key, exc)


def _complete(staging: Staging, enqueue: Sender, action: Action) -> list[str]:
    """Mark the version or execution complete and send the applies (the due set keeps them if not)."""
    if action.target is not None:
        due = staging.complete_version(action.target)
    else:
        due = staging.complete_execution(action.execution)
    metrics.VERSIONS_COMPLETED.labels(action.kind).inc()
    try:
        enqueue.many(due)  # an execution's completion may make thousands due: sent in batches
    except Exception as exc:  # the broker is down: the watcher's sweep sends a drain
        log.warning("could not enqueue applies of %d targets (%s); the sweep will retry", len(due), exc)
    return due


def _read_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/api/v0/datasets/", response_model=Page[Dataset], responses=errors(*API_ERRORS, 400))
    def list_datasets(
        request: Request,
        name: str | None = None,
        filter: Filter = None,
        ordering: Ordering = None,
        limit: Limit = 100,
        offset: Offset = 0,
        count: CountMode = None,
        cursor: Cursor = None,
    ) -> Any:
        """Datasets; `filter` takes the filter language, `ordering` a field (`id`, `name`, `ctime`,
        `mtime`) or a property (`properties.<key>`), `-` first for descending."""
        after = _cursor(cursor)
        ask = queries.ListQuery(
            name=name, filter=filter, ordering=ordering, limit=limit, offset=offset,
            exact_count=count == "exact", after=after,
        )  # fmt: skip
        with Session(engine) as session:
            listed = queries.list_dataset_ids(session, ask)
            found = {
                r.id: r for r in session.scalars(select(DatasetRow).where(DatasetRow.id.in_(listed.rows)))
            }
            rows = [found[i] for i in listed.rows]
            return _listed(request, listed, limit, offset, queries.datasets_json(session, rows))

    @app.post(
        "/api/v0/datasets/",
        status_code=201,
        response_model=Dataset,
        openapi_extra=_json_body(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,255}$"}},
                "required": ["name"],
            }
        ),
        responses=errors(
            *WRITE_ERRORS,
            409,
            e400="Not JSON, no `name`, or a name a URI cannot hold.",
            e409="The name is taken.",
        ),
    )
    async def create_dataset(request: Request) -> JSONResponse:
        """Create a dataset by name (a sidecar line naming it does the same); answers it with its id."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"not JSON: {exc}")
        name = body.get("name") if isinstance(body, dict) else None
        try:
            row_id, created = await run_in_threadpool(writes.create_dataset, engine, name)
        except BadURI as exc:
            return _error(400, "bad_request", f"name: {exc}")
        with Session(engine) as session:
            shown = queries.datasets_json(session, [queries.get_dataset(session, row_id)])[0]
        if not created:
            body = {"error": "exists", "detail": f"a dataset named {name!r} exists", "id": shown["id"]}
            return JSONResponse(body, status_code=409)
        return JSONResponse(shown, status_code=201)

    @app.get("/api/v0/datasets/{dataset_id}/", response_model=Dataset, responses=errors(*API_ERRORS, 404))
    @app.get("/api/v0/datasets/{dataset_id}", include_in_schema=False)
    def get_dataset(dataset_id: OwnerId) -> Any:
        """One dataset, by its id, the platform's id for it, or an old integer id."""
        with Session(engine) as session:
            return queries.datasets_json(session, [queries.get_dataset(session, dataset_id)])[0]

    @app.get("/api/v0/dataset-versions/", response_model=Page[Version], responses=errors(*API_ERRORS, 400))
    def list_versions(
        request: Request,
        dataset: str | None = None,
        name: str | None = None,
        filter: Filter = None,
        ordering: Ordering = None,
        limit: Limit = 100,
        offset: Offset = 0,
        count: CountMode = None,
        cursor: Cursor = None,
    ) -> Any:
        """Versions (`dataset`: a dataset's id or name); `filter` and `ordering` as for datasets.
        Each carries its first 100 files and `files_count`; the detail carries them all."""
        after = _cursor(cursor)
        ask = queries.ListQuery(
            name=name, dataset=dataset, filter=filter, ordering=ordering, limit=limit, offset=offset,
            exact_count=count == "exact", after=after,
        )  # fmt: skip
        with Session(engine) as session:
            listed = queries.list_version_ids(session, ask)
            return _listed(request, listed, limit, offset, queries.versions_page_json(session, listed.rows))

    @app.get(
        "/api/v0/dataset-versions/{version_id}/",
        response_model=Version,
        responses=errors(*API_ERRORS, 400, 404),
    )
    @app.get("/api/v0/dataset-versions/{version_id}", include_in_schema=False)
    def get_version(
        version_id: OwnerId, files_limit: FilesLimit = FILES_PAGE, files_offset: Offset = 0
    ) -> Any:
        """One version with its files (`files_limit` at a time from `files_offset`, `files_count`
        in all)."""
        with Session(engine) as session:
            row = queries.get_version(session, version_id)
            return queries.version_json(session, row, files_limit=files_limit, files_offset=files_offset)


# A datum's id in a path: its public id (or an old integer id); any other text names nothing (404).
DatumId = Annotated[str, FastAPIPath(description="the datum's public id (an integer id works too)")]
DATUM_404 = "No such datum."


def _datum_routes(app: FastAPI, engine: Engine) -> None:
    """`/api/v0/data/...` and `/api/v0/datum-aliases/...`: files of executions, their properties,
    tags and aliases. Clients send `exclude`, `purged`, `deleted`, `no_count` and `project`
    too: accepted and ignored, as every unknown query parameter is."""

    @app.get("/api/v0/data/", response_model=Page[Datum], responses=errors(*API_ERRORS, 400))
    def list_data(
        request: Request,
        output_execution: str | None = None,
        name: str | None = None,
        tag: str | None = None,
        filter: Filter = None,
        ordering: DatumOrdering = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> Any:
        """Datums; `output_execution` = the files one execution produced; `name` = a path;
        `tag` = one of its `valohai.tags`; `filter` over its properties."""
        ask = datums.DatumQuery(
            execution=output_execution,
            name=name,
            tag=tag,
            filter=filter,
            ordering=ordering,
            limit=limit,
            offset=offset,
        )
        with Session(engine) as session:
            count, rows = datums.list_datums(session, ask)
            return _page(request, count, limit, offset, datums.datums_json(session, rows))

    for path, shown in (("/api/v0/data/{datum_id}/", True), ("/api/v0/data/{datum_id}", False)):
        app.add_api_route(
            path,
            _get_datum(engine),
            methods=["GET"],
            response_model=Datum,
            include_in_schema=shown,
            name="get_datum" if shown else "get_datum_no_slash",
            responses=errors(*API_ERRORS, 404, e404=DATUM_404),
        )

    @app.get(
        "/api/v0/data/{datum_id}/download/",
        response_model=Download,
        responses=errors(*API_ERRORS, 404, e404=DATUM_404),
    )
    def download_datum(datum_id: DatumId) -> dict[str, Any]:
        """The sidecar keeps properties, not files: the answer says so, with a null `url`."""
        with Session(engine) as session:
            row = datums.get_datum(session, datum_id)
            where = f"{row.execution}/{row.path}"
        return {"url": None, "detail": f"no download here: the file is {where} under the runner's root"}

    @app.get(
        "/api/v0/data/{datum_id}/metadata/",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 404, e404=DATUM_404),
    )
    def get_datum_metadata(datum_id: DatumId) -> dict[str, Any]:
        """The datum's whole property set (`valohai.tags` and `valohai.alias` included)."""
        with Session(engine) as session:
            return dict(datums.get_datum(session, datum_id).properties or {})

    @app.get(
        "/api/v0/data/{datum_id}/history/",
        response_model=Page[Change],
        responses=errors(*API_ERRORS, 400, 404, e404=DATUM_404),
    )
    def datum_history(request: Request, datum_id: DatumId, limit: Limit = 100, offset: Offset = 0) -> Any:
        """Every change to the datum's properties, oldest first, with its source."""
        with Session(engine) as session:
            row = datums.get_datum(session, datum_id)
            count, rows = queries.history(session, "datum", row.id, limit=limit, offset=offset)
        return _page(request, count, limit, offset, rows)


def _datum_write_routes(app: FastAPI, engine: Engine, staging: Staging) -> None:
    """Datum properties set through the API, one datum or many (see `store/datums.py` for when
    a write is applied)."""

    @app.post(
        "/api/v0/data/metadata/apply/",
        response_model=DatumWrite,
        openapi_extra=_json_body(_bulk_datum_schema()),
        responses=errors(
            *WRITE_ERRORS,
            e400="Not JSON, no `datum_metadata` object, or a datum's set breaks a rule (named).",
            e404="A datum id names nothing (the first one is named); nothing was written.",
        ),
    )
    async def apply_data_metadata(request: Request) -> JSONResponse:
        """Set properties of many datums: `{"datum_metadata": {"<datum id>": {...}}}`. Every set is
        checked and every id looked up before anything is written; then each datum is written
        in turn (one transaction each)."""
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"not JSON: {exc}")
        sets = payload.get("datum_metadata") if isinstance(payload, dict) else None
        if not isinstance(sets, dict):
            return _error(400, "bad_request", 'expected {"datum_metadata": {"<datum id>": {...}}}')
        try:
            result = await run_in_threadpool(_write_many, engine, staging, sets)
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        return JSONResponse(result)

    @app.post(
        "/api/v0/data/{datum_id}/metadata/",
        response_model=dict[str, Any],
        openapi_extra=_json_body(datum_properties_schema()),
        responses=errors(
            *WRITE_ERRORS,
            also={202: {"model": dict[str, Any], "description": "Its execution is still running: staged."}},
            e400="Not JSON, not an object, a `valohai.` key other than tags and alias, a bad key or depth.",
            e404=DATUM_404,
        ),
    )
    async def set_datum_metadata(datum_id: DatumId, request: Request) -> JSONResponse:
        """Set each key (null deletes); `valohai.tags` (strings) and `valohai.alias` allowed."""
        body = await request.body()
        try:
            payload = orjson.loads(body)
            write = write_datum_properties
            result = await run_in_threadpool(write, engine, staging, datum_id, payload)
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"not JSON: {exc}")
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        if result.staged:
            return JSONResponse(result.properties, status_code=202, headers={"X-Sidecar-Staged": "true"})
        return JSONResponse(result.properties)


ExecutionId = Annotated[
    str, FastAPIPath(min_length=1, max_length=255, description="an execution's id, or a rollback's")
]


def _rollback_route(app: FastAPI, engine: Engine, staging: Staging) -> None:
    @app.post(
        "/api/v0/executions/{execution_id}/rollback/",
        response_model=Rollback,
        openapi_extra={
            "requestBody": {
                # Required in the description: without a body a client sends no content type,
                # and the edge refuses a write without one (415). An empty body is accepted.
                "required": True,
                "description": "an empty object (a write needs `Content-Type: application/json`)",
                "content": {"application/json": {"schema": {"type": "object", "maxProperties": 0}}},
            }
        },
        responses=errors(
            *WRITE_ERRORS,
            e400="The body is not empty, or not a JSON object.",
            e404="Nothing knows this execution or rollback; nothing was written.",
        ),
    )
    async def rollback_execution(execution_id: ExecutionId, request: Request, dry_run: bool = False) -> Any:
        """Revert every property change the execution's lines made (or a rollback made: that
        undoes it), unless another source changed the key later (a conflict, left as it is).
        `dry_run=true` answers what would be done and changes nothing. Datum membership of
        completed versions is not touched; changes still staged (a version building, an execution
        running) are not in the history and are not rolled back."""
        body = await request.body()
        if body.strip():
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return _error(400, "bad_request", f"not JSON: {exc}")
            if payload != {}:
                return _error(400, "bad_request", "the body must be empty or {}")
        result = await run_in_threadpool(roll_back, engine, staging, execution_id, dry_run=dry_run)
        return rollback_json(result)


def _datum_alias_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/api/v0/datum-aliases/", response_model=Page[DatumAlias], responses=errors(*API_ERRORS, 400))
    def list_datum_aliases(request: Request, limit: Limit = 100, offset: Offset = 0) -> Any:
        """Datum aliases by name, each with the datum it points at now."""
        with Session(engine) as session:
            count, rows = datums.list_aliases(session, limit=limit, offset=offset)
        return _page(request, count, limit, offset, rows)

    @app.get(
        "/api/v0/datum-aliases/resolve/",
        response_model=ResolvedDatum,
        responses=errors(*API_ERRORS, 400, 404, e404="No alias of that name."),
    )
    def resolve_datum_alias(name: Annotated[str, Query(min_length=1)]) -> Any:
        """The datum `datum://<name>` points at now."""
        with Session(engine) as session:
            return {"datum": datums.one_json(session, datums.resolve_alias(session, name))}


def _get_datum(engine: Engine) -> Callable[[str], Any]:
    def get_datum(datum_id: DatumId) -> Any:
        """One datum."""
        with Session(engine) as session:
            return datums.one_json(session, datums.get_datum(session, datum_id))

    return get_datum


def _write_many(engine: Engine, staging: Staging, sets: dict[str, Any]) -> dict[str, Any]:
    """The bulk write: every id found and every set checked first, then one write per datum."""
    with Session(engine) as session:
        for ident in sets:
            datums.get_datum(session, ident)  # NotFound (404) before anything is written
    for ident, metadata in sets.items():
        try:
            datums.check_datum_write(metadata)
            definitions.refuse_rejected(engine, "datum", metadata)
        except InvalidEntry as exc:
            raise InvalidEntry(f"datum {ident[:100]!r}: {exc}", exc.key) from None
    answer: dict[str, Any] = {"datum_metadata": {}, "staged": []}
    for ident, metadata in sets.items():
        result = write_datum_properties(engine, staging, ident, metadata)
        answer["datum_metadata"][ident] = result.properties
        if result.staged:
            answer["staged"].append(ident)
    return answer


def _bulk_datum_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "datum_metadata": {"type": "object", "additionalProperties": datum_properties_schema()}
        },
        "required": ["datum_metadata"],
    }


def _properties_body() -> dict[str, Any]:
    """OpenAPI for the metadata body, which the handler reads itself (to check it whole)."""
    return _json_body(properties_schema())


def _event_body() -> dict[str, Any]:
    """OpenAPI for a platform notification (other types are accepted and ignored)."""
    schema = {
        "type": "object",
        "description": "A platform notification: dataset_version_created or execution_completed.",
        "properties": {"type": {"type": "string"}, "data": {"type": "object"}},
        "required": ["type"],
    }
    return _json_body(schema)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return error_response(status, error, detail)


def _page(request: Request, count: int, limit: int, offset: int, results: list[Any]) -> dict[str, Any]:
    """The platform's list shape: count, next, previous, results."""
    url = request.url
    after = offset + limit
    nxt = str(url.include_query_params(limit=limit, offset=after)) if after < count else None
    prev = str(url.include_query_params(limit=limit, offset=max(0, offset - limit))) if offset > 0 else None
    return {"count": count, "count_exact": True, "next": nxt, "previous": prev, "results": results}


def _listed(
    request: Request, listed: queries.Listed, limit: int, offset: int, results: list[Any]
) -> Response:
    """A page of a list whose count may be capped (`count_exact`), encoded here with orjson.

    `next` follows from the rows (one more was read than shown), not from the count, so it
    goes on past a capped count; in the default order (by id) it carries a keyset `cursor`
    besides the offset, and the page after starts at that row, however deep. Returned as bytes:
    validating 1,000 versions against the response model took longer than reading them (the
    model still documents the answer; the tests check the shape)."""
    url = request.url.remove_query_params("cursor")
    after = offset + limit
    nxt = None
    if listed.more:
        nxt = str(url.include_query_params(limit=limit, offset=after))
        if listed.after is not None:
            nxt = str(
                url.include_query_params(limit=limit, offset=after, cursor=_encode_cursor(listed.after))
            )
    prev = str(url.include_query_params(limit=limit, offset=max(0, offset - limit))) if offset > 0 else None
    body = {
        "count": listed.count,
        "count_exact": listed.count_exact,
        "next": nxt,
        "previous": prev,
        "results": results,
    }
    return Response(orjson.dumps(body), media_type="application/json")


def _encode_cursor(after: int) -> str:
    return f"i{after}"


def _cursor(text: str | None) -> int | None:
    """A `cursor` parameter's row key (the parameter's pattern holds only digits after `i`)."""
    return None if text is None else int(text[1:])
