"""A team's users: names, roles and scrypt password hashes in one JSON file.

The file lives in the datastore's state folder (``users.json``, or ``--conf users PATH``) and is
written only by ``tools/users.py`` (temp file + rename, under a file lock), so a running server can
re-read it whenever it changes: a removed user or a changed role counts from the next request on.
Passwords are hashed with scrypt (memory-hard, Python's standard library); they are never stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..atomic import FileVersion, file_version, write_json

__all__ = ["Role", "User", "UserError", "UserStore", "hash_password", "verify_password"]

logger = logging.getLogger(__name__)

# scrypt with N = 2^15, r = 8: 32 MiB per hash, about 0.15 s on one core here.
_SCRYPT_LOG2_N = 15
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8


class Role(IntEnum):
    """MONAI Label's four roles, each including what the ones below it may do."""

    USER = 1
    ANNOTATOR = 2
    REVIEWER = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise UserError(f"role must be one of {[r.label for r in cls]}, got {value!r}") from None


class UserError(ValueError):
    """A user-store request that cannot be done (bad name, short password, unknown user); the message says why."""


@dataclass(frozen=True)
class User:
    """One entry of the store; ``generation`` changes with the password, which invalidates older tokens."""

    name: str
    role: Role
    password_hash: str
    generation: int


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**log2_n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    """``scrypt$<log2 N>$<r>$<p>$<salt>$<hash>``: the parameters travel with the hash so they can change later."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_LOG2_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison)."""
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = _scrypt(password, base64.b64decode(salt), int(log2_n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, base64.b64decode(digest))


# A hash to check unknown names against, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password(secrets.token_hex(8))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(
            f"user names are 1-64 letters, digits and . _ @ - (starting with a letter or digit), got {name!r}"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"passwords need at least {MIN_PASSWORD} characters")
    return password


class UserStore:
    """The user file, re-read when it changes on disk; writes are atomic and serialised by a file lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: FileVersion | None = None
        self._users: dict[str, User] = {}

    def _current(self) -> dict[str, User]:
        """The users as the file holds them now (a stat per call; parsed again only when it changed)."""
        stamp = file_version(self.path)
        with self._lock:
            if stamp != self._stamp:
                self._users = self._read() if stamp is not None else {}
                self._stamp = stamp
            return self._users

    def _read(self) -> dict[str, User]:
        with open(self.path) as f:
            raw = json.load(f)
        return {
            name: User(name, Role.parse(entry["role"]), entry["password"], int(entry.get("generation", 1)))
            for name, entry in raw.get("users", {}).items()
        }

    def __len__(self) -> int:
        return len(self._current())

    def list(self) -> list[User]:
        return sorted(self._current().values(), key=lambda u: u.name)

    def get(self, name: str) -> User | None:
        return self._current().get(name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when name and password match, else None (after the same hashing work either way)."""
        user = self.get(name)
        ok = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        return user if user is not None and ok else None

    # Writes (tools/users.py): read, change, write atomically, all under the file lock.

    @contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            raw: dict[str, Any] = {"version": 1, "users": {}}
            if self.path.exists():
                with open(self.path) as f:
                    raw = json.load(f)
            yield raw["users"]
            write_json(self.path, raw)
            os.chmod(self.path, 0o600)

    def add(self, name: str, role: Role, password: str) -> None:
        check_name(name)
        check_password(password)
        with self._editing() as users:
            if name in users:
                raise UserError(f"user {name!r} exists already (use set-role or set-password)")
            users[name] = {
                "role": role.label,
                "password": hash_password(password),
                "generation": 1,
                "created": int(time.time()),
            }
        logger.info("User %s added with role %s", name, role.label)

    def remove(self, name: str) -> None:
        with self._editing() as users:
            if users.pop(name, None) is None:
                raise UserError(f"no user {name!r}")

    def set_role(self, name: str, role: Role) -> None:
        with self._editing() as users:
            if name not in users:
                raise UserError(f"no user {name!r}")
            users[name]["role"] = role.label

    def set_password(self, name: str, password: str) -> None:
        """A new password; tokens and cookies issued before it stop working."""
        check_password(password)
        with self._editing() as users:
            if name not in users:
                raise UserError(f"no user {name!r}")
            users[name]["password"] = hash_password(password)
            users[name]["generation"] = int(users[name].get("generation", 1)) + 1
