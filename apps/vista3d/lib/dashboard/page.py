"""The dashboard page: :func:`lib.dashboard.figures.dashboard_data` as HTML with inline SVG plots.

The page loads nothing: the plots are SVG drawn on the server (:mod:`.plots`), the styles are in the
page, and its one script (the admin's rollback button) carries a nonce that the page's
Content-Security-Policy (:func:`content_security_policy`) names, so no other script can run. Every
figure that has nothing to show yet says what will appear there, and when.
"""

from __future__ import annotations

import secrets
from html import escape
from pathlib import Path
from string import Template
from typing import Any

from . import plots

__all__ = ["content_security_policy", "render_page"]

_PAGE = Template((Path(__file__).parent / "dashboard.html").read_text())
ROLLBACK_URL = "/model/vista3d/rollback"
ROUNDS_SHOWN = 10
SUBMISSIONS_SHOWN = 20
REFRESH_S = 15  # the page reloads itself this often while a round runs


def content_security_policy(nonce: str) -> str:
    """Only the page's own styles and nonced script; requests (the rollback) and forms back to this server."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


def _figure(svg: str | None, caption: str, empty: str, ident: str) -> str:
    if svg is None:
        return f'<p class="empty" id="{ident}-empty">{escape(empty)}</p>'
    return f'<figure id="{ident}">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def _table(ident: str, head: list[str], rows: list[list[str]]) -> str:
    """A table of already escaped cells; numbers are right-aligned by their ``num:`` prefix."""
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = ""
    for row in rows:
        tds = "".join(f'<td class="num">{c[4:]}</td>' if c.startswith("num:") else f"<td>{c}</td>" for c in row)
        body += f"<tr>{tds}</tr>"
    return f'<table id="{ident}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "num:-"
    return f"num:{value:.{digits}f}" if isinstance(value, float) else f"num:{escape(str(value))}"


def _time(value: str | None) -> str:
    return escape(value.replace("T", " ")) if value else "-"


def _header(data: dict[str, Any]) -> str:
    viewer = data["viewer"]
    role = f" ({escape(viewer['role'])})" if viewer["role"] else " (sign-in is off)"
    sees = "the team's work" if viewer["sees"] == "everyone" else "your own work and the team's totals"
    return (
        f'<header><h1>VISTA3D team dashboard</h1><span id="viewer">{escape(viewer["name"])}{role}: you see {sees}'
        f"</span><span>as of {_time(data['generated'])} (server time)</span>"
        '<a href="/ohif/">OHIF viewer</a><a href="/dashboard/data">JSON</a>'
        '<form method="post" action="/signout"><button type="submit">sign out</button></form></header>'
    )


def _running(learning: dict[str, Any]) -> str:
    loop, run = learning["loop"], learning["running_round"]
    if run is None:
        if not loop["trigger"]:
            return '<p id="round">No round is running; the learning loop is off (train_trigger 0).</p>'
        return (
            f'<p id="round">No round is running. The next starts when {loop["trigger"]} submitted labels are pending '
            f"({loop['pending_labels']} now) and {loop['debounce_s']:.0f} s pass without another save.</p>"
        )
    if run["step"] is None:
        return f'<p id="round">A {escape(str(run["kind"]))} round started {_time(run["started"])}: {run["stage"]}.</p>'
    left = run["seconds_left"] / 60
    return (
        f'<p id="round">A {escape(str(run["kind"]))} round started {_time(run["started"])}: step {run["step"]} of '
        f'{run["steps"]} <progress value="{run["step"]}" max="{run["steps"]}"></progress> loss {run["loss"]:.4f} '
        f"(mean of the last 20 steps), {run['s_per_step']:.2f} s a step, at most {left:.1f} min of training left "
        "(the early stop may end it sooner; the gate's scoring follows).</p>"
    )


def _rollback(learning: dict[str, Any]) -> str:
    target = learning["rollback_to"]
    if not learning["may_rollback"] or target is None:
        return ""
    question = f"Serve v{target} instead of v{learning['served_version']} for everybody?"
    return (
        f' <button class="action" id="rollback" data-url="{ROLLBACK_URL}" data-question="{escape(question)}">'
        f'Roll back to v{target}</button> <span id="rollback-status"></span>'
    )


def _gate(r: dict[str, Any]) -> str:
    pooled = (r["gate"] or {}).get("pooled")
    if not pooled:
        return "-"
    return escape(
        f"{pooled['objects']} objects, mean {pooled['mean']:+.4f}, bound {pooled['upper']:+.4f}, "
        f"{pooled['better']} better / {pooled['worse']} worse"
    )


def _rounds(learning: dict[str, Any]) -> str:
    rounds = list(reversed(learning["rounds"]))[:ROUNDS_SHOWN]
    if not rounds:
        return '<p class="empty" id="rounds-empty">Each round appears here with its gate decision and evidence.</p>'
    rows = []
    for r in rounds:
        outcome = (
            f'<span class="promoted">promoted v{r["promoted"]}</span>'
            if r["promoted"] is not None
            else '<span class="refused">not promoted</span>'
        )
        rows.append(
            [_time(r["finished"]), escape(str(r["kind"])), f"v{r['from_version']}: {outcome}", escape(r["reason"]),
             _gate(r), _num(r["served_score"]), _num(r["candidate_score"]), _num(r["steps"]), _num(r["seconds"], 0)]
        )  # fmt: skip
    head = ["finished", "branch", "outcome", "gate's reason", "gate's evidence (candidate - served, pooled)",
            "served val.", "candidate val.", "steps", "seconds"]  # fmt: skip
    return _table("rounds", head, rows)


def _learning(learning: dict[str, Any], now: str) -> str:
    served = _figure(
        plots.served_versions_svg(learning, now),
        "Served version over time: a step at each promotion and rollback.",
        f"Served: v{learning['served_version']}. No round has promoted a version yet; each promotion and rollback "
        "will appear here as a step.",
        "plot-served",
    )
    validation = _figure(
        plots.validation_svg(learning),
        "Validation Dice of each kept version on the split of its round (mean over simulated clicks, which the gate "
        "compares, and Dice after 1 and 5 clicks).",
        "Validation Dice appears after the first round: it scores the served version and its candidate on the "
        "validation images (one from the second submitted label on).",
        "plot-validation",
    )
    return (
        f'<section id="learning"><h2>Learning: served v{learning["served_version"]}{_rollback(learning)}</h2>'
        f'{_running(learning)}<div class="plots">{served}{validation}</div>'
        f"<h3>Rounds (newest first)</h3>{_rounds(learning)}</section>"
    )


def _submissions(work: dict[str, Any]) -> str:
    rows = [
        [escape(s["image"]), escape(s["user"]), _time(s["submitted"]), _num(s["dice"]),
         _num(None if s["corrected_fraction"] is None else 100 * s["corrected_fraction"], 1)]
        for s in reversed(work["submissions"][-SUBMISSIONS_SHOWN:])
    ]  # fmt: skip
    if not rows:
        return ""
    head = ["image", "annotator", "submitted", "Dice of the model's label", "voxels corrected (%)"]
    return f"<h3>Submitted labels (newest first)</h3>{_table('submissions', head, rows)}"


def _work(data: dict[str, Any]) -> str:
    work, mine = data["work"], data["viewer"]["sees"] != "everyone"
    images = work["images"]
    whose = "you have" if mine else "anybody has"
    per_day = _figure(
        plots.labels_per_day_svg(work),
        "Labels submitted per day by annotator (an image's label saved again counts on its last day).",
        f"No submitted label yet ({whose} submitted none). Each label submitted from OHIF or 3D Slicer appears "
        "here on the day it is saved.",
        "plot-labels",
    )
    corrections = _figure(
        plots.corrections_svg(work, data["learning"]),
        "How much of the model's proposal the annotator changed, per submitted image (the dice scoring method); "
        "dotted lines: a new version served. Falling points: the model needs fewer corrections.",
        "Correction effort appears once the dice scoring method has compared an image's model label (tag "
        "original, saved by the viewer with the result) with its submitted one; MONAI Label runs it at start-up "
        "and after each training round, an annotator with POST /scoring/dice.",
        "plot-corrections",
    )
    return (
        f'<section id="work"><h2>Work{" (yours)" if mine else ""}</h2>'
        f'<p id="images">Images labelled: {images["labelled"]} of {images["total"]} '
        f'<progress value="{images["labelled"]}" max="{max(images["total"], 1)}"></progress> '
        f"{images['remaining']} remaining (the team's).</p>"
        f'<div class="plots">{per_day}{corrections}</div>{_submissions(work)}</section>'
    )


def _next(data: dict[str, Any]) -> str:
    nxt = data["next"]
    queue = nxt["active_learning"]
    if queue:
        rows = [[escape(q["image"]), _num(q["uncertainty"], 4), escape(str(q["scored_with"] or "not scored yet")),
                 escape(q["handed_to"] or "-"), _time(q["handed_at"])] for q in queue]  # fmt: skip
        head = ["image", "uncertainty (nats)", "scored with", "last handed to", "at"]
        active = _table("active-learning", head, rows)
    else:
        active = '<p class="empty" id="active-learning-empty">No unlabelled image: add studies to label more.</p>'
    latency = _figure(
        plots.latency_svg(nxt),
        "Recent inference requests: seconds from request to result.",
        "No inference request has finished since the server started; each will appear here.",
        "plot-latency",
    )
    q = nxt["queue"]
    return (
        '<section id="next"><h2>Next</h2><h3>Active learning: the next images by uncertainty (highest first; '
        f"unscored first, just handed out last)</h3>{active}<h3>Inference queue</h3>"
        f'<p id="queue">{len(q["running"])} running, {q["length"]} waiting.</p>'
        f'<div class="plots">{latency}</div></section>'
    )


def render_page(data: dict[str, Any]) -> tuple[str, str]:
    """The page for :func:`~lib.dashboard.figures.dashboard_data`'s ``data``, and the nonce of its script."""
    nonce = secrets.token_urlsafe(16)
    running = data["learning"]["running_round"] is not None
    page = _PAGE.substitute(
        nonce=nonce,
        refresh=f'<meta http-equiv="refresh" content="{REFRESH_S}">' if running else "",
        header=_header(data),
        learning=_learning(data["learning"], data["generated"]),
        work=_work(data),
        next=_next(data),
    )
    return page, nonce
