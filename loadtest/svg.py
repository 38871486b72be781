"""Charts as inline SVG, written by hand: no plotting library, no script, so
a report is one self-contained HTML file that any browser shows.

- :func:`line_chart`: several series over a shared x axis (gaps where a value
  is None), e.g. latency percentiles over time for each target;
- :func:`bar_chart`: grouped bars, e.g. one figure for each target side by side.

Every mark carries a ``<title>`` (a browser tooltip with the exact value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "6 3", "2 3", "8 3 2 3")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    color: str = PALETTE[0]
    dash: str = ""


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(v, 10))
        v += step
    return ticks


def fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _frame(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" {FONT}>',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]


def _no_data(parts: list[str], width: int, height: int) -> str:
    parts.append(
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">'
        "no data</text></svg>"
    )
    return "\n".join(parts)


def _legend(
    parts: list[str], items: list[tuple[str, str, str]], x0: float, y: float, right: float
) -> None:
    """Legend entries left to right, wrapping onto a second row at ``right``."""
    x = x0
    for label, color, dash in items:
        width = 30 + 6.5 * len(label)
        if x > x0 and x + width > right:
            x, y = x0, y + 14
        da = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{x}" y1="{y}" x2="{x + 18}" y2="{y}" stroke="{color}" '
            f'stroke-width="2"{da}/>'
        )
        parts.append(f'<text x="{x + 22}" y="{y + 4}">{escape(label)}</text>')
        x += width


def _axes(
    parts: list[str],
    box: tuple[float, float, float, float],
    yticks: list[float],
    ymap: object,
    y_label: str,
) -> None:
    left, top, right, bottom = box
    for v in yticks:
        y = ymap(v)  # type: ignore[operator]
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{fmt_num(v)}</text>')
    parts.append(
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#555"/>'
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#555"/>'
    )
    mid = (top + bottom) / 2
    parts.append(
        f'<text x="12" y="{mid}" text-anchor="middle" '
        f'transform="rotate(-90 12 {mid})">{escape(y_label)}</text>'
    )


def line_chart(
    series: list[Series],
    *,
    title: str,
    x_label: str = "seconds",
    y_label: str = "",
    width: int = 760,
    height: int = 280,
) -> str:
    """Lines (with a dot per point) for each series; None values break a line."""
    left, top, right, bottom = 62, 28, width - 14, height - 66
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in s.y if y is not None and math.isfinite(y)]
    parts = _frame(width, height, title)
    if not xs or not ys:
        return _no_data(parts, width, height)
    x0, x1 = min(0.0, min(xs)), max(xs)
    if x1 <= x0:
        x1 = x0 + 1
    yticks = nice_ticks(0.0, max(ys) * 1.05)
    y1 = yticks[-1]

    def xmap(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (right - left)

    def ymap(v: float) -> float:
        return bottom - (v / y1) * (bottom - top) if y1 > 0 else bottom

    _axes(parts, (left, top, right, bottom), yticks, ymap, y_label)
    for v in nice_ticks(x0, x1, 8):
        if v < x0 - 1e-9 or v > x1 + 1e-9:
            continue
        x = xmap(v)
        parts.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#555"/>'
            f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{fmt_num(v)}</text>'
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{bottom + 28}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    for s in series:
        da = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        run: list[str] = []
        runs: list[list[str]] = []
        dots: list[str] = []
        for x, y in zip(s.x, s.y, strict=False):
            if y is None or not math.isfinite(y):
                if run:
                    runs.append(run)
                run = []
                continue
            px, py = xmap(x), ymap(y)
            run.append(f"{px:.1f},{py:.1f}")
            dots.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{s.color}">'
                f"<title>{escape(s.label)}: {fmt_num(y)} at {fmt_num(x)}</title></circle>"
            )
        if run:
            runs.append(run)
        for r in runs:
            parts.append(
                f'<polyline fill="none" stroke="{s.color}" stroke-width="1.6"{da} '
                f'points="{" ".join(r)}"/>'
            )
        if len(dots) <= 300:
            parts.extend(dots)
    _legend(parts, [(s.label, s.color, s.dash) for s in series], left, height - 24, right)
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(
    categories: list[str],
    series: list[tuple[str, list[float | None]]],
    *,
    title: str,
    y_label: str = "",
    width: int = 760,
    height: int = 280,
    colors: Sequence[str] = PALETTE,
) -> str:
    """Grouped bars: for each category, one bar per series."""
    left, top, right, bottom = 62, 28, width - 14, height - 66
    vals = [v for _, vs in series for v in vs if v is not None and math.isfinite(v)]
    parts = _frame(width, height, title)
    if not categories or not vals:
        return _no_data(parts, width, height)
    yticks = nice_ticks(0.0, max(vals) * 1.08)
    y1 = yticks[-1]

    def ymap(v: float) -> float:
        return bottom - (v / y1) * (bottom - top) if y1 > 0 else bottom

    _axes(parts, (left, top, right, bottom), yticks, ymap, y_label)
    group = (right - left) / len(categories)
    bw = min(48.0, group * 0.8 / max(len(series), 1))
    for i, cat in enumerate(categories):
        gx = left + i * group + (group - bw * len(series)) / 2
        for j, (label, vs) in enumerate(series):
            v = vs[i] if i < len(vs) else None
            if v is None or not math.isfinite(v):
                continue
            y = ymap(v)
            color = colors[j % len(colors)]
            parts.append(
                f'<rect x="{gx + j * bw:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" '
                f'height="{max(bottom - y, 0.5):.1f}" fill="{color}">'
                f"<title>{escape(label)} / {escape(cat)}: {fmt_num(v)}</title></rect>"
            )
            if bw >= 26:
                parts.append(
                    f'<text x="{gx + j * bw + bw / 2 - 1:.1f}" y="{y - 3:.1f}" '
                    f'text-anchor="middle" font-size="9">{fmt_num(v)}</text>'
                )
        label = cat if len(cat) * 6 < group else cat[: max(3, int(group / 6) - 1)] + "…"
        parts.append(
            f'<text x="{left + i * group + group / 2:.1f}" y="{bottom + 15}" '
            f'text-anchor="middle"><title>{escape(cat)}</title>{escape(label)}</text>'
        )
    _legend(
        parts,
        [(label, colors[j % len(colors)], "") for j, (label, _) in enumerate(series)],
        left,
        height - 24,
        right,
    )
    parts.append("</svg>")
    return "\n".join(parts)
