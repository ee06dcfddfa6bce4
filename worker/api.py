"""The HTTP server: webhooks in, properties out (`/api/v0/...`, shaped like the platform's API)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis
import sqlalchemy.exc
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from . import metrics
from .errors import BadURI, InvalidEntry, NotFound
from .query import FilterError
from .staging import Staging
from .store import queries
from .store.writes import current_properties, target_of, touch_last_used, write_properties
from .uris import Target
from .web import mount_web
from .webhooks import Action, parse_event, signature_problem

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]
MAX_LIMIT = 1000
MAX_BODY = 1024 * 1024


def create_app(
    engine: Engine,
    staging: Staging,
    enqueue: Enqueue,
    *,
    webhook_secret: str | None = None,
    api_token: str | None = None,
    watcher_max_age: float = 120.0,
) -> FastAPI:
    """The ASGI app. Read handlers are plain functions (run in a thread pool) over one engine."""
    app = FastAPI(title="Dataset properties sidecar", version="0.1.0")

    @app.exception_handler(FilterError)
    def _bad_filter(_request: Request, exc: FilterError) -> JSONResponse:
        body = {"error": "bad_filter", "detail": str(exc), "position": exc.position, "expected": exc.expected}
        return JSONResponse(body, status_code=400)

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("service unavailable: %s", exc)
        return _error(503, "unavailable", f"{type(exc).__name__}: {exc}")

    @app.exception_handler(NotFound)
    def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)

    _health_routes(app, engine, staging, watcher_max_age)

    if api_token:
        _require_token(app, api_token)
    _webhook_routes(app, engine, staging, enqueue, webhook_secret)
    _resolve_route(app, engine)  # before /dataset-versions/{id}/, which would match "resolve"
    _read_routes(app, engine)
    for kind, base in (("dataset", "datasets"), ("version", "dataset-versions")):
        _metadata_routes(app, engine, staging, kind, base)
    mount_web(app, engine, staging)
    return app


def _health_routes(app: FastAPI, engine: Engine, staging: Staging, watcher_max_age: float) -> None:
    metrics.register_backlog(staging)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz")
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

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _quarantined(staging: Staging) -> dict[str, Any]:
    try:
        held = staging.quarantined()
    except redis.RedisError:
        return {"count": None, "targets": []}
    return {"count": len(held), "targets": sorted(held)[:20]}


def _check_redis(staging: Staging) -> str:
    try:
        staging.redis.ping()
        return "ok"
    except Exception as exc:  # any failure is "not ready", with its reason
        return f"failing: {exc}"


def _check_database(engine: Engine) -> str:
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return "ok"
    except Exception as exc:
        return f"failing: {exc}"


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


def _metadata_routes(app: FastAPI, engine: Engine, staging: Staging, kind: str, base: str) -> None:
    @app.get(f"/api/v0/{base}/{{owner_id}}/metadata/", name=f"get_{kind}_metadata")
    def get_metadata(owner_id: int) -> dict[str, Any]:
        return current_properties(engine, kind, owner_id)

    @app.post(
        f"/api/v0/{base}/{{owner_id}}/metadata/",
        name=f"set_{kind}_metadata",
        openapi_extra=_json_body("Properties to set; a null value deletes the key. Keys 1..256 characters."),
        responses={
            202: {"description": "The version is still building: the write is staged until completion."},
            400: {"description": "Not JSON, not an object, a reserved `valohai.` key, a bad key or depth."},
            404: {"description": "No such dataset or version."},
            413: {"description": "Body over 1 MiB."},
        },
    )
    async def set_metadata(owner_id: int, request: Request) -> JSONResponse:
        """Set each key of the JSON object body; null deletes. Answers the full set after the change."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            return _error(413, "too_large", f"body over {MAX_BODY} bytes")
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(413, "too_large", f"body over {MAX_BODY} bytes")
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

    @app.get(f"/api/v0/{base}/{{owner_id}}/metadata/history/", name=f"{kind}_history")
    def get_history(request: Request, owner_id: int, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        limit, offset = _paging(limit, offset)
        with Session(engine) as session:
            target_of(session, kind, owner_id)  # 404 for an unknown id
            count, rows = queries.history(session, kind, owner_id, limit=limit, offset=offset)
        return _page(request, count, limit, offset, rows)


def _resolve_route(app: FastAPI, engine: Engine) -> None:
    @app.get("/api/v0/dataset-versions/resolve/")
    def resolve_version(uri: str) -> Any:
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
    app: FastAPI, engine: Engine, staging: Staging, enqueue: Enqueue, secret: str | None
) -> None:
    @app.post(
        "/webhooks/events",
        status_code=202,
        openapi_extra=_json_body("A platform notification: dataset_version_created or execution_completed."),
        responses={
            400: {"description": "Not JSON, or a required field is missing."},
            401: {"description": "Missing or wrong signature, or a stale timestamp."},
        },
    )
    async def events(request: Request) -> JSONResponse:
        """Validate and enqueue, nothing more: the apply happens in the worker."""
        body = await request.body()
        if secret:
            problem = signature_problem(
                secret,
                request.headers.get("x-sidecar-timestamp"),
                request.headers.get("x-sidecar-signature"),
                body,
                time.time(),
            )
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
        if action.inputs:
            await run_in_threadpool(_mark_used, engine, action.inputs)
        if action.kind == "ignore":
            return JSONResponse({"status": "ignored", "type": action.event_type}, status_code=202)
        # Redis calls block: run them off the event loop so one slow Redis stalls one request.
        due = await run_in_threadpool(_complete, staging, enqueue, action)
        return JSONResponse({"status": "accepted", "type": action.event_type, "due": due}, status_code=202)


def _complete(staging: Staging, enqueue: Enqueue, action: Action) -> list[str]:
    """Mark the version or execution complete and send the applies (the due set keeps them if not)."""
    if action.target is not None:
        due = staging.complete_version(action.target)
    else:
        due = staging.complete_execution(action.execution)
    metrics.VERSIONS_COMPLETED.labels(action.kind).inc()
    for key in due:
        try:
            enqueue(key)
        except Exception as exc:  # the broker is down: the watcher's sweep re-enqueues
            log.warning("could not enqueue apply of %s (%s); the sweep will retry", key, exc)
    return due


def _read_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/api/v0/datasets/")
    def list_datasets(
        request: Request,
        name: str | None = None,
        filter: str | None = None,
        ordering: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Any:
        """Datasets; `filter` takes the filter language, `ordering` a key (`-key` descending)."""
        limit, offset = _paging(limit, offset)
        ask = queries.ListQuery(name=name, filter=filter, ordering=ordering, limit=limit, offset=offset)
        with Session(engine) as session:
            count, rows = queries.list_datasets(session, ask)
            return _page(request, count, limit, offset, [queries.dataset_json(r) for r in rows])

    @app.get("/api/v0/datasets/{dataset_id}/")
    def get_dataset(dataset_id: int) -> Any:
        with Session(engine) as session:
            return queries.dataset_json(queries.get_dataset(session, dataset_id))

    @app.get("/api/v0/dataset-versions/")
    def list_versions(
        request: Request,
        dataset: str | None = None,
        name: str | None = None,
        filter: str | None = None,
        ordering: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Any:
        """Versions; `filter` takes the filter language, `ordering` a key (`-key` descending)."""
        limit, offset = _paging(limit, offset)
        ask = queries.ListQuery(
            name=name, dataset=dataset, filter=filter, ordering=ordering, limit=limit, offset=offset
        )
        with Session(engine) as session:
            count, rows = queries.list_versions(session, ask)
            results = [queries.version_json(session, r) for r in rows]
            return _page(request, count, limit, offset, results)

    @app.get("/api/v0/dataset-versions/{version_id}/")
    def get_version(version_id: int) -> Any:
        with Session(engine) as session:
            return queries.version_json(session, queries.get_version(session, version_id))


def _json_body(description: str) -> dict[str, Any]:
    """OpenAPI for a JSON object body that the handler reads itself (to bound and check it)."""
    schema = {"type": "object", "additionalProperties": True, "description": description}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _paging(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(limit, MAX_LIMIT)), max(0, offset)


def _page(request: Request, count: int, limit: int, offset: int, results: list[Any]) -> dict[str, Any]:
    """The platform's list shape: count, next, previous, results."""
    url = request.url
    after = offset + limit
    nxt = str(url.include_query_params(limit=limit, offset=after)) if after < count else None
    prev = str(url.include_query_params(limit=limit, offset=max(0, offset - limit))) if offset > 0 else None
    return {"count": count, "next": nxt, "previous": prev, "results": results}
