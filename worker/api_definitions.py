"""`/api/v0/property-definitions/`: list, and get, put (create or replace) and delete by key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Path, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from .api_models import errors
from .definitions import ENFORCEMENTS, MAX_ALLOWED, SCOPES, TYPES, parse
from .edge import error_response
from .errors import BadDefinition
from .limits import INT_MAX, INT_MIN, KEY_MAX
from .store import definitions as stored

API_ERRORS = (401, 413, 503)
# Any key, `/` included (`{key:path}`); one that cannot be a key is simply not found.
Key = Annotated[
    str, Path(min_length=1, max_length=KEY_MAX, pattern="^[^\\x00]+$", description="The property key")
]
_PLAIN = {"type": "string", "maxLength": 10_000, "pattern": "^[^\\x00]*$"}


def _value_schema(kind: str | None) -> dict[str, Any]:
    """An allowed value of a definition of type `kind` (None: any type)."""
    bounded = {"minimum": INT_MIN, "maximum": INT_MAX}
    schemas: dict[str, dict[str, Any]] = {
        "string": {"type": "string", "pattern": "^[^\\x00]*$"},
        "number": {"type": "number", **bounded},
        "integer": {"type": "integer", **bounded},
        "boolean": {"type": "boolean"},
        "object": {"not": {}},  # no value of these types can be an allowed value
        "array": {"not": {}},
        "date": {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}]},
    }
    scalar = {"anyOf": [schemas["string"], schemas["number"], schemas["boolean"]]}
    return schemas.get(kind or "", scalar)


def _allowed_schema(kind: str | None) -> dict[str, Any]:
    value = _value_schema(kind)
    described = {
        "type": "object",
        "properties": {"value": value, "description": _PLAIN},
        "required": ["value"],
        "additionalProperties": False,
    }
    return {"type": "array", "maxItems": MAX_ALLOWED, "items": {"anyOf": [described, value]}}


def _body_schema() -> dict[str, Any]:
    """The PUT body. Allowed values must be of the definition's type (`if`/`then` per type)."""
    per_type = [
        {
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"properties": {"allowed_values": _allowed_schema(kind)}},
        }
        for kind in TYPES
    ]
    return {
        "type": "object",
        "properties": {
            "key": {"type": "string", "description": "If given, the URL's key (else a 409)"},
            "scopes": {"type": "array", "items": {"enum": list(SCOPES)}, "minItems": 1},
            "type": {"enum": [*TYPES, None]},
            "allowed_values": _allowed_schema(None),
            "required": {"type": "boolean"},
            "description": _PLAIN,
            "display_name": _PLAIN,
            "enforcement": {"enum": list(ENFORCEMENTS)},
        },
        "additionalProperties": False,
        "allOf": per_type,
    }


def definition_routes(app: FastAPI, engine: Engine, recheck: Callable[[], None]) -> None:
    """Register the property-definition routes on `app`; `recheck` is called after a change
    committed (the re-check then finds the new generation)."""

    @app.get(
        "/api/v0/property-definitions/",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS),
    )
    def list_definitions() -> dict[str, Any]:
        """Every property definition, by key. A key without one is free-form."""
        found = stored.listed(engine)
        return {"count": len(found), "next": None, "previous": None, "results": found}

    @app.get(
        "/api/v0/property-definitions/{key:path}/",
        response_model=dict[str, Any],
        responses=errors(*API_ERRORS, 404),
    )
    def get_definition(key: Key) -> dict[str, Any]:
        return stored.get(engine, key)

    @app.put(
        "/api/v0/property-definitions/{key:path}/",
        response_model=dict[str, Any],
        status_code=200,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": _body_schema()}}}
        },
        responses=errors(
            *API_ERRORS,
            400,
            403,
            404,
            409,
            415,
            e404="The key cannot be a property key (too long, or holding U+0000).",
            e409="The body's `key` is not the URL's.",
            also={201: {"description": "Created"}},
        ),
    )
    async def put_definition(key: Key, request: Request) -> JSONResponse:
        """Create or replace the definition of `key`: `scopes` (any of dataset, version, datum;
        default all), `type`, `allowed_values` (values, or `{value, description}`), `required`,
        `description`, `display_name`, `enforcement` (`warn`, the default, or `reject`). A
        definition that does not parse or contradicts itself is a 400 naming the field."""
        try:
            body = orjson.loads(await request.body())
            if isinstance(body, dict) and isinstance(body.get("key"), str) and body["key"] != key:
                detail = "the body's key is not the URL's"
                return JSONResponse({"error": "conflict", "detail": detail, "field": "key"}, 409)
            definition = parse(body, key)
        except orjson.JSONDecodeError as exc:
            return error_response(400, "bad_request", f"not JSON: {exc}")
        except BadDefinition as exc:
            return JSONResponse({"error": "bad_request", "detail": str(exc), "field": exc.field}, 400)
        shown, created, changed = await run_in_threadpool(stored.put, engine, definition)
        if changed:
            await run_in_threadpool(recheck)
        return JSONResponse(shown, status_code=201 if created else 200)

    @app.delete(
        "/api/v0/property-definitions/{key:path}/",
        status_code=204,
        responses=errors(*API_ERRORS, 403, 404),
    )
    def delete_definition(key: Key) -> Response:
        """Remove the definition: the key is free-form again."""
        stored.remove(engine, key)
        recheck()
        return Response(status_code=204)
