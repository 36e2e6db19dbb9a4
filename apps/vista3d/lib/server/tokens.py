"""Signed, expiring sign-in tokens (PyJWT, HS256 only) for Slicer's ``Authorization`` header and OHIF's cookie.

The signing key is 32 random bytes kept beside the user store (created on first use, mode 0600),
so tokens survive a restart and deleting the key signs everybody out. Decoding names its one
algorithm explicitly: a token signed any other way (``none``, RS256 with a public key as secret)
is refused.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

__all__ = ["ALGORITHMS", "Claims", "TokenError", "TokenIssuer"]

ALGORITHMS = ["HS256"]
ISSUER = "vista3d-monailabel"
AUDIENCE = "vista3d"


class TokenError(ValueError):
    """A token that is malformed, forged or expired; the message says which."""


@dataclass(frozen=True)
class Claims:
    """What a valid token says: who, and which password generation it was issued under."""

    name: str
    generation: int
    expires: int


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"the token key {path} is shorter than 32 bytes: delete it to create a new one")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.link(tmp, path)  # fails if another process created the key meanwhile: then use theirs
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)
    return path.read_bytes()


class TokenIssuer:
    """Issues and checks tokens with one key and one lifetime."""

    def __init__(self, key: bytes, lifetime_s: float) -> None:
        self._key = key
        self.lifetime_s = lifetime_s

    @classmethod
    def from_key_file(cls, path: str | Path, lifetime_s: float) -> TokenIssuer:
        return cls(_load_or_create_key(Path(path)), lifetime_s)

    def issue(self, name: str, generation: int) -> str:
        now = int(time.time())
        claims = {
            "sub": name,
            "gen": generation,
            "iat": now,
            "exp": now + int(self.lifetime_s),
            "iss": ISSUER,
            "aud": AUDIENCE,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHMS[0])

    def verify(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=ALGORITHMS,
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["sub", "gen", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the sign-in has expired: sign in again") from None
        except jwt.InvalidTokenError as e:
            raise TokenError(f"the sign-in token is not valid ({e})") from None
        return Claims(str(payload["sub"]), int(payload["gen"]), int(payload["exp"]))
