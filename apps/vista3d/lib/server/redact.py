"""What leaves the server is trimmed: no absolute server paths in non-admin answers, no megabyte log lines.

MONAI Label's datastore answers (``/datastore/?output=train``, image info, active learning) and
error messages name files by their absolute paths, which tell a client how the server's disks
are laid out and where the data really lives. For everybody but a signed-in admin, every JSON
answer has such paths replaced by their file names. A path is recognised by its first component
being a top-level folder of this machine (``/work/...``, ``/tmp/...``), so routes such as
``/datastore/label`` in messages stay as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Identity
from .users import Role

__all__ = ["MAX_LOG_CHARS", "ScrubPathsMiddleware", "TruncatingFilter", "scrub_paths"]

MAX_LOG_CHARS = 2000
_CANDIDATE = re.compile(r"(?<![\w:/.~-])/[^\s'\"<>|,;()\[\]{}]+")


def _top_level() -> frozenset[str]:
    try:
        return frozenset(e for e in os.listdir("/") if os.path.isdir(f"/{e}"))
    except OSError:
        return frozenset()


_ROOTS = _top_level()


def _replace(match: re.Match[str]) -> str:
    path = match.group(0)
    parts = [p for p in path.split("/") if p]
    if len(parts) < 2 or parts[0] not in _ROOTS:
        return path
    return parts[-1]


def scrub_paths(value: Any) -> Any:
    """``value`` (parsed JSON) with every absolute server path replaced by its last component."""
    if isinstance(value, str):
        return _CANDIDATE.sub(_replace, value) if "/" in value else value
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, dict):
        return {scrub_paths(k): scrub_paths(v) for k, v in value.items()}
    return value


def _is_admin(scope: Scope) -> bool:
    identity = scope.get("state", {}).get("identity")
    return isinstance(identity, Identity) and identity.signed_in and identity.role == Role.ADMIN


class ScrubPathsMiddleware:
    """Rewrites JSON answers to anybody but a signed-in admin with :func:`scrub_paths`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_admin(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(b"application/json"):
                    await send(message)  # files and pages pass through untouched
                    return
                start = message
                return
            if start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            content = b"".join(body)
            with contextlib.suppress(ValueError):  # not JSON after all: leave it as it is
                content = json.dumps(scrub_paths(json.loads(content))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(content)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, buffered)


class TruncatingFilter(logging.Filter):
    """Cuts every line of a log message to ``limit`` characters, and a message to ``total`` (keeping its end).

    Request params can be a megabyte on one line, and ``/logs`` serves the log; a traceback's many
    short lines stay whole, its last ``total`` characters (where the error is) at least.
    """

    def __init__(self, limit: int = MAX_LOG_CHARS, total: int = 20 * MAX_LOG_CHARS) -> None:
        super().__init__()
        self.limit = limit
        self.total = total

    def _line(self, line: str) -> str:
        return (
            line if len(line) <= self.limit else f"{line[: self.limit]}... [{len(line) - self.limit} more characters]"
        )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > self.limit:
            text = "\n".join(self._line(line) for line in message.split("\n"))
            if len(text) > self.total:
                text = f"[{len(text) - self.total} characters cut] ...{text[-self.total :]}"
            record.msg, record.args = text, None
        return True
