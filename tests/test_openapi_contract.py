"""The OpenAPI contract, checked by Schemathesis against the real server behind its edge (sign-in on).

``st run`` with every check (``--checks all``: status codes, content types, headers, response schemas,
schema-valid requests accepted, schema-invalid ones refused, 405 for undeclared methods, auth enforced,
...) and every phase (coverage, fuzzing, stateful), derandomized, a bounded number of examples per
operation, as anonymous, an annotator and an admin. ``tests/schemathesis.toml`` points half of the
generated ids at what the server holds; ``tests/schemathesis_hooks.py`` makes uploads real volumes.

Left out: ``POST /train/{model}``, ``POST /batch/infer/{model}`` and ``POST /scoring/{method}``. With the
model's or a method's real name (which the run sends) each starts a background process that trains,
segments every image or scores the datastore for minutes; their contracts are in the document all the
same, and test_access.py and test_faults.py call them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from .conftest import ABDOMEN_SM, PASSWORD, ROOT, Server, running_server
from .schemathesis_hooks import SHAPE, volume

IDENTITIES = ("anonymous", "annotator", "admin")
EXAMPLES = 8  # per operation and phase (issue 23 ran 25; 15 took 77 s of a 21-minute suite beside a busy process)
RUN_LIMIT_S = 300
LEFT_OUT = r"^/(train/\{model\}|batch/infer/\{model\}|scoring/\{method\})$"


@pytest.fixture(scope="module")
def contract_server(test_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with sign-in on over one small CT (``tiny``, :data:`SHAPE`) with a final label: inference is quick."""
    from lib.server.users import Role, UserStore

    root = tmp_path_factory.mktemp("contract-studies")
    ct = np.asarray(nib.load(str(ABDOMEN_SM)).dataobj)[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(root / "tiny.nii.gz"))
    (root / "labels" / "final").mkdir(parents=True)
    (root / "labels" / "final" / "tiny.nii.gz").write_bytes(volume())
    store = UserStore(root / ".vista3d" / "users.json")
    for role in IDENTITIES[1:]:
        store.add(f"u-{role}", Role.parse(role), PASSWORD)
    log = tmp_path_factory.mktemp("contract-server") / "server.log"
    with running_server(str(root), log, test_weights, conf={"train_trigger": "0"}) as running:
        yield running


def token(server: Server, role: str) -> str:
    response = requests.post(f"{server.url}/auth/token", data={"username": f"u-{role}", "password": PASSWORD})
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def schema_file(contract_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served document (reading it needs a signed-in user), for runs as anybody."""
    headers = {"Authorization": f"Bearer {token(contract_server, 'admin')}"}
    response = requests.get(f"{contract_server.url}/openapi.json", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    path = tmp_path_factory.mktemp("contract") / "openapi.json"
    path.write_text(json.dumps(response.json()))
    return path


def schemathesis(server: Server, schema: Path, identity: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "st"), "--config-file", str(ROOT / "tests" / "schemathesis.toml")]
    cmd += ["run", str(schema), "--url", server.url, "--checks", "all", "--max-examples", str(EXAMPLES)]
    cmd += ["--generation-deterministic", "--workers", "1", "--no-color", "--exclude-path-regex", LEFT_OUT]
    cmd += ["--request-timeout", "120"]
    if identity != "anonymous":
        cmd += ["-H", f"Authorization: Bearer {token(server, identity)}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "apps" / "vista3d")]),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_LIMIT_S, env=env, cwd=cwd)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_schemathesis_finds_no_failure(
    contract_server: Server, schema_file: Path, identity: str, tmp_path: Path
) -> None:
    start = time.monotonic()
    run = schemathesis(contract_server, schema_file, identity, tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"Schemathesis as {identity} (exit {run.returncode}):\n{output[-20000:]}"
    assert "Tested: 33" in output, output[-3000:]  # the 36 operations less the three left out
    assert time.monotonic() - start < RUN_LIMIT_S
