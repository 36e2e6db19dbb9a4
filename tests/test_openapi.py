"""The OpenAPI document as built (no server): every operation completed from the tables, errors with one body.

The document is the application's own, built in another process (the app is made at import, as in
test_access.py); Schemathesis checks it against the running server in test_openapi_contract.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lib.data.datastore import DatastoreError, check_plain_name
from lib.server.access import RULES, allowed_methods, find_rule
from lib.server.logs_route import LOGPAGE_CSP, PAGE
from lib.server.openapi import OPERATIONS, PLAIN_NAME

from .conftest import APP_DIR

DOCUMENTS_SCRIPT = """
import json, sys
from monailabel.config import settings
settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = sys.argv[1], sys.argv[2]
settings.MONAI_LABEL_APP_CONF = {"users": sys.argv[3], "auth": "on"}
from lib.server import asgi
on = asgi.app.openapi()
settings.MONAI_LABEL_APP_CONF = {"users": sys.argv[3], "auth": "off"}
print(json.dumps([on, asgi.create_app().openapi()]))
"""


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """The document with sign-in on, and off."""
    tmp = tmp_path_factory.mktemp("openapi")
    out = subprocess.run(
        [sys.executable, "-c", DOCUMENTS_SCRIPT, str(APP_DIR), str(tmp), str(tmp / "users.json")],
        env={"PYTHONPATH": str(APP_DIR), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        check=True,
    )
    on, off = json.loads(out.stdout.strip().splitlines()[-1])
    return on, off


@pytest.fixture(scope="module")
def signed_in(documents: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return documents[0]


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items()]


def test_every_table_row_is_an_operation(signed_in: dict[str, Any]) -> None:
    served = {(m, p) for m, p, _ in operations(signed_in)}
    assert set(OPERATIONS) <= served, set(OPERATIONS) - served


def test_errors_have_one_body_and_roles_their_answers(signed_in: dict[str, Any]) -> None:
    for method, path, op in operations(signed_in):
        rule = find_rule(method, path)
        assert rule is not None
        for status, response in op["responses"].items():
            if status.startswith("4") or status.startswith("5"):
                schema = response["content"]["application/json"]["schema"]
                assert schema.get("$ref") == "#/components/schemas/Error" or status == "422", (method, path, status)
        if (method, path) != ("POST", "/auth/token"):  # public, and 401 for a wrong password
            assert ("401" in op["responses"]) == (rule.role is not None), (method, path)
        assert op["security"] == ([] if rule.role is None else [{"bearer": []}, {"session": []}])
        assert not {p["name"] for p in op.get("parameters", [])} & {"token", "session_id"}, (method, path)


def test_what_the_issue_found_is_declared(signed_in: dict[str, Any]) -> None:
    paths = signed_in["paths"]
    assert "404" in paths["/datastore/dataset"]["get"]["responses"]
    assert "404" in paths["/logs/gpu"]["get"]["responses"]
    infer = paths["/infer/{model}"]["post"]
    assert {"400", "404", "409", "422", "429", "503"} <= set(infer["responses"])
    image = next(p for p in infer["parameters"] if p["name"] == "image")
    assert image["required"] is True
    body = infer["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["label"] == {**body["schema"]["properties"]["label"], "format": "binary"}
    assert "file" not in body["schema"]["properties"]
    assert body["encoding"]["params"]["contentType"] == "application/json"
    logs = paths["/logs/"]["get"]["responses"]["200"]["content"]
    assert set(logs) == {"text/html", "text/plain"}
    upload = paths["/datastore/image"]["put"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["format"] == "binary" and upload["required"] == ["file"]


def test_without_sign_in_the_document_asks_for_none(documents: tuple[dict[str, Any], dict[str, Any]]) -> None:
    doc = documents[1]
    assert "securitySchemes" not in doc.get("components", {})
    for method, path, op in operations(doc):
        assert op["security"] == [], (method, path)
        assert "401" not in op["responses"] or (method, path) == ("POST", "/auth/token"), (method, path)


@pytest.mark.parametrize(
    "name", ["tiny", "STS_001_ct", "a.b", "a.", "a-_.x", "a..b", "../x", ".hidden", "-x", "a/b", "", "x" * 129, "é"]
)
def test_plain_name_pattern_is_the_servers_rule(name: str) -> None:
    import re

    by_schema = re.fullmatch(PLAIN_NAME["pattern"], name) is not None and len(name) <= PLAIN_NAME["maxLength"]
    try:
        check_plain_name(name, "id")
        by_server = True
    except DatastoreError:
        by_server = False
    assert by_schema == by_server


def test_undeclared_methods_on_known_paths_are_405() -> None:
    assert allowed_methods("/datastore/image") == ["DELETE", "GET", "HEAD", "PUT"]
    assert allowed_methods("/info") == ["GET"]
    assert allowed_methods("/no/such/path") == []
    assert all(allowed_methods(rule.path) for rule in RULES)


def test_log_page_loads_nothing_from_elsewhere() -> None:
    page = PAGE.format(lines=300, refresh="")
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert "default-src 'none'" in LOGPAGE_CSP and "connect-src 'self'" in LOGPAGE_CSP
