"""The end-effector path as inline SVG, built as a tree of typed nodes that the templates render (and escape).

No markup is written here: a `Node` holds a tag, attributes and text, and `templates/svg.html.j2`
turns it into SVG with Jinja2's autoescaping, so text from an episode (a safety reason in a
tooltip, a stage name) can never become markup. Tag and attribute names are checked when a node is
made, as they are the only parts the template does not escape by value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from vlm2vla_edge.runtime.report.path import Box, Mark, PathPoint, Point, bounds
from vlm2vla_edge.runtime.report.units import Units, format_gripper

_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


@dataclass(frozen=True)
class Node:
    """One SVG element: `attrs` in order, then its text, then its children."""

    tag: str
    attrs: tuple[tuple[str, str], ...] = ()
    text: str = ""
    children: tuple["Node", ...] = ()

    def __post_init__(self) -> None:
        for name in (self.tag, *(k for k, _ in self.attrs)):
            if not _NAME.fullmatch(name):
                raise ValueError(f"not an SVG tag or attribute name: {name!r}")


def el(tag: str, attrs: dict[str, str], *children: Node, text: str = "", title: str = "") -> Node:
    """A node; `title` adds the <title> child that browsers show as a tooltip."""
    if title:
        children = (*children, Node("title", text=title))
    return Node(tag, tuple(attrs.items()), text, children)


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


#: Presentation attributes of the plot's parts, inline so the SVG looks the same in any viewer,
#: also when copied out of the page (classes stay for the page's CSS and for tests).
STYLE: dict[str, dict[str, str]] = {
    "area": {"fill": "#fcfcfd", "stroke": "#e3e6ea"},
    "grid": {"stroke": "#eef0f3"},
    "tick": {"font-size": "10", "fill": "#6b7280", "font-family": "sans-serif"},
    "axis": {"font-size": "11", "fill": "#374151", "font-family": "sans-serif"},
    "ptitle": {"font-size": "12.5", "font-weight": "600", "fill": "#1d2330", "font-family": "sans-serif"},
    "workspace": {"stroke": "#9aa3ae", "stroke-width": "1.2", "stroke-dasharray": "5 4"},
    "table": {"stroke": "#8b6b4a", "stroke-width": "2"},
    "floor": {"stroke": "#c62828", "stroke-width": "1", "stroke-dasharray": "2 3"},
    "ee-path": {"fill": "none", "stroke": "#d9dde3", "stroke-width": "6", "stroke-linejoin": "round",
                "stroke-linecap": "round"},
    "ee-seg": {"fill": "none", "stroke-width": "2.2", "stroke-linejoin": "round", "stroke-linecap": "round"},
    "exec-path": {"fill": "none", "stroke": "#1d2330", "stroke-width": "0.8", "stroke-dasharray": "2 2"},
    "start": {"fill": "#1f8a4c", "stroke": "#fff", "stroke-width": "1.5"},
    "end": {"fill": "#1d2330", "stroke": "#fff", "stroke-width": "1.5"},
    "mark-clamp": {"fill": "#f5b428", "stroke": "#8a5a00", "stroke-width": "1"},
    "mark-reject": {"fill": "none", "stroke": "#c62828", "stroke-width": "2.6"},
}

GRIPPER_COLOUR = {True: "#2b7bd9", False: "#e0662a", None: "#8a8f98"}


def styled(cls: str, **attrs: str) -> dict[str, str]:
    """The attributes of a plot part: its class, its presentation attributes, then `attrs`."""
    return {"class": cls, **STYLE.get(cls.split()[0], {}), **{k.replace("_", "-"): v for k, v in attrs.items()}}


def nice_step(span: float) -> float:
    """A grid step of 1, 2 or 5 times a power of ten giving about five lines over `span`."""
    raw = span / 5
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


class Projection:
    """Maps two coordinates of the base frame to SVG pixels with one scale (true proportions)."""

    def __init__(self, axes: tuple[int, int], lo: Sequence[float], hi: Sequence[float], max_w: float,
                 max_h: float) -> None:
        self.axes = axes
        self.lo, self.hi = (lo[axes[0]], lo[axes[1]]), (hi[axes[0]], hi[axes[1]])
        span_u, span_v = self.hi[0] - self.lo[0], self.hi[1] - self.lo[1]
        self.s = min(max_w / span_u, max_h / span_v)
        self.w, self.h = span_u * self.s, span_v * self.s
        self.ml, self.mt, self.mr, self.mb = 52.0, 30.0, 14.0, 40.0

    @property
    def width(self) -> float:
        return self.ml + self.w + self.mr

    @property
    def height(self) -> float:
        return self.mt + self.h + self.mb

    def uv(self, u: float, v: float) -> tuple[float, float]:
        return self.ml + (u - self.lo[0]) * self.s, self.mt + (self.hi[1] - v) * self.s

    def xy(self, pos: Sequence[float]) -> tuple[float, float]:
        return self.uv(pos[self.axes[0]], pos[self.axes[1]])

    def pts(self, positions: Iterable[Sequence[float]]) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in (self.xy(p) for p in positions))

    def hline(self, v: float, cls: str, title: str) -> list[Node]:
        """A line across the plot at height v (nothing when v is outside the view)."""
        if not self.lo[1] <= v <= self.hi[1]:
            return []
        (x0, y), (x1, _) = self.uv(self.lo[0], v), self.uv(self.hi[0], v)
        return [el("line", styled(cls, x1=_f(x0), y1=_f(y), x2=_f(x1), y2=_f(y)), title=title)]

    def box_edges(self, lo: Sequence[float], hi: Sequence[float], title: str) -> list[Node]:
        """The rectangle lo-hi (base-frame corners), each edge clipped to the view, so a zoomed view shows
        the limits that are near the path and no lines over the axes."""
        (u0, v0), (u1, v1) = (lo[self.axes[0]], lo[self.axes[1]]), (hi[self.axes[0]], hi[self.axes[1]])
        cu0, cu1 = max(u0, self.lo[0]), min(u1, self.hi[0])
        cv0, cv1 = max(v0, self.lo[1]), min(v1, self.hi[1])
        if cu0 > cu1 or cv0 > cv1:
            return []
        edges = []
        for v in (v0, v1):  # horizontal edges
            if self.lo[1] <= v <= self.hi[1]:
                edges.append((self.uv(cu0, v), self.uv(cu1, v)))
        for u in (u0, u1):  # vertical edges
            if self.lo[0] <= u <= self.hi[0]:
                edges.append((self.uv(u, cv0), self.uv(u, cv1)))
        d = "".join(f"M{a[0]:.1f},{a[1]:.1f}L{b[0]:.1f},{b[1]:.1f}" for a, b in edges)
        return [el("path", styled("workspace", fill="none", d=d), title=title)] if d else []


def _grid(view: Projection, lo: list[float], hi: list[float], units: Units) -> list[Node]:
    """Grid lines and tick labels in display units."""
    out: list[Node] = []
    for k, axis in enumerate(view.axes):
        step = nice_step(hi[axis] - lo[axis])
        tick = math.ceil(lo[axis] / step) * step
        digits = 0 if step * units.scale >= 1 else 1
        while tick <= hi[axis] + 1e-12:
            label = units.num(tick, digits=digits)
            if k == 0:
                x, _ = view.uv(tick, view.lo[1])
                out.append(el("line", styled("grid", x1=_f(x), y1=_f(view.mt), x2=_f(x), y2=_f(view.mt + view.h))))
                below = styled("tick", x=_f(x), y=_f(view.mt + view.h + 14), text_anchor="middle")
                out.append(el("text", below, text=label))
            else:
                _, y = view.uv(view.lo[0], tick)
                out.append(el("line", styled("grid", x1=_f(view.ml), y1=_f(y), x2=_f(view.ml + view.w), y2=_f(y))))
                out.append(el("text", styled("tick", x=_f(view.ml - 6), y=_f(y + 4), text_anchor="end"), text=label))
            tick += step
    return out


def _path(view: Projection, points: list[PathPoint], marks: list[Mark], chunks: list[list[Point]],
          units: Units) -> list[Node]:
    """A halo polyline through every recorded position, runs coloured by gripper state, start/end, marks."""
    out = [el("polyline", styled("ee-path", points=view.pts(p.pos for p in points)))]
    run: list[PathPoint] = [points[0]]
    for prev, point in zip(points, points[1:]):
        if prev.gripper_open != run[0].gripper_open:
            out.append(_run(view, run))
            run = [run[-1]]
        run.append(point)
    out.append(_run(view, run))
    out += [el("polyline", styled("exec-path", points=view.pts(chunk))) for chunk in chunks]
    for point in points:
        x, y = view.xy(point.pos)
        dot = {"class": "pt", "cx": _f(x), "cy": _f(y), "r": "2.2", "fill": GRIPPER_COLOUR[point.gripper_open]}
        out.append(el("circle", dot,
                      title=f"step #{point.index} {point.stage}: {units.vec(point.pos)} {units.label}, "
                            f"gripper {format_gripper(point.gripper_open)}"))
    (sx, sy), (ex, ey) = view.xy(points[0].pos), view.xy(points[-1].pos)
    out.append(el("circle", styled("start", cx=_f(sx), cy=_f(sy), r="6"), title=f"start (step #{points[0].index})"))
    out.append(el("rect", styled("end", x=_f(ex - 5), y=_f(ey - 5), width="10", height="10"),
                  title=f"end (step #{points[-1].index})"))
    for mark in marks:  # last, so a limiter decision is never hidden under another marker
        x, y = view.xy(mark.pos)
        if mark.kind == "reject":
            d = f"M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}"
        else:
            d = f"M{x:.1f},{y - 6:.1f}L{x + 6:.1f},{y:.1f}L{x:.1f},{y + 6:.1f}L{x - 6:.1f},{y:.1f}Z"
        out.append(el("path", styled(f"mark-{mark.kind}", d=d), title=mark.text))
    return out


def _run(view: Projection, run: list[PathPoint]) -> Node:
    state = run[0].gripper_open
    cls = {True: "open", False: "closed", None: "unknown"}[state]
    return el("polyline", styled(f"ee-seg {cls}", stroke=GRIPPER_COLOUR[state], points=view.pts(p.pos for p in run)))


def path_svg(points: list[PathPoint], marks: list[Mark], chunks: list[list[Point]],
             box: Box | None, units: Units, axes: tuple[int, int], title: str, zoom: bool = False) -> Node:
    """One view of the end-effector path: workspace box, path coloured by gripper, start/end, safety marks."""
    names = "xyz"
    lo, hi = bounds(points, marks, box, zoom)
    view = Projection(axes, lo, hi, 420, 300)
    width, height = _f(view.width, 0), _f(view.height, 0)
    out = [
        el("text", styled("ptitle", x=_f(view.ml, 0), y="18"), text=title),
        el("rect", styled("area", x=_f(view.ml), y=_f(view.mt), width=_f(view.w), height=_f(view.h))),
        *_grid(view, lo, hi, units),
        el("text", styled("axis", x=_f(view.ml + view.w / 2), y=_f(view.height - 6), text_anchor="middle"),
           text=f"{names[axes[0]]} ({units.label})"),
        el("text", styled("axis", x="14", y=_f(view.mt + view.h / 2), text_anchor="middle",
                          transform=f"rotate(-90 14 {view.mt + view.h / 2:.1f})"),
           text=f"{names[axes[1]]} ({units.label})"),
    ]
    if box is not None:  # the workspace box, and in the side view the table and the lowest allowed height
        out += view.box_edges(box.lo, box.hi, box.source)
        if axes[1] == 2:
            if box.table is not None:
                out += view.hline(box.table, "table", f"table z = {units.num(box.table)} {units.label}")
            if box.floor is not None:
                out += view.hline(box.floor, "floor", f"z floor = {units.num(box.floor)} {units.label}")
    if points:
        out += _path(view, points, marks, chunks, units)
    else:
        centre = styled("tick", x=_f(view.ml + view.w / 2), y=_f(view.mt + view.h / 2), text_anchor="middle")
        out.append(el("text", centre, text="no end-effector positions recorded"))
    return el("svg", {"class": "plot", "xmlns": "http://www.w3.org/2000/svg", "viewBox": f"0 0 {width} {height}",
                      "width": width, "height": height, "role": "img", "aria-label": title}, *out)
