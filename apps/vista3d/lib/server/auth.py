"""Who is asking: a request's token (``Authorization`` header or session cookie) resolved to an :class:`Identity`.

Sign-in is on with ``--conf auth on``, off with ``auth off``, and by default (``auto``) as soon as
the user store holds a user, read live: adding the first user with ``tools/users.py`` turns it on
without a restart. On a non-loopback address ``auto`` is always on (an empty store then admits
nobody). The user's role is read from the store on every request, so ``set-role`` and ``remove``
count at once; a token issued before a password change no longer works.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .tokens import TokenError, TokenIssuer
from .users import Role, User, UserStore

__all__ = ["ANONYMOUS", "Authenticator", "Identity", "SignInError"]

logger = logging.getLogger(__name__)

# Failed sign-ins per user name before further attempts are refused for the rest of the window.
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0


@dataclass(frozen=True)
class Identity:
    """The caller as the rest of the server sees it: a name and a role (None: not signed in)."""

    name: str
    role: Role | None
    signed_in: bool

    def may(self, need: Role) -> bool:
        return self.role is not None and self.role >= need


ANONYMOUS = Identity("anonymous", None, False)
# With sign-in off every caller may do everything (the server is on loopback, or auth=off was chosen).
UNCHECKED = Identity("anonymous", Role.ADMIN, False)


class SignInError(ValueError):
    """Wrong name or password, or too many failures; ``retry_after`` is set for the latter."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Failures:
    """Recent failed sign-ins per name: slows password guessing to MAX_FAILURES per window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: dict[str, deque[float]] = {}

    def retry_after(self, name: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            times = self._times.get(name)
            while times and now - times[0] > FAILURE_WINDOW_S:
                times.popleft()
            if times is not None and len(times) >= MAX_FAILURES:
                return int(FAILURE_WINDOW_S - (now - times[0])) + 1
        return None

    def add(self, name: str) -> None:
        with self._lock:
            self._times.setdefault(name, deque()).append(time.monotonic())

    def clear(self, name: str) -> None:
        with self._lock:
            self._times.pop(name, None)


class Authenticator:
    """Signs users in and resolves tokens; ``mode`` is the ``--conf auth`` value."""

    def __init__(self, store: UserStore, issuer: TokenIssuer, mode: str, network: bool) -> None:
        self.store = store
        self.issuer = issuer
        self.mode = mode
        self.network = network
        self._failures = _Failures()

    @property
    def enabled(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        return self.network or len(self.store) > 0

    def identify(self, token: str | None) -> Identity:
        """The caller of a request carrying ``token`` (None: no credentials).

        Raises:
            TokenError: the token is forged, expired, or its user was removed or changed password.
        """
        if not self.enabled:
            return UNCHECKED
        if not token:
            return ANONYMOUS
        claims = self.issuer.verify(token)
        user = self.store.get(claims.name)
        if user is None:
            raise TokenError(f"user {claims.name!r} no longer exists")
        if user.generation != claims.generation:
            raise TokenError("the password changed since this sign-in: sign in again")
        return Identity(user.name, user.role, True)

    def sign_in(self, name: str, password: str) -> tuple[User, str]:
        """Check a name and password; the user and a new token, or :class:`SignInError`."""
        retry = self._failures.retry_after(name)
        if retry is not None:
            raise SignInError(f"too many failed sign-ins for {name!r}: try again in {retry} s", retry)
        user = self.store.authenticate(name, password)
        if user is None:
            self._failures.add(name)
            logger.warning("Failed sign-in for %r", name[:64])
            raise SignInError("wrong user name or password")
        self._failures.clear(name)
        logger.info("%s signed in (%s)", user.name, user.role.label)
        return user, self.issuer.issue(user.name, user.generation)
