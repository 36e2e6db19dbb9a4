"""The OpenAPI document (``/openapi.json``): FastAPI's, completed with what the edge and the handlers really do.

FastAPI writes the document from the handlers' signatures, MONAI Label's and the edge's own. It
cannot see what happens around and inside them: sign-in and roles (:mod:`.access`), the errors the
handlers raise (:mod:`.errors`), answers that are files or pages, form fields that hold JSON,
parameters a handler will not go without. :func:`contract` adds these from two tables,
:data:`~.access.RULES` (security, 401, 403) and :data:`OPERATIONS` (everything else, per route),
so that generated clients and Schemathesis (``tests/test_openapi_contract.py``) see the contract the
server keeps. Every error answer has one body, ``Error`` (``{"detail": "what is wrong"}``), except
FastAPI's own validation errors (422), whose ``detail`` is a list.

Undeclared methods on a known path get 405 with ``Allow`` (:mod:`.edge`); that is a property of
paths, not of operations, so it is not repeated in each.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..data.datastore import IMAGE_EXTENSIONS, LABEL_EXTENSIONS
from ..prompts import DEFAULT_MAX_POINTS, RESULT_DTYPES, RESULT_EXTENSIONS
from .access import PUBLIC, find_rule
from .edge import COOKIE
from .infer_route import SERVER_KEYS
from .users import Role

__all__ = ["OPERATIONS", "PLAIN_NAME", "Operation", "Part", "contract", "install_contract"]

JSON = "application/json"
BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"

# The JSON Schema spelling of lib.data.datastore.check_plain_name (tests/test_openapi.py holds them together):
# letters, digits, _ . -, starting with a letter or digit, at most 128, never "..".
PLAIN_NAME: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.?$",
    "maxLength": 128,
    "description": "a datastore id or tag: letters, digits, _ . -, starting with a letter or digit; no '/' or '..'",
}
ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "what is wrong, for a person to read"}},
    "required": ["detail"],
}
ERROR = {"$ref": "#/components/schemas/Error"}
VALIDATION_OR_ERROR = {"anyOf": [{"$ref": "#/components/schemas/HTTPValidationError"}, ERROR]}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "a token from POST /auth/token"},
    "session": {"type": "apiKey", "in": "cookie", "name": COOKIE, "description": "the cookie POST /signin sets"},
}
HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait, estimated", "schema": {"type": "string"}}},
    502: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    504: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
}
STATUS = {
    400: "Bad request: the detail names the parameter and what was expected",
    401: "Not signed in, or the token is invalid or expired: sign in with POST /auth/token",
    403: "Signed in with a role too low for this route",
    404: "Not found",
    409: "Conflict with the server's state",
    422: "Invalid: a parameter of the wrong type or missing (detail: a list), or content that cannot be read",
    429: "Too many requests: try again after Retry-After seconds",
    503: "Busy: not served in time; try again after Retry-After seconds",
    502: "The image server (DICOMweb) cannot be reached or failed; nothing was changed; retry later",
    504: "The image server (DICOMweb) did not answer in time; nothing was changed; retry later",
    507: "No space left where the server stores data; nothing was written",
}
# Routes that reach the image server when the datastore is DICOMweb (Orthanc, a PACS).
IMAGE_SERVER = {502: "the image server cannot be reached", 504: "the image server did not answer in time"}
# MONAI Label's own sign-in, switched off behind the edge, leaves an optional `token` query parameter on its
# routes that nothing reads (the edge reads tokens from Authorization or the session cookie only).
MONAI_LABEL_LEFTOVERS = frozenset({"token"})


@dataclass(frozen=True)
class Part:
    """A form field as the server reads it: its schema and, where it matters, its OpenAPI encoding."""

    schema: Mapping[str, Any]
    encoding: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Operation:
    """What FastAPI cannot see of one route.

    Attributes:
        errors: status -> when the route answers it (with the ``Error`` body).
        content: the media types of a successful answer.
        query: query parameter -> replacement of FastAPI's ``required`` and ``schema``.
        form: the request's form fields, replacing FastAPI's (sent as ``multipart/form-data``).
        hidden: parameters and fields the handler accepts only to refuse them with a message: left out.
    """

    errors: Mapping[int, str] = field(default_factory=dict)
    content: tuple[str, ...] = (JSON,)
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    form: Mapping[str, Part] | None = None
    hidden: frozenset[str] = frozenset()


def _upload(name: str, extensions: tuple[str, ...], example: str) -> Part:
    """A file field: binary, its file name ending in one of ``extensions``."""
    names = ", ".join(extensions)
    return Part(
        {"type": "string", "format": "binary", "description": f"a 3D volume; its file name ends in {names}"},
        {
            "contentType": f"application/gzip, {BINARY}",
            "headers": {
                "Content-Disposition": {
                    "description": f"the part's filename ends in {names} (it gives the format)",
                    "schema": {"type": "string"},
                    "example": f'form-data; name="{name}"; filename="{example}"',
                }
            },
        },
    )


def _json_field(schema: Mapping[str, Any], description: str) -> Part:
    return Part({"type": "object", "description": description, **schema}, {"contentType": JSON})


POINT = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "maxItems": 3}
POINTS = {"type": "array", "items": POINT, "maxItems": DEFAULT_MAX_POINTS}
# What parse_prompt and parse_output read (docs/rest-api.md); other keys are kept with the request, unread.
INFER_PARAMS = {
    "properties": {
        "label_prompt": {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 254}, {"type": "string", "minLength": 1}]},
            "description": "class ids or names (a new name: zero-shot)",
        },
        "points": {**POINTS, "description": "clicks, voxel indices of the image"},
        "point_labels": {"type": "array", "items": {"enum": [0, 1]}, "description": "1 positive, 0 negative"},
        "label": {"type": "string", "description": "3D Slicer: the label's name"},
        "foreground": {**POINTS, "description": "3D Slicer: positive clicks"},
        "background": {**POINTS, "description": "3D Slicer: negative clicks"},
        "result_extension": {"enum": list(RESULT_EXTENSIONS)},
        "result_dtype": {"enum": list(RESULT_DTYPES)},
        "result_compress": {"type": "boolean"},
        "client_id": {"type": "string", "description": "whose click session, when not signed in"},
        "save_label": {"type": "boolean", "description": "also store the result as a label (annotator)"},
        "label_tag": PLAIN_NAME,
    },
    "propertyNames": {"not": {"enum": sorted(SERVER_KEYS)}},
}
INFO = {"info": _json_field({}, "a JSON object merged into the stored info")}
PARAMS = _json_field({}, "a JSON object stored with the upload")

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/auth/token"): Operation({401: "wrong user name or password", 429: "too many failed sign-ins"}),
    ("POST", "/infer/{model}"): Operation(
        {
            400: "malformed or unsupported prompt, a point outside the image, an id or tag that is not a plain name",
            403: "save_label without the annotator role",
            404: "unknown model or image",
            409: "all zero-shot ids are taken",
            422: "an unreadable image or uploaded label, or a label of another shape",
            429: "too many new zero-shot names this hour",
            503: "the queue is full, or the request waited or ran too long",
            **IMAGE_SERVER,
            507: "no space left to store the result (save_label)",
        },
        content=(JSON, BINARY, MULTIPART),
        query={"image": {"required": True, "schema": PLAIN_NAME}},
        form={
            "params": _json_field(INFER_PARAMS, "the prompt and output options (docs/rest-api.md)"),
            "label": _upload("label", LABEL_EXTENSIONS, "previous.nii.gz"),
        },
        hidden=frozenset({"file", "session_id"}),
    ),
    ("PUT", "/datastore/image"): Operation(
        {
            400: "an id that is not a plain name, a file name without a volume's extension",
            422: "not a readable 3D volume",
            507: "no space left in the datastore: nothing was written",
        },
        query={"image": {"required": False, "schema": PLAIN_NAME}},
        form={"file": _upload("file", IMAGE_EXTENSIONS, "image.nii.gz"), "params": PARAMS},
    ),
    ("PUT", "/datastore/label"): Operation(
        {
            400: "an id or tag that is not a plain name, a file name without a label's extension",
            404: "unknown image",
            422: "not a readable 3D volume, or not on its image's grid",
            **IMAGE_SERVER,
            507: "no space left in the datastore: nothing was written",
        },
        query={"image": {"required": True, "schema": PLAIN_NAME}, "tag": {"required": False, "schema": PLAIN_NAME}},
        form={"label": _upload("label", LABEL_EXTENSIONS, "label.nii.gz"), "params": PARAMS},
    ),
    ("PUT", "/datastore/image/info"): Operation({400: "info is not a JSON object", 404: "unknown image"}, form=INFO),
    ("PUT", "/datastore/label/info"): Operation({400: "info is not a JSON object", 404: "unknown label"}, form=INFO),
    ("GET", "/datastore/image"): Operation({404: "unknown image", **IMAGE_SERVER}, content=(BINARY,)),
    ("HEAD", "/datastore/image"): Operation({404: "unknown image"}),
    ("DELETE", "/datastore/image"): Operation({400: "an id that is not a plain name", 404: "unknown image"}),
    ("GET", "/datastore/image/info"): Operation({404: "unknown image"}),
    ("GET", "/datastore/label"): Operation({404: "unknown label"}, content=(BINARY,)),
    ("HEAD", "/datastore/label"): Operation({404: "unknown label"}),
    ("DELETE", "/datastore/label"): Operation({400: "an id or tag that is not a plain name", 404: "unknown label"}),
    ("GET", "/datastore/label/info"): Operation({404: "unknown label"}),
    ("GET", "/datastore/dataset"): Operation({404: "no image has a final label yet"}, content=("application/zip",)),
    ("POST", "/train/{model}"): Operation(
        {
            404: "unknown model",
            409: "a round holds the training lease (detail: its holder)",
            429: "a training round is running",
        }
    ),
    ("POST", "/scoring/{method}"): Operation({404: "unknown method", 429: "a scoring is running"}),
    ("POST", "/batch/infer/{model}"): Operation({404: "unknown model", 429: "a batch inference is running"}),
    ("POST", "/activelearning/{strategy}"): Operation({404: "unknown strategy"}),
    ("POST", "/model/{model}/rollback"): Operation({404: "unknown model", 409: "no older version to roll back to"}),
    ("GET", "/train/"): Operation({404: "no training has run (or none is running, with check_if_running)"}),
    ("GET", "/scoring/"): Operation({404: "no scoring has run (or none is running, with check_if_running)"}),
    ("GET", "/batch/infer"): Operation({404: "no batch inference has run (or none is running)"}),
    ("GET", "/logs/"): Operation({404: "the server has no log file"}, content=("text/html", "text/plain")),
    ("GET", "/logs/gpu"): Operation({404: "this server has no GPU"}, content=("text/plain",)),
    ("GET", "/dashboard/"): Operation(content=("text/html",)),
    ("GET", "/healthz"): Operation(),  # public (RULES), JSON only, no error of its own: a replica that answers is up
}


def _error_response(status: int, why: str | None) -> dict[str, Any]:
    schema = VALIDATION_OR_ERROR if status == 422 else ERROR
    description = STATUS[status] + (f": {why}" if why else "")
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if status in HEADERS:
        response["headers"] = copy.deepcopy(HEADERS[status])
    return response


def _success_content(media_types: tuple[str, ...], current: Mapping[str, Any]) -> dict[str, Any]:
    content = {}
    for media_type in media_types:
        if media_type == JSON:
            content[JSON] = current.get(JSON, {"schema": {}})
        elif media_type.startswith("text/"):
            content[media_type] = {"schema": {"type": "string"}}
        else:
            content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return content


def _form_body(
    operation: Mapping[str, Any], form: Mapping[str, Part], hidden: frozenset[str], schemas: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``multipart/form-data`` body with ``form``'s fields; FastAPI's other fields kept, hidden ones dropped."""
    media: dict[str, Any] = next(iter(operation.get("requestBody", {}).get("content", {}).values()), {})
    old: dict[str, Any] = media.get("schema", {})
    if "$ref" in old:  # FastAPI's Body_<handler> model
        old = schemas[old["$ref"].rsplit("/", 1)[-1]]
    properties = {k: v for k, v in old.get("properties", {}).items() if k not in hidden}
    properties.update({name: dict(part.schema) for name, part in form.items()})
    required = [name for name in old.get("required", []) if name in properties]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    media = {"schema": schema}
    encoding = {name: dict(part.encoding) for name, part in form.items() if part.encoding is not None}
    if encoding:
        media["encoding"] = encoding
    return {"required": bool(required), "content": {MULTIPART: media}}


def _security(method: str, path: str, operation: dict[str, Any], signed_in: bool) -> None:
    """Security and the 401/403 answers from the role table (none while sign-in is off: everybody may)."""
    rule = find_rule(method, path)
    assert rule is not None, f"{method} {path} is served without a row in lib/server/access.py"
    if rule.role is PUBLIC or not signed_in:
        operation["security"] = []
        return
    operation["security"] = [{"bearer": []}, {"session": []}]
    operation["description"] = (operation.get("description", "") + f"\n\nNeeds the role `{rule.role.label}`.").strip()
    operation["responses"]["401"] = _error_response(401, None)
    if rule.role > Role.USER:
        operation["responses"]["403"] = _error_response(403, f"this route needs {rule.role.label}")


def _complete(method: str, path: str, operation: dict[str, Any], signed_in: bool, schemas: Mapping[str, Any]) -> None:
    spec = OPERATIONS.get((method, path), Operation())
    hidden = spec.hidden | MONAI_LABEL_LEFTOVERS
    parameters = [p for p in operation.get("parameters", []) if p["name"] not in hidden]
    for parameter in parameters:
        if parameter["in"] == "query" and parameter["name"] in spec.query:
            parameter.update(copy.deepcopy(dict(spec.query[parameter["name"]])))
    if parameters:
        operation["parameters"] = parameters
    else:
        operation.pop("parameters", None)
    if spec.form is not None:
        operation["requestBody"] = _form_body(operation, spec.form, hidden, schemas)
    responses = operation.setdefault("responses", {})
    if "requestBody" in operation and 400 not in spec.errors:
        responses["400"] = _error_response(400, "a body that cannot be parsed")  # FastAPI's answer to it
    if not parameters and "requestBody" not in operation and 422 not in spec.errors:
        responses.pop("422", None)  # FastAPI's, for the leftovers dropped above
    success = responses.get("200", {"description": "Successful Response"})
    success["content"] = _success_content(spec.content, success.get("content", {}))
    responses["200"] = success
    for status in list(responses):
        if status != "200":
            responses[status] = _error_response(int(status), spec.errors.get(int(status)))
    for status, why in spec.errors.items():
        responses[str(status)] = _error_response(status, why)
    _security(method, path, operation, signed_in)
    operation["responses"] = dict(sorted(operation["responses"].items()))


def contract(document: dict[str, Any], signed_in: bool) -> dict[str, Any]:
    """``document`` (FastAPI's) completed from :data:`~.access.RULES` and :data:`OPERATIONS`; a new dict."""
    out = copy.deepcopy(document)
    components = out.setdefault("components", {})
    for path, operations in out.get("paths", {}).items():
        for method, operation in operations.items():
            _complete(method.upper(), path, operation, signed_in, components.get("schemas", {}))
    schemas = components.setdefault("schemas", {})
    used = json.dumps(out["paths"])
    for name in [n for n in schemas if n.startswith("Body_") and f'/{n}"' not in used]:
        del schemas[name]  # FastAPI's models of the form bodies replaced above
    schemas["Error"] = ERROR_SCHEMA
    if signed_in:
        components["securitySchemes"] = SECURITY_SCHEMES
    return out


def install_contract(app: FastAPI, signed_in: Callable[[], bool]) -> None:
    """``app.openapi`` answers :func:`contract` of FastAPI's document, for sign-in as it is now (it can change)."""
    cache: dict[bool, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        on = signed_in()
        if on not in cache:
            base = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
            cache[on] = contract(base, on)
        return cache[on]

    app.openapi = openapi  # type: ignore[method-assign]
