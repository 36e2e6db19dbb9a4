"""The dashboard's plots, drawn on the server with matplotlib as inline SVG: no script, nothing fetched.

Each function takes a section of :func:`lib.dashboard.figures.dashboard_data` and returns an
``<svg>`` element (text kept as text, so a browser finds and a test reads it), or None when there
is nothing to draw yet (the page then says what will appear, and when). Times are server time.
matplotlib takes about a second to import: the dashboard route imports :mod:`lib.dashboard.page`
(and so this module) when it first draws a page, so servers that never show one do not pay for it.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

__all__ = ["corrections_svg", "labels_per_day_svg", "latency_svg", "served_versions_svg", "validation_svg"]

SIZE = (6.4, 3.0)  # inches; drawn at 100 px an inch
TIME_AXIS = "time (server time)"
MIN_SPAN_DAYS = 1 / 24  # an hour
METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)  # RDF about matplotlib: nothing a reader needs
# rc_context changes matplotlib's process-wide settings: one drawing at a time (requests run in threads).
_LOCK = threading.Lock()


def _render(name: str, draw: Callable[[Axes], None]) -> str:
    """Draw on one axes and return the ``<svg>`` element; ``name`` salts its ids (several SVGs share a page)."""
    with _LOCK, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.size": 9}):
        figure = Figure(figsize=SIZE, dpi=100, layout="constrained")
        axes = figure.add_subplot()
        axes.grid(True, alpha=0.3)
        draw(axes)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return METADATA.sub("", text[text.index("<svg") :])


def _times(values: list[str]) -> list[float]:
    """ISO times as matplotlib's date numbers (the axes are then made date axes by :func:`_date_axis`)."""
    return [float(date2num(datetime.fromisoformat(v))) for v in values]


def _date_axis(axes: Axes, times: list[float]) -> None:
    """A time axis over ``times`` (date numbers), at least :data:`MIN_SPAN_DAYS` wide: one point is not years."""
    lo, hi = min(times), max(times)
    pad = max((hi - lo) * 0.05, MIN_SPAN_DAYS / 2)
    axes.set_xlim(lo - pad, hi + pad)
    axes.xaxis_date()
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_xlabel(TIME_AXIS)


def served_versions_svg(learning: dict[str, Any], now: str) -> str | None:
    """The served version over time, until ``now``: a step at every promotion and rollback."""
    history = learning["served_history"]
    if not history:
        return None

    def draw(axes: Axes) -> None:
        times = _times([e["at"] for e in history])
        versions = [e["version"] for e in history]
        line = [*times, *_times([now])], [*versions, learning["served_version"]]
        axes.step(*line, where="post", color="tab:blue")
        for event, marker, colour in (("promoted", "o", "tab:green"), ("rolled back", "v", "tab:red")):
            points = [(t, v) for t, v, e in zip(times, versions, history, strict=True) if e["event"] == event]
            if points:
                axes.scatter(*zip(*points, strict=True), marker=marker, color=colour, label=event, zorder=3)
        axes.set_ylabel("served version")
        axes.set_ylim(-0.5, max(line[1]) + 0.5)
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="upper left")
        _date_axis(axes, line[0])

    return _render("served", draw)


def validation_svg(learning: dict[str, Any]) -> str | None:
    """Validation Dice of every kept version: the gate's score and Dice after k clicks where measured."""
    versions = [v for v in learning["versions"] if v["validation_score"] is not None]
    if not versions:
        return None

    def draw(axes: Axes) -> None:
        x = [v["version"] for v in versions]
        axes.plot(x, [v["validation_score"] for v in versions], "o-", color="black", label="mean over clicks (gate)")
        clicks = sorted({k for v in versions for k in v["dice_after_clicks"]}, key=int)
        for k in clicks:
            points = [(v["version"], v["dice_after_clicks"][k]) for v in versions if k in v["dice_after_clicks"]]
            axes.plot(*zip(*points, strict=True), "s--", label=f"Dice@{k} (after {k} click{'s' if k != '1' else ''})")
        axes.set_xticks(x, [f"v{v['version']}\n{v['validation_images']} img" for v in versions])
        axes.set_xlabel("version (validation images it was scored on)")
        axes.set_ylabel("validation Dice (0-1)")
        axes.set_ylim(0, 1)
        axes.legend(loc="best")

    return _render("validation", draw)


def labels_per_day_svg(work: dict[str, Any]) -> str | None:
    """Labels submitted per day, stacked by annotator."""
    rows = work["labels_per_day"]
    if not rows:
        return None

    def draw(axes: Axes) -> None:
        days = sorted({r["day"] for r in rows})
        bottom = [0] * len(days)
        for user in work["annotators"]:
            counts = [sum(r["labels"] for r in rows if r["day"] == d and r["user"] == user) for d in days]
            axes.bar(days, counts, bottom=bottom, label=user)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        axes.set_xlabel("day (server time)")
        axes.set_ylabel("labels submitted")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="upper left", title="annotator")

    return _render("labels", draw)


def corrections_svg(work: dict[str, Any], learning: dict[str, Any]) -> str | None:
    """Share of the model's labelled voxels each annotator changed per submitted image, with promotions marked."""
    scored = [s for s in work["submissions"] if s["corrected_fraction"] is not None]
    if not scored:
        return None

    def draw(axes: Axes) -> None:
        for user in sorted({s["user"] for s in scored}):
            mine = [s for s in scored if s["user"] == user]
            percent = [100 * s["corrected_fraction"] for s in mine]
            axes.plot(_times([s["submitted"] for s in mine]), percent, "o", label=user)
        promotions = _times([e["at"] for e in learning["served_history"] if e["event"] == "promoted"])
        for at in promotions:
            axes.axvline(at, color="tab:green", alpha=0.5, linestyle=":")
        axes.set_ylabel("labelled voxels corrected (%)")
        axes.set_ylim(0, 100)
        axes.legend(loc="upper right", title="annotator (dotted: new version)")
        _date_axis(axes, [*_times([s["submitted"] for s in scored]), *promotions])

    return _render("corrections", draw)


def latency_svg(next_up: dict[str, Any]) -> str | None:
    """Recent inference requests: seconds from request to result, clicks and automatic segmentations."""
    jobs = next_up["latencies"]
    if not jobs:
        return None

    def draw(axes: Axes) -> None:
        for kind, marker in (("click", "o"), ("auto", "s")):
            mine = [j for j in jobs if j["kind"] == kind]
            if mine:
                axes.plot(_times([j["finished"] for j in mine]), [j["seconds"] for j in mine], marker, label=kind)
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())  # 0.5, 1, 10 rather than powers of ten
        axes.set_ylabel("latency (s, request to result)")
        axes.legend(loc="upper left")
        _date_axis(axes, _times([j["finished"] for j in jobs]))

    return _render("latency", draw)
