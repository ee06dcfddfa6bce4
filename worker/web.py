"""Web pages for datasets and versions, served by the API's own server (no build step).

The pages are server-rendered shells (Jinja2) that hold no data: a little vanilla JavaScript
(`static/app.js`) fetches everything from the JSON API, so the pages work the same with the API
token on (the script asks for it once on a 401 and keeps it in `sessionStorage`). A shell only
says which dataset or version it is for; an unknown id answers a 404 page.

One read-only JSON route belongs to the pages and lives under `/api/` (so the token guards it):
the number of entries staged in Redis for a dataset or version after its applied watermark, and
its quarantine record if its applies kept failing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .api_models import OwnerId
from .errors import NotFound
from .staging import RedisError, Staging
from .store import datums, queries
from .store.models import Watermark
from .uris import Target

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STAGED_CAP = 10_000  # count at most this many staged entries (a page needs no exact huge number)
SECURITY_HEADERS = {
    # Scripts and styles only from our own /static/: property values can never run as code.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class Staged:
    """Entries staged for a target and not yet applied: those after its watermark."""

    target: str
    watermark: str | None
    count: int
    capped: bool  # True when there are at least STAGED_CAP (the count stopped there)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "watermark": self.watermark,
            "staged": self.count,
            "capped": self.capped,
        }


def staged_after_watermark(engine: Engine, staging: Staging, target: Target, cap: int = STAGED_CAP) -> Staged:
    """Count the target's stream entries after its applied watermark (read-only, at most `cap`)."""
    with Session(engine) as session:
        watermark = session.scalar(select(Watermark.stream_id).where(Watermark.target == target.key))
    count = sum(1 for _ in islice(staging.read_after(target, watermark), cap))
    return Staged(target.key, watermark, count, count >= cap)


def mount_web(app: FastAPI, engine: Engine, staging: Staging) -> None:
    """Register the pages (`/`, `/dataset-versions/`, `/datasets/<id>/`, `/dataset-versions/<id>/`,
    `/data/<datum id>/`),
    `/static/...` and `/api/web/<datasets|dataset-versions>/<id>/staged/` on `app`."""
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals["static"] = _static_urls()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        context = {"root": request.scope.get("root_path", ""), **context}
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def not_found(request: Request, what: str) -> HTMLResponse:
        return page(request, "404.html", {"title": "Not found", "what": what}, status=404)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def datasets_page(request: Request) -> HTMLResponse:
        """The datasets list: search by filter, choose property columns, page."""
        return page(request, "list.html", {"title": "Datasets", "kind": "datasets"})

    @app.get("/dataset-versions/", response_class=HTMLResponse, include_in_schema=False)
    def versions_page(request: Request) -> HTMLResponse:
        """The versions list: the same, over dataset versions."""
        return page(request, "list.html", {"title": "Dataset versions", "kind": "dataset-versions"})

    @app.get("/datasets/{dataset_id}/", response_class=HTMLResponse, include_in_schema=False)
    def dataset_page(request: Request, dataset_id: str) -> HTMLResponse:
        """One dataset: its properties (editable), versions and history."""
        uid = _public_id(engine, "dataset", dataset_id)
        if uid is None:
            return not_found(request, f"dataset {dataset_id[:100]}")
        context = {"title": "Dataset", "kind": "datasets", "owner_id": uid}
        return page(request, "detail.html", context)

    @app.get("/dataset-versions/{version_id}/", response_class=HTMLResponse, include_in_schema=False)
    def version_page(request: Request, version_id: str) -> HTMLResponse:
        """One version: status, staged entries, properties (editable), files and history."""
        uid = _public_id(engine, "version", version_id)
        if uid is None:
            return not_found(request, f"dataset version {version_id[:100]}")
        context = {"title": "Dataset version", "kind": "dataset-versions", "owner_id": uid}
        return page(request, "detail.html", context)

    @app.get("/data/{datum_id}/", response_class=HTMLResponse, include_in_schema=False)
    def datum_page(request: Request, datum_id: str) -> HTMLResponse:
        """One datum (a file of an execution): size, checksums, tags, alias, properties, history.
        `datum_id` is its public id (what `/api/v0/data/` answers as `id`)."""
        try:
            with Session(engine) as session:
                uid = datums.get_datum(session, datum_id).uid
        except NotFound:
            return not_found(request, f"datum {datum_id[:100]}")
        return page(request, "datum.html", {"title": "File", "owner_id": uid})

    for kind, base in (("dataset", "datasets"), ("version", "dataset-versions")):
        _staged_route(app, engine, staging, kind, base)


def _staged_route(app: FastAPI, engine: Engine, staging: Staging, kind: str, base: str) -> None:
    @app.get(f"/api/web/{base}/{{owner_id}}/staged/", name=f"{kind}_staged", include_in_schema=False)
    def staged(owner_id: OwnerId) -> JSONResponse:
        """Entries staged in Redis for this target after its watermark (not applied yet)."""
        with Session(engine) as session:
            target = _target(session, kind, owner_id)  # NotFound: the app's JSON 404
        try:
            found = staged_after_watermark(engine, staging, target)
            held = staging.quarantined().get(target.key)
        except RedisError as exc:  # Redis down: the page says "unknown", the rest still works
            log.warning("staged count of %s: redis unavailable: %s", target.key, exc)
            return JSONResponse({"error": "unavailable", "detail": "staging area (redis) unavailable"}, 503)
        return JSONResponse({**found.to_json(), "quarantined": held})


def _target(session: Session, kind: str, owner_id: queries.Ref) -> Target:
    if kind == "dataset":
        return Target("dataset", queries.get_dataset(session, owner_id).name)
    row = queries.get_version(session, owner_id)
    return Target("version", row.dataset.name, row.name)


def _public_id(engine: Engine, kind: str, ref: str) -> str | None:
    """The public id of the dataset or version `ref` names (any id form), or None."""
    with Session(engine) as session:
        try:
            row = (
                queries.get_dataset(session, ref) if kind == "dataset" else queries.get_version(session, ref)
            )
        except NotFound:
            return None
        return row.uid


def _static_urls() -> dict[str, str]:
    """`/static/<name>?v=<content hash>` for each static file, so a new release is never stale."""
    urls: dict[str, str] = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
            urls[path.name] = f"/static/{path.name}?v={digest}"
    return urls
