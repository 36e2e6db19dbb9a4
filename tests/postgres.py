"""A throw-away PostgreSQL for the state store's tests, and the store fixture over both backends.

Debian's ``postgresql`` package (``make postgres-install``) provides ``initdb`` and ``postgres``; a
module that asks for it gets one server in a temporary folder, on a free loopback port with its
unix socket in that folder, stopped (and the folder removed) when the module ends. Each test gets a
fresh database of its own (each module's fixtures wrap :func:`running_postgres` and
:func:`store_url`). When PostgreSQL is missing the tests that need it fail with the command to
run: a backend test that silently does not run proves nothing. Running as root (a container), the
server runs as the ``postgres`` user, since PostgreSQL refuses root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lib.state import StateStore
from lib.state.sqlite import SQLiteStore

__all__ = ["BACKENDS", "fresh_database", "open_backend", "running_postgres", "store_url"]

BACKENDS = ("sqlite", "postgresql")
PG_USER = "vista"
_databases = itertools.count()


def _pg_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        pytest.fail("POSTGRESQL IS NOT INSTALLED: run `make postgres-install` (apt package postgresql)", pytrace=False)
    return versions[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres_user() -> dict[str, Any]:
    """Popen arguments that drop root (PostgreSQL will not run as root); none for anybody else."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"postgres exited with {proc.returncode}:\n{log.read_text()[-2000:]}", pytrace=False)
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.fail(f"postgres did not accept connections in {timeout_s} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)


@contextmanager
def running_postgres() -> Iterator[str]:
    """A running PostgreSQL in a temporary folder; yields its URL (database ``postgres``)."""
    bin_dir = _pg_bin()
    home = Path(tempfile.mkdtemp(prefix="vista3d-pg-"))
    data, log = home / "data", home / "postgres.log"
    drop = _as_postgres_user()
    if drop:
        shutil.chown(home, "postgres", "postgres")
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"]
    subprocess.run(initdb, check=True, capture_output=True, timeout=120, **drop)
    port = _free_port()
    server = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(home), "-h", "127.0.0.1"]
    server += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(server, stdout=out, stderr=subprocess.STDOUT, **drop)
    url = f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown: ends every backend of the server too
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the test server; its URL."""
    import psycopg

    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """For a ``state_url`` fixture parametrized over :data:`BACKENDS`: a test's fresh store, a SQLite
    file or a new database on the module's PostgreSQL (its ``postgres_server`` fixture)."""
    if request.param == "sqlite":
        return str(tmp_path / "state.db")
    return fresh_database(request.getfixturevalue("postgres_server"))


def open_backend(url: str) -> StateStore:
    """The store at ``url`` (a file path: SQLite), as another process opens it."""
    if url.startswith("postgresql://"):
        from lib.state.postgres import PostgresStore

        return PostgresStore(url)
    return SQLiteStore(url)
