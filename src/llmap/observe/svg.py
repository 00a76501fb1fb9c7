"""SVG and number formatting for the HTML report: plot areas, axes, legends, marks.

Small pure helpers (no state besides a :class:`Plot`'s parts): every plot in
:mod:`llmap.observe.html` is an inline ``<svg>`` built from these, so the
page needs no script and no external file.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from typing import Any

__all__ = ["H", "PALETTE", "STACK", "STATUS_COLORS", "W", "Plot", "attributes", "count", "duration", "esc", "latency",
           "nice", "num", "rect", "si", "text", "time_axis", "usd", "when"]


# -- formatting numbers and times -------------------------------------------------------


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def count(n: int) -> str:
    return f"{n:,}"


def usd(x: float | None) -> str:
    if x is None:
        return "?"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def latency(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}" if x != int(x) else str(int(x))


def when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def nice(hi: float, n: int = 5) -> tuple[float, list[float]]:
    """A round axis top >= ``hi`` and its ticks, about ``n`` of them."""
    if hi <= 0:
        return 1.0, [0.0, 0.5, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k = math.ceil(hi / step - 1e-9)
    return k * step, [i * step for i in range(k + 1)]


# -- SVG ------------------------------------------------------------------------------

W, H = 760, 300
STATUS_COLORS = {"done": "#2e7d32", "failed": "#c62828", "fallback": "#ef6c00", "skipped": "#9e9e9e",
                  "pending": "#90caf9"}
STACK = ("done", "fallback", "failed", "skipped", "pending")
PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
            "#1f77b4", "#2ca02c")


def attributes(**attrs: Any) -> str:
    """``key="value"`` pairs for an SVG element (``class_`` -> ``class``, ``_`` -> ``-``; None values left out)."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)


def num(x: float) -> str:
    return f"{x:.1f}"


def text(x: float, y: float, s: str, **attrs: Any) -> str:
    return f'<text{attributes(x=num(x), y=num(y), **attrs)}>{esc(s)}</text>'


def rect(x: float, y: float, w: float, h: float, fill: str, tip: str | None = None, cls: str = "mark") -> str:
    inner = f"<title>{esc(tip)}</title>" if tip else ""
    box = attributes(class_=cls, x=num(x), y=num(y), width=num(max(w, 0.5)), height=num(max(h, 0)), fill=fill)
    return f"<rect{box}>{inner}</rect>"


class Plot:
    """A plot area inside an ``<svg class="plot">``, with pixel mapping and axis helpers."""

    def __init__(self, kind: str, title: str, *, height: int = H, left: int = 64, right: int = 20,
                 top: int = 60, bottom: int = 48) -> None:
        self.kind, self.title, self.height = kind, title, height
        self.x0, self.x1, self.y0, self.y1 = left, W - right, top, height - bottom
        self.parts: list[str] = [text(12, 22, title, class_="title")]

    def svg(self) -> str:
        head = attributes(class_="plot", data_plot=self.kind, viewBox=f"0 0 {W} {self.height}", width=W,
                          height=self.height, role="img", aria_label=self.title)
        return f"<svg{head}><title>{esc(self.title)}</title>{''.join(self.parts)}</svg>"

    def no_data(self, why: str = "no data") -> str:
        mx, my = (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2
        self.parts.append(rect(self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0, "none", cls="frame"))
        self.parts.append(text(mx, my, why, class_="nodata", text_anchor="middle"))
        return self.svg()

    def y_axis(self, top: float, ticks: list[float], label: str) -> None:
        for v in ticks:
            y = self.y(v, top)
            self.parts.append(f'<line{attributes(class_="grid", x1=self.x0, x2=self.x1, y1=num(y), y2=num(y))}/>')
            self.parts.append(text(self.x0 - 6, y + 4, si(v), text_anchor="end"))
        cy = (self.y0 + self.y1) / 2
        self.parts.append(text(14, cy, label, class_="axlabel", text_anchor="middle",
                                transform=f"rotate(-90 14 {num(cy)})"))

    def x_axis(self, ticks: list[tuple[float, str]], label: str) -> None:
        self.parts.append(f'<line{attributes(class_="axis", x1=self.x0, x2=self.x1, y1=self.y1, y2=self.y1)}/>')
        for x, s in ticks:
            anchor = "end" if x > W - 30 else "middle"
            self.parts.append(f'<line{attributes(class_="axis", x1=num(x), x2=num(x), y1=self.y1, y2=self.y1 + 4)}/>')
            self.parts.append(text(x, self.y1 + 16, s, text_anchor=anchor))
        self.parts.append(text((self.x0 + self.x1) / 2, self.height - 8, label, class_="axlabel",
                                text_anchor="middle"))

    def legend(self, items: list[tuple[str, str]], y: float = 42) -> None:
        x = float(self.x0)
        for color, label in items:
            if x + 20 + 6.5 * len(label) > self.x1:
                break
            self.parts.append(rect(x, y - 9, 10, 10, color, cls="key"))
            self.parts.append(text(x + 14, y, label, class_="legend"))
            x += 28 + 6.5 * len(label)

    def y(self, v: float, top: float) -> float:
        return self.y1 - (v / top) * (self.y1 - self.y0) if top else self.y1


def time_axis(p: Plot, span_s: float) -> None:
    unit, div = ("s", 1.0) if span_s <= 600 else ("min", 60.0) if span_s <= 3 * 3600 else ("h", 3600.0)
    _, ticks = nice(span_s / div, 6)
    px = [(p.x0 + (t * div / span_s) * (p.x1 - p.x0), si(t)) for t in ticks if t * div <= span_s * 1.0001]
    p.x_axis(px, {"s": "seconds", "min": "minutes", "h": "hours"}[unit] + " since the run started")
