"""The HTTP edge: what every request must pass before a handler sees it.

A browser sends a cross-origin `POST` with `Content-Type: text/plain` and no preflight (a "simple
request"), so with no token and no secret any page the user visits could write properties or
complete versions. Writes therefore need `Content-Type: application/json` (a browser must
preflight that, and we answer no preflight) and, when the browser names an `Origin`, our own
origin or one allowed by `SIDECAR_ALLOWED_ORIGINS`. Bodies are capped while they are read: a
`Content-Length` over the cap is answered here before any byte is read, and Starlette's
`RequestBodyLimitMiddleware` (see `api.create_app`) stops a chunked body past the cap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_BODY = 1024 * 1024
# The request line and headers together: a filter of 4,096 characters, each up to 4 bytes of UTF-8
# and 3 characters per byte once percent-encoded, is 49 KB of query string. The HTTP server's own
# parser refuses a larger head with a bare text/plain 400 before the app sees it (h11's default is
# 16 KiB); raised so that every over-long parameter reaches the app and gets its JSON 400.
MAX_REQUEST_HEAD = 256 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON_MEDIA_TYPE = "application/json"


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    """The one error shape of the API: `{"error": ..., "detail": ...}`."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]` lowercased, without a trailing slash (how browsers send `Origin`)."""
    return origin.strip().rstrip("/").lower()


class WriteGuard:
    """Refuse oversized bodies (413), foreign origins on writes (403) and non-JSON writes (415).

    Runs before routing, so a refused write never reaches a handler and is never applied later.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = (), max_body: int = MAX_BODY) -> None:
        self.app = app
        self.allowed = frozenset(normalize_origin(o) for o in allowed_origins)
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        """The error response for this request, or None when it may go on."""
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return error_response(413, "too_large", f"body over {self.max_body} bytes")
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, scope, headers):
            return error_response(403, "forbidden", f"origin {origin!r} may not write here")
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        # A DELETE carries no body, and no browser sends one cross-origin without a preflight
        # (which is never granted): it needs no content type. The origin check above still holds.
        bodiless_delete = scope["method"] == "DELETE" and length in ("", "0") and not media_type
        if media_type != JSON_MEDIA_TYPE and not bodiless_delete:
            return error_response(
                415, "unsupported_media_type", "writes need 'Content-Type: application/json'"
            )
        return None

    def origin_allowed(self, origin: str, scope: Scope, headers: Headers) -> bool:
        """Our own origin (scheme and the Host header), or one listed in the settings."""
        given = normalize_origin(origin)
        own = normalize_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
        return given == own or given in self.allowed


def is_loopback(host: str) -> bool:
    """Whether a bind address only takes connections from this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def exposure_warning(host: str, api_token: str | None) -> str | None:
    """Why serving on `host` without a token is unsafe, or None when it is not."""
    if api_token or is_loopback(host):
        return None
    return (
        f"the HTTP server binds {host}, which is not a loopback address, and SIDECAR_API_TOKEN is "
        "not set: anyone who can reach it can read and write properties"
    )
