"""``GET /logs/`` and ``GET /logs/gpu``: the server's log and ``nvidia-smi``, for admins, without the internet.

MONAI Label's log page loads jQuery and Ace from public CDNs, which a hospital network often
cannot reach (the page then stays blank), and a ``lines`` beyond what a deque takes answered 500.
Here the page is self-contained: a few lines of inline script fetch the text and put it in a
``<pre>``, and its Content-Security-Policy lets it load nothing from anywhere else. ``/logs/gpu``
answers 404 on a machine without ``nvidia-smi`` (MONAI Label: 500).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

__all__ = ["LOGPAGE_CSP", "MAX_LINES", "logs_router"]

MAX_LINES = 100_000
MAX_REFRESH_S = 3600
# Only the page's own inline script and style, and requests back to this server.
LOGPAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Server log</title>
<style>
  body {{ margin: 0; font: 13px/1.4 monospace; background: #fff; color: #222; }}
  pre {{ margin: 0; padding: 8px; white-space: pre-wrap; word-break: break-all; }}
</style>
</head>
<body>
<pre id="log">loading...</pre>
<script>
  const params = new URLSearchParams({{text: "true", lines: "{lines}"}});
  async function load() {{
    const answer = await fetch("?" + params.toString(), {{credentials: "same-origin"}});
    const log = document.getElementById("log");
    log.textContent = answer.ok ? await answer.text() : "HTTP " + answer.status + ": " + await answer.text();
    window.scrollTo(0, document.body.scrollHeight);
  }}
  load();
  {refresh}
</script>
</body>
</html>
"""


def _require(path: str) -> None:
    """404 when the server has no log file."""
    if not os.path.isfile(path):
        raise HTTPException(status_code=404, detail="the server has no log file (logs/app.log in the app folder)")


def _tail(path: str, lines: int) -> str:
    """The last ``lines`` lines of the log (0: all of it), or 404 when there is no log file."""
    _require(path)
    with open(path, errors="replace") as f:
        return "".join(deque(f, lines) if lines > 0 else f)


def logs_router(log_file: str) -> APIRouter:
    router = APIRouter(prefix="/logs")

    @router.get("/", summary="The server log: a page that shows it (html), or its last lines as text")
    async def logs(
        lines: Annotated[int, Query(ge=0, le=MAX_LINES, description="last lines; 0: the whole log")] = 300,
        html: bool = True,
        text: bool = False,
        refresh: Annotated[int, Query(ge=0, le=MAX_REFRESH_S, description="page reload, s (at least 3)")] = 0,
    ) -> Response:
        if html and not text:
            _require(log_file)
            every = f"setInterval(load, {max(refresh, 3) * 1000});" if refresh else ""
            page = PAGE.format(lines=lines, refresh=every)
            return HTMLResponse(page, headers={"content-security-policy": LOGPAGE_CSP, "cache-control": "no-store"})
        return PlainTextResponse(await run_in_threadpool(_tail, log_file, lines))

    @router.get("/gpu", summary="nvidia-smi's report")
    async def gpu_info() -> Response:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise HTTPException(status_code=404, detail="this server has no GPU (nvidia-smi is not installed)")
        report = await run_in_threadpool(subprocess.run, [smi], capture_output=True, text=True, timeout=30)
        return PlainTextResponse(report.stdout)

    return router
