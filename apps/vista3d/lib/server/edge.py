"""The access check, once per request, before any handler: identity from token or cookie, then the table.

The resolved :class:`~.auth.Identity` is put in the request's state for the handlers; everything
inward only ever sees a user name.
"""

from __future__ import annotations

import json
import logging
from http.cookies import SimpleCookie
from urllib.parse import quote

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .access import Decision, allowed_methods, decide, find_rule
from .auth import ANONYMOUS, Authenticator, Identity
from .tokens import TokenError

__all__ = ["COOKIE", "AccessMiddleware", "request_token"]

logger = logging.getLogger(__name__)

COOKIE = "vista3d_session"


def request_token(headers: Headers) -> str | None:
    """A bearer token from ``Authorization`` (Slicer, MONAI Label's client), else the session cookie (OHIF)."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except Exception:  # http.cookies raises CookieError and others on malformed headers; then there is no cookie
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


async def _answer(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _redirect_to_sign_in(scope: Scope, send: Send) -> None:
    target = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
    location = f"/signin?next={quote(target, safe='')}"
    headers = [(b"location", location.encode()), (b"content-length", b"0"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


class AccessMiddleware:
    """Answers 404 (no such path), 405 (a path without that method, with ``Allow``), 401 (sign in) or 403 (role too
    low) per :data:`~.access.RULES`."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        rule = find_rule(method, path)
        if rule is None:
            allowed = allowed_methods(path)
            if allowed:
                detail = f"{method} is not allowed on {path}; it allows {', '.join(allowed)}"
                await _answer(send, 405, detail, {"allow": ", ".join(allowed)})
            else:
                await _answer(send, 404, f"{method} {path} is not a route of this server")
            return
        headers = Headers(scope=scope)
        problem = ""
        try:
            identity: Identity = self.auth.identify(request_token(headers))
        except TokenError as e:
            identity, problem = ANONYMOUS, str(e)
        decision = decide(rule, identity)
        if decision is Decision.SIGN_IN:
            if method == "GET" and "text/html" in headers.get("accept", ""):
                await _redirect_to_sign_in(scope, send)
                return
            await _answer(send, 401, problem or "sign in first", {"www-authenticate": "Bearer"})
            return
        if decision is Decision.FORBIDDEN:
            assert rule.role is not None and identity.role is not None
            detail = f"{method} {rule.path} needs the role {rule.role.label}; {identity.name} is {identity.role.label}"
            await _answer(send, 403, detail)
            return
        scope.setdefault("state", {})["identity"] = identity
        await self.app(scope, receive, send)
