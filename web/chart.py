"""Charts as SVG pictures drawn on the server (no script): a line or bars over time.

Colours are presentation attributes (not ``style``), so the pages' Content-Security-Policy
needs no inline styles; every text is escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

W, H = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 78, 10, 24, 28


def svg_chart(title: str, xs: Sequence[float], ys: Sequence[float], fmt: Callable[[float], str],
              xfmt: Callable[[float], str], bars: bool = False, colour: str = "#2b6cb0") -> Markup:
    """An SVG picture of ``ys`` over ``xs`` (seconds since the epoch, ascending) with the title,
    the y range labelled by ``fmt`` and the x range by ``xfmt``; bars or a line."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
             f'<text x="{LEFT}" y="15" font-size="13" font-weight="bold" fill="#222">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
             'fill="#fafafa" stroke="#ccc"/>']
    if not xs:
        parts.append(f'<text x="{LEFT + 10}" y="{TOP + 30}" font-size="12" fill="#666">no points yet</text></svg>')
        return Markup("".join(parts))
    x0, x1 = min(xs), max(xs)
    y1 = max(max(ys), 1e-9)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (pw * (x - x0) / (x1 - x0) if x1 > x0 else pw / 2)

    def py(y: float) -> float:
        return TOP + ph - ph * (y / y1)

    if bars:
        bw = max(1.0, min(12.0, pw / max(1, len(xs)) * 0.8))
        for x, y in zip(xs, ys):
            parts.append(f'<rect x="{px(x) - bw / 2:.1f}" y="{py(y):.1f}" width="{bw:.1f}" '
                         f'height="{TOP + ph - py(y):.1f}" fill="{colour}"/>')
    else:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{colour}"/>')
    parts.append(f'<text x="{LEFT - 4}" y="{TOP + 10}" font-size="11" text-anchor="end" fill="#444">'
                 f'{escape(fmt(y1))}</text>')
    parts.append(f'<text x="{LEFT - 4}" y="{TOP + ph}" font-size="11" text-anchor="end" fill="#444">'
                 f'{escape(fmt(0))}</text>')
    parts.append(f'<text x="{LEFT}" y="{H - 8}" font-size="11" fill="#444">{escape(xfmt(x0))}</text>')
    parts.append(f'<text x="{W - RIGHT}" y="{H - 8}" font-size="11" text-anchor="end" fill="#444">'
                 f'{escape(xfmt(x1))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
