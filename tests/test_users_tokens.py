"""The user store (scrypt hashes, roles, live reload), sign-in tokens (HS256 only) and tools/users.py."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from lib.server.auth import ANONYMOUS, Authenticator, SignInError
from lib.server.tokens import ALGORITHMS, TokenError, TokenIssuer
from lib.server.users import Role, UserError, UserStore, verify_password

from .conftest import ROOT

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    store = UserStore(tmp_path / "users.json")
    store.add("alice", Role.ANNOTATOR, PASSWORD)
    return store


def test_passwords_are_stored_as_scrypt_hashes_only(store: UserStore) -> None:
    text = store.path.read_text()
    assert PASSWORD not in text
    stored = json.loads(text)["users"]["alice"]["password"]
    assert stored.startswith("scrypt$15$8$1$")
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "!", stored)
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"


def test_store_checks_names_passwords_and_duplicates(store: UserStore) -> None:
    with pytest.raises(UserError, match="user names are"):
        store.add("../evil", Role.USER, PASSWORD)
    with pytest.raises(UserError, match="at least 8 characters"):
        store.add("bob", Role.USER, "short")
    with pytest.raises(UserError, match="exists already"):
        store.add("alice", Role.USER, PASSWORD)
    with pytest.raises(UserError, match="role must be one of"):
        Role.parse("superuser")


def test_a_running_reader_sees_changes_on_disk(store: UserStore) -> None:
    reader = UserStore(store.path)  # the server's instance; the writer is tools/users.py
    assert reader.get("alice") is not None and reader.get("alice").role == Role.ANNOTATOR  # type: ignore[union-attr]
    store.set_role("alice", Role.ADMIN)
    assert reader.get("alice").role == Role.ADMIN  # type: ignore[union-attr]
    store.remove("alice")
    assert reader.get("alice") is None and len(reader) == 0


def test_tokens_name_their_user_and_expire(tmp_path: Path) -> None:
    issuer = TokenIssuer.from_key_file(tmp_path / "key", lifetime_s=60)
    assert oct((tmp_path / "key").stat().st_mode & 0o777) == "0o600"
    claims = issuer.verify(issuer.issue("alice", 3))
    assert claims.name == "alice" and claims.generation == 3
    assert TokenIssuer.from_key_file(tmp_path / "key", 60).verify(issuer.issue("alice", 1)).name == "alice"
    expired = TokenIssuer.from_key_file(tmp_path / "key", lifetime_s=-1).issue("alice", 1)
    with pytest.raises(TokenError, match="expired"):
        issuer.verify(expired)


def _unsigned(claims: dict) -> str:
    def part(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def test_forged_tokens_are_refused(tmp_path: Path) -> None:
    issuer = TokenIssuer.from_key_file(tmp_path / "key", lifetime_s=60)
    good = jwt.decode(issuer.issue("alice", 1), options={"verify_signature": False})
    forged = [
        _unsigned(good),  # alg none
        jwt.encode(good, "another key of thirty-two bytes!!", algorithm="HS256"),
        jwt.encode(good, (tmp_path / "key").read_bytes(), algorithm="HS512"),  # right key, algorithm not allowed
        jwt.encode({**good, "aud": "someone-else"}, (tmp_path / "key").read_bytes(), algorithm="HS256"),
    ]
    assert ALGORITHMS == ["HS256"]
    for token in forged:
        with pytest.raises(TokenError):
            issuer.verify(token)


def test_authenticator_follows_the_store(store: UserStore, tmp_path: Path) -> None:
    auth = Authenticator(store, TokenIssuer.from_key_file(tmp_path / "key", 60), "auto", network=False)
    assert auth.enabled
    user, token = auth.sign_in("alice", PASSWORD)
    assert auth.identify(token).role == Role.ANNOTATOR and auth.identify(None) == ANONYMOUS
    store.set_password("alice", "a new password")
    with pytest.raises(TokenError, match="password changed"):
        auth.identify(token)
    store.remove("alice")
    assert not auth.enabled, "auto: no user, no sign-in on loopback"
    assert Authenticator(store, auth.issuer, "auto", network=True).enabled, "auto on a network address: always on"


def test_repeated_failures_are_throttled(store: UserStore, tmp_path: Path) -> None:
    auth = Authenticator(store, TokenIssuer.from_key_file(tmp_path / "key", 60), "on", network=False)
    for _ in range(5):
        with pytest.raises(SignInError, match="wrong user name or password"):
            auth.sign_in("alice", "guess")
    with pytest.raises(SignInError, match="too many failed sign-ins") as err:
        auth.sign_in("alice", PASSWORD)
    assert err.value.retry_after is not None and err.value.retry_after > 250


def test_users_tool(tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    tool = [sys.executable, str(ROOT / "tools" / "users.py"), "--studies", str(studies)]
    start = time.time()
    add = [*tool, "add", "carol", "--role", "reviewer"]
    done = subprocess.run(add, input=f"{PASSWORD}\n", text=True, capture_output=True, check=True)
    assert "carol\treviewer" in done.stdout, done.stderr
    done = subprocess.run([*tool, "set-role", "carol", "admin"], text=True, capture_output=True, check=True)
    assert "carol\tadmin" in done.stdout
    refused = subprocess.run([*tool, "add", "dave", "--role", "user"], input="short\n", text=True, capture_output=True)
    assert refused.returncode == 2 and "at least 8 characters" in refused.stderr
    store = UserStore(studies / ".vista3d" / "users.json")
    assert [(u.name, u.role) for u in store.list()] == [("carol", Role.ADMIN)]
    assert store.authenticate("carol", PASSWORD) is not None
    assert time.time() - start < 60
