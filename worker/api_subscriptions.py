"""`/api/v0/subscriptions/`: change notifications' subscriptions (list, create, delete; get
and delete by id) and each one's delivery log (`/api/v0/subscriptions/<id>/deliveries/`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .api_models import Deliveries, OwnerId, Subscription, Subscriptions, errors
from .api_params import Offset
from .edge import error_response
from .errors import InvalidEntry
from .notifications import EVENT_TYPES, SECRET_MAX, URL_MAX, URL_PATTERN, checked
from .query import MAX_LENGTH as MAX_FILTER
from .query import FilterError
from .store import outbox, subscriptions

API_ERRORS = (401, 413, 503)
BASE = "/api/v0/subscriptions/"
PAGE = 100
PAGE_MAX = 1000
# What `notifications.checked` takes, as a schema (the fuzzer's valid data must be accepted).
_BODY = {
    "type": "object",
    "properties": {
        "url": {
            "type": "string",
            "maxLength": URL_MAX,
            "pattern": f"^{URL_PATTERN}$",
            "description": "Where events are POSTed: http:// or https:// (redirects are never followed)",
        },
        "events": {"type": "array", "items": {"enum": list(EVENT_TYPES)}, "minItems": 1},
        "filter": {
            "type": "string",
            "format": "sidecar-filter",
            "maxLength": MAX_FILTER,
            "pattern": "^[^\\x00]*$",  # PostgreSQL's text cannot hold U+0000
            "description": "Only targets matching it, as the list endpoints' `filter`; a bad one is a 400",
        },
        "secret": {
            "type": "string",
            "minLength": 1,
            "maxLength": SECRET_MAX,
            "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]+$",
            "description": "Signs each event (X-Sidecar-Signature); never shown again",
        },
    },
    "required": ["url", "events", "secret"],
    "additionalProperties": False,
}
Limit = Annotated[int, Query(ge=1, le=PAGE_MAX)]


def subscription_routes(app: FastAPI, engine: Engine) -> None:
    """Register the subscription routes on `app`."""

    @app.get(BASE, response_model=Subscriptions, responses=errors(*API_ERRORS))
    def list_subscriptions() -> dict[str, Any]:
        """Every subscription, oldest first (secrets are never shown)."""
        found = subscriptions.listed(engine)
        return {"count": len(found), "next": None, "previous": None, "results": found}

    @app.post(
        BASE,
        status_code=201,
        response_model=Subscription,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _BODY}}}},
        responses=errors(*API_ERRORS, 400, 403, 415),
    )
    async def create_subscription(request: Request) -> JSONResponse:
        """Subscribe `url` to `events` (any of property.changed, version.completed,
        target.quarantined), of the targets matching `filter` (optional), signed with
        `secret`. A URL that is not http(s), or a filter that does not parse (with its
        `position`), is a 400."""
        try:
            fields = checked(orjson.loads(await request.body()))
            if "\x00" in fields["filter"]:
                raise InvalidEntry("filter: no U+0000", "filter")
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"not JSON: {exc}")
        except FilterError:
            raise  # the app's handler: 400 with `position` and `expected`
        except InvalidEntry as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "key": exc.key}, status_code=400)
        found = await run_in_threadpool(subscriptions.create, engine, fields)
        return JSONResponse(found, status_code=201)

    @app.delete(BASE, status_code=204, responses=errors(*API_ERRORS, 403))
    def delete_subscriptions() -> Response:
        """Delete every subscription and their deliveries."""
        subscriptions.remove_all(engine)
        return Response(status_code=204)

    @app.get(f"{BASE}{{subscription_id}}/", response_model=Subscription, responses=errors(*API_ERRORS, 404))
    def get_subscription(subscription_id: OwnerId) -> dict[str, Any]:
        return subscriptions.get(engine, subscription_id)

    @app.delete(f"{BASE}{{subscription_id}}/", status_code=204, responses=errors(*API_ERRORS, 403, 404))
    def delete_subscription(subscription_id: OwnerId) -> Response:
        """Delete the subscription and its deliveries: nothing more is sent to it."""
        subscriptions.remove(engine, subscription_id)
        return Response(status_code=204)

    @app.get(
        f"{BASE}{{subscription_id}}/deliveries/",
        response_model=Deliveries,
        responses=errors(*API_ERRORS, 400, 404),
    )
    def list_deliveries(
        request: Request,
        subscription_id: OwnerId,
        limit: Limit = PAGE,
        offset: Offset = 0,
        status: Literal["pending", "delivered", "failed"] | None = None,
    ) -> dict[str, Any]:
        """The subscription's deliveries, newest first: each event's status, attempts, last
        error and when it is tried next."""
        with Session(engine) as session:
            count, rows = outbox.deliveries_of(session, subscription_id, limit, offset, status)
        after = offset + limit
        more = request.url.include_query_params(offset=after) if after < count else None
        before = request.url.include_query_params(offset=max(0, offset - limit)) if offset else None
        return {
            "count": count,
            "next": str(more) if more else None,
            "previous": str(before) if before else None,
            "results": rows,
        }
