"""Who may call what: the one route -> role table, and the check that reads it.

Every route the server answers has a row here; a request matching no row gets 404 before it
reaches any handler, so a route added without a row cannot be called. The access-table test
(tests/test_access.py) is generated from :data:`RULES` and tries every row as anonymous, user,
annotator, reviewer and admin. Roles include the ones below them (admin > reviewer > annotator > user).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from .auth import Identity
from .users import Role

__all__ = ["PUBLIC", "RULES", "Decision", "Rule", "allowed_methods", "decide", "find_rule"]

PUBLIC = None  # a rule's role for routes anybody may call (sign-in, the auth contract)


@dataclass(frozen=True)
class Rule:
    """``method`` + ``path`` (FastAPI syntax: ``{name}`` is one segment, ``{name:path}`` the rest) need ``role``."""

    method: str
    path: str
    role: Role | None
    why: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\{\w+:path\}", ".*", re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}"))
        regex = re.sub(r"\{\w+\}", "[^/]+", regex)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.pattern.match(path) is not None


U, A, AD = Role.USER, Role.ANNOTATOR, Role.ADMIN

RULES: tuple[Rule, ...] = (
    # Signing in (OHIF's page and MONAI Label's /auth contract, which 3D Slicer speaks).
    Rule("GET", "/signin", PUBLIC, "the sign-in page"),
    Rule("POST", "/signin", PUBLIC, "sign in: sets the session cookie"),
    Rule("POST", "/signout", PUBLIC, "sign out: clears the session cookie"),
    Rule("GET", "/auth/", PUBLIC, "whether sign-in is on (Slicer asks first)"),
    Rule("POST", "/auth/token", PUBLIC, "name + password -> token"),
    Rule("GET", "/auth/token/valid", U, "whether a token is valid"),
    Rule("GET", "/favicon.ico", PUBLIC, "the icon"),
    Rule("GET", "/healthz", PUBLIC, "a load balancer's health check: ok, the served model version, the replica"),
    # Reading images and results, and inferring: user.
    Rule("GET", "/", U, "API documentation"),
    Rule("GET", "/docs", U, "API documentation"),
    Rule("GET", "/openapi.json", U, "API schema"),
    Rule("GET", "/static/{path:path}", U, "MONAI Label's static files"),
    Rule("GET", "/ohif/{path:path}", U, "the bundled OHIF viewer"),
    Rule("GET", "/proxy/dicom/{path:path}", U, "DICOMweb reads through the server (OHIF's images)"),
    Rule("GET", "/info/", U, "models, labels, learning status"),
    Rule("GET", "/queue", U, "the inference queue (your requests' positions)"),
    Rule("POST", "/infer/{model}", U, "segmentation"),
    Rule("POST", "/activelearning/{strategy}", U, "the next image to annotate"),
    Rule("GET", "/datastore/", U, "datastore summary"),
    Rule("GET", "/datastore/image", U, "download an image"),
    Rule("HEAD", "/datastore/image", U, "check an image"),
    Rule("GET", "/datastore/image/info", U, "an image's info"),
    Rule("GET", "/datastore/label", U, "download a label"),
    Rule("HEAD", "/datastore/label", U, "check a label"),
    Rule("GET", "/datastore/label/info", U, "a label's info"),
    Rule("GET", "/train/", U, "training status"),
    Rule("GET", "/scoring/", U, "scoring status"),
    Rule("GET", "/batch/infer", U, "batch inference status"),
    Rule("GET", "/dashboard/", U, "the team dashboard (reviewer, admin: everybody's work; others: their own)"),
    Rule("GET", "/dashboard/data", U, "the dashboard's figures as JSON (scoped as the page)"),
    # Saving labels and uploading images: annotator.
    Rule("PUT", "/datastore/image", A, "upload an image"),
    Rule("PUT", "/datastore/image/info", A, "change an image's info"),
    Rule("PUT", "/datastore/label", A, "save a label"),
    Rule("PUT", "/datastore/label/info", A, "change a label's info"),
    Rule("POST", "/scoring/{method}", A, "score the datastore"),
    Rule("POST", "/proxy/dicom/{path:path}", A, "DICOMweb writes through the server (STOW)"),
    # Training, deleting, models, bulk export and logs: admin.
    Rule("DELETE", "/datastore/image", AD, "delete an image and its labels"),
    Rule("DELETE", "/datastore/label", AD, "delete a label"),
    Rule("GET", "/datastore/dataset", AD, "the whole dataset as a zip"),
    Rule("POST", "/train/{model}", AD, "start a training round"),
    Rule("DELETE", "/train/", AD, "stop training"),
    Rule("DELETE", "/scoring/", AD, "stop scoring"),
    Rule("POST", "/batch/infer/{model}", AD, "segment many images"),
    Rule("DELETE", "/batch/infer", AD, "stop batch inference"),
    Rule("POST", "/model/{model}/rollback", AD, "serve the previous learned version"),
    Rule("GET", "/logs/", AD, "the server log"),
    Rule("GET", "/logs/gpu", AD, "nvidia-smi"),
)


def find_rule(method: str, path: str, rules: tuple[Rule, ...] = RULES) -> Rule | None:
    """The row for a request; a missing or extra trailing slash still finds it (the app redirects).

    ``HEAD`` without a row of its own needs what ``GET`` needs (it is a GET without the body).
    """
    alternative = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
    methods = (method, "GET") if method == "HEAD" else (method,)
    for m in methods:
        for candidate in (path, alternative):
            for rule in rules:
                if rule.matches(m, candidate):
                    return rule
    return None


def allowed_methods(path: str, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """The methods the table has for ``path`` (either trailing slash), for a 405's ``Allow``; empty: no such path."""
    alternative = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
    found = {r.method for r in rules for candidate in (path, alternative) if r.pattern.match(candidate)}
    return sorted(found)


class Decision(Enum):
    ALLOW = 200
    SIGN_IN = 401
    FORBIDDEN = 403


def decide(rule: Rule, identity: Identity) -> Decision:
    """Allow, ask to sign in (401), or refuse (403) according to the row."""
    if rule.role is PUBLIC or identity.may(rule.role):
        return Decision.ALLOW
    return Decision.SIGN_IN if identity.role is None else Decision.FORBIDDEN
