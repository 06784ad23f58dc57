"""Server-rendered SVG charts for the status page: pure functions from numbers to markup.

Each chart is an ``<svg>`` with a ``viewBox`` (it scales to its container, phones
included), a ``<title>`` and ``role="img"`` for screen readers, and classes that the
page's inline CSS colours. Text passed in is escaped here; callers pass plain strings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 420
"""viewBox width of every chart; heights depend on the data."""
_FONT = 13


@dataclass(frozen=True, slots=True)
class Segment:
    """One coloured part of a bar: ``css`` is the class that colours it."""

    value: float
    css: str
    label: str


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    segments: tuple[Segment, ...]
    title: str = ""

    @property
    def total(self) -> float:
        return sum(s.value for s in self.segments)


def nice_max(value: float) -> float:
    """The smallest 1/2/5 x 10^n not below ``value`` (an axis's top)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        top = step * 10.0**exponent
        if top >= value:
            return top
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


def _num(value: float) -> str:
    return f"{value:g}" if value < 1e4 else f"{value / 1000:.0f}k"


def _svg(height: float, title: str, body: list[str]) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height:.0f}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg" '
        f'font-size="{_FONT}"><title>{escape(title)}</title>' + "".join(body) + "</svg>"
    )


def empty_chart(title: str, message: str) -> str:
    return _svg(
        60,
        title,
        [
            f'<text class="muted" x="{WIDTH / 2}" y="34" text-anchor="middle">{escape(message)}</text>'
        ],
    )


def horizontal_bars(title: str, bars: Sequence[Bar]) -> str:
    """One stacked horizontal bar per item, labelled on the left, total on the right."""
    if not bars or not any(b.total for b in bars):
        return empty_chart(title, "nothing to show yet")
    label_w, total_w, row_h, gap, top = 96.0, 48.0, 20.0, 8.0, 6.0
    plot_w = WIDTH - label_w - total_w
    scale = plot_w / max(b.total for b in bars)
    body: list[str] = []
    for i, bar in enumerate(bars):
        y = top + i * (row_h + gap)
        body.append(
            f'<text x="{label_w - 6}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">'
            f"{escape(bar.label)}</text>"
        )
        x = label_w
        for seg in bar.segments:
            if seg.value <= 0:
                continue
            w = max(seg.value * scale, 1.0)
            body.append(
                f'<rect class="{seg.css}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                f'height="{row_h}"><title>{escape(bar.label)} {escape(seg.label)}: '
                f"{seg.value:g}</title></rect>"
            )
            x += w
        body.append(
            f'<text class="muted" x="{x + 4:.1f}" y="{y + row_h / 2 + 4:.1f}">'
            f"{_num(bar.total)}</text>"
        )
    height = top * 2 + len(bars) * (row_h + gap) - gap
    return _svg(height, title, body)


def _axis(
    top: float, bottom: float, left: float, right: float, y_max: float, unit: str
) -> list[str]:
    """Horizontal grid lines at 0, 1/2 and 1 of ``y_max`` with labels."""
    out = []
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        out.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="muted" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_num(frac * y_max)}{escape(unit)}</text>"
        )
    return out


def column_chart(
    title: str,
    columns: Sequence[Bar],
    *,
    unit: str = "",
    first_label: str = "",
    last_label: str = "",
) -> str:
    """Vertical (stacked) columns, oldest left; x labels only at both ends."""
    if not columns or not any(c.total for c in columns):
        return empty_chart(title, "nothing to show yet")
    left, right, top, bottom, height = 46.0, WIDTH - 6.0, 8.0, 130.0, 152.0
    y_max = nice_max(max(c.total for c in columns))
    step = (right - left) / len(columns)
    width = max(step * 0.75, 1.0)
    body = _axis(top, bottom, left, right, y_max, unit)
    for i, column in enumerate(columns):
        x = left + i * step + (step - width) / 2
        y = bottom
        for seg in column.segments:
            if seg.value <= 0:
                continue
            h = max(seg.value / y_max * (bottom - top), 1.0)
            y -= h
            tip = column.title or column.label
            body.append(
                f'<rect class="{seg.css}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{h:.1f}"><title>{escape(tip)}: {escape(seg.label)} '
                f"{seg.value:g}{escape(unit)}</title></rect>"
            )
    body.append(
        f'<text class="muted" x="{left}" y="{height - 4}">{escape(first_label)}</text>'
        f'<text class="muted" x="{right}" y="{height - 4}" text-anchor="end">'
        f"{escape(last_label)}</text>"
    )
    return _svg(height, title, body)


def diverging_chart(
    title: str,
    up: Sequence[float],
    down: Sequence[float],
    *,
    up_css: str,
    down_css: str,
    tips: Sequence[str],
    first_label: str = "",
    last_label: str = "",
) -> str:
    """Columns above the axis for ``up`` and below it for ``down``, oldest left."""
    if not up or not (any(up) or any(down)):
        return empty_chart(title, "no transitions in the last 7 days")
    left, right, top, bottom, height = 46.0, WIDTH - 6.0, 8.0, 160.0, 182.0
    mid = (top + bottom) / 2
    y_max = nice_max(max(*up, *down))
    half = mid - top
    step = (right - left) / len(up)
    width = max(step * 0.75, 1.0)
    body = [
        f'<line class="grid" x1="{left}" x2="{right}" y1="{top}" y2="{top}"/>'
        f'<line class="grid" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>'
        f'<line class="axis" x1="{left}" x2="{right}" y1="{mid}" y2="{mid}"/>'
        f'<text class="muted" x="{left - 4}" y="{top + 4}" text-anchor="end">{_num(y_max)}</text>'
        f'<text class="muted" x="{left - 4}" y="{mid + 4}" text-anchor="end">0</text>'
        f'<text class="muted" x="{left - 4}" y="{bottom + 4}" text-anchor="end">'
        f"{_num(y_max)}</text>"
    ]
    for i, (u, d) in enumerate(zip(up, down, strict=True)):
        x = left + i * step + (step - width) / 2
        tip = escape(tips[i]) if i < len(tips) else ""
        if u:
            h = max(u / y_max * half, 1.0)
            body.append(
                f'<rect class="{up_css}" x="{x:.1f}" y="{mid - h:.1f}" width="{width:.1f}" '
                f'height="{h:.1f}"><title>{tip}: {u:g} went offline</title></rect>'
            )
        if d:
            h = max(d / y_max * half, 1.0)
            body.append(
                f'<rect class="{down_css}" x="{x:.1f}" y="{mid:.1f}" width="{width:.1f}" '
                f'height="{h:.1f}"><title>{tip}: {d:g} came online</title></rect>'
            )
    body.append(
        f'<text class="muted" x="{left}" y="{height - 4}">{escape(first_label)}</text>'
        f'<text class="muted" x="{right}" y="{height - 4}" text-anchor="end">'
        f"{escape(last_label)}</text>"
    )
    return _svg(height, title, body)
