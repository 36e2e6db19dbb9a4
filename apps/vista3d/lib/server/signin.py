"""Signing in: a same-origin page for the bundled OHIF (session cookie) and MONAI Label's ``/auth`` contract.

OHIF's MONAI Label panel sends no credentials of its own, but its requests are same-origin, so a
cookie set by this page reaches the server with each of them. The cookie is HttpOnly (page scripts
cannot read it) and SameSite=Strict (other sites' pages cannot make the browser send it).
3D Slicer's module and MONAI Label's client call ``GET /auth/``, ``POST /auth/token`` (form:
username, password) and ``GET /auth/token/valid``, then send ``Authorization: bearer <token>``.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from .auth import Authenticator, Identity, SignInError
from .edge import COOKIE
from .users import Role

__all__ = ["sign_in_router"]

_PAGE = Template((Path(__file__).parent / "signin.html").read_text())
DEFAULT_NEXT = "/ohif/"


def _safe_next(target: str) -> str:
    """Only paths on this server: ``//evil.example`` or ``https://...`` would send the user elsewhere."""
    if target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return DEFAULT_NEXT


def _page(target: str, error: str = "", status: int = 200) -> HTMLResponse:
    body = _PAGE.substitute(next=html.escape(_safe_next(target)), error=html.escape(error))
    return HTMLResponse(body, status_code=status, headers={"cache-control": "no-store"})


def _user_json(identity: Identity) -> dict[str, Any]:
    roles = [r.label for r in Role if identity.role is not None and r <= identity.role]
    return {"username": identity.name, "name": identity.name, "email": None, "roles": roles}


def sign_in_router(auth: Authenticator) -> APIRouter:
    router = APIRouter()

    @router.get("/signin", include_in_schema=False)
    async def page(next: str = DEFAULT_NEXT) -> HTMLResponse:
        return _page(next)

    @router.post("/signin", include_in_schema=False)
    def sign_in(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = DEFAULT_NEXT,
    ) -> Response:
        try:
            _, token = auth.sign_in(username, password)
        except SignInError as e:
            status = 429 if e.retry_after else 401
            return _page(next, str(e), status)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(auth.issuer.lifetime_s),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/signout", include_in_schema=False)
    async def sign_out() -> Response:
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @router.get("/auth/", summary="Whether sign-in is required (MONAI Label's contract)")
    async def enabled() -> dict[str, Any]:
        return {"enabled": auth.enabled, "client_id": "vista3d", "realm": None}

    @router.post("/auth/token", summary="A signed, expiring token for a user name and password")
    def token(username: Annotated[str, Form(min_length=1)], password: Annotated[str, Form(min_length=1)]) -> Response:
        if not auth.enabled:
            return JSONResponse({"access_token": None, "token_type": None})
        try:
            _, access_token = auth.sign_in(username, password)
        except SignInError as e:
            headers = {"retry-after": str(e.retry_after)} if e.retry_after else {"www-authenticate": "Bearer"}
            return JSONResponse({"detail": str(e)}, status_code=429 if e.retry_after else 401, headers=headers)
        return JSONResponse(
            {"access_token": access_token, "token_type": "bearer", "expires_in": int(auth.issuer.lifetime_s)}
        )

    @router.get("/auth/token/valid", summary="The signed-in user, if the token is valid")
    async def valid(request: Request) -> dict[str, Any]:
        return _user_json(request.state.identity)

    return router
