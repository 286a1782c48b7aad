"""Inline SVG of the panels of :mod:`weightgeo.render.panels`: no dependency, no network, small files.

Each painter returns one ``<svg>`` element (a string) that reads on its own: a title, axis names, tick labels,
a legend with the runs' short labels, and a native tooltip (``<title>``) on every heatmap cell with the
tensor's name and value or why it was not measured. Cells that were not measured are hatched grey, never
coloured as a value.

>>> from weightgeo.render.panels import Series, LinePanel
>>> svg = lines_svg(LinePanel("s", "stable rank", "", "step", "stable rank", [Series("run", [1, 2], [3.0, 4.0])]))
>>> svg.startswith("<svg") and "stable rank" in svg and "</svg>" in svg
True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from html import escape

from .cells import NOT_MEASURED
from .panels import BarPanel, HeatmapPanel, LinePanel, Panel, Scale, value_text

__all__ = ["panel_svg", "heatmap_svg", "bars_svg", "lines_svg", "PALETTE", "colour", "nice_ticks", "run_colour"]

#: run colours (matplotlib's tab10), in label order, the same on every panel
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
# viridis at 9 stops: perceptually even, readable in grey and by colour-blind readers
_VIRIDIS = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)
_FONT = 'font-family="system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"'
_ids = itertools.count()


def colour(t: float) -> str:
    """The viridis colour at ``t`` in [0, 1], as ``#rrggbb``."""
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (b - a) * f) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def _t(x: float, y: float, text: str, *, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{escape(text)}</text>'


def _svg(width: float, height: float, body: list[str], *, title: str, kind: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="figure {kind}" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(title)}" {_FONT}>'
        + "".join(body)
        + "</svg>"
    )


def nice_ticks(lo: float, hi: float, n: int = 5, *, log: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (powers of ten on a log axis)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if log and lo > 0:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (b - a) // 6 + 1)
        return [10.0**e for e in range(a, b + 1, step)]
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out = []
    v = start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def _tick_text(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-2:
        m, e = f"{v:.1e}".split("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    return f"{v:.3g}"


# ------------------------------------------------------------------------------------------------------------
# heatmaps
def _hatch(pid: str) -> str:
    return (
        f'<defs><pattern id="{pid}" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#eeeeee"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#bbbbbb" stroke-width="2"/></pattern></defs>'
    )


def _colourbar(x: float, y: float, h: float, scale: Scale, unit: str) -> list[str]:
    out = []
    n = 24
    for i in range(n):
        t0 = i / n
        out.append(
            f'<rect x="{x:.1f}" y="{y + h * (1 - (i + 1) / n):.1f}" width="12" height="{h / n + 0.5:.1f}" '
            f'fill="{colour(t0 + 0.5 / n)}"/>'
        )
    out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="12" height="{h:.1f}" fill="none" stroke="#888"/>')
    ticks = nice_ticks(scale.lo, scale.hi, 5, log=scale.log)
    ticks = [t for t in ticks if scale.lo - 1e-12 <= t <= scale.hi * (1 + 1e-9) + 1e-12]
    if len(ticks) < 3:  # a narrow log range: label its ends too, where they do not collide
        ends = [
            t for t in (scale.lo, scale.hi) if all(h * abs(scale.position(t) - scale.position(u)) > 11 for u in ticks)
        ]
        ticks = sorted(ticks + ends)
    if scale.hi == scale.lo:
        ticks = [scale.lo]
    for t in ticks:
        ty = y + h * (1 - scale.position(t))
        out.append(f'<line x1="{x + 12:.1f}" y1="{ty:.1f}" x2="{x + 16:.1f}" y2="{ty:.1f}" stroke="#555"/>')
        out.append(_t(x + 18, ty + 4, _tick_text(t) + unit, size=10))
    return out


def heatmap_svg(panel: HeatmapPanel, *, max_width: int = 1100) -> str:
    """Every run's grid side by side on the panel's shared scale, with one colour bar."""
    grids = panel.grids
    layers = grids[0][1].layers
    modules = grids[0][1].modules
    nr, nc = len(layers), len(modules)
    label_w = 44
    cw = max(12.0, min(30.0, (max_width - 120 - label_w * len(grids)) / max(1, nc * len(grids))))
    ch = max(7.0, min(16.0, 360 / max(nr, 1)))
    top = 34
    longest = max((len(m) for m in modules), default=4)
    bottom = 16 + 5.2 * longest  # module names are written at -55°
    gap = 18
    grid_w = label_w + nc * cw
    width = len(grids) * (grid_w + gap) + 90
    height = top + nr * ch + bottom
    pid = f"hatch{next(_ids)}"
    body = [_hatch(pid)]
    for gi, (label, g) in enumerate(grids):
        x0 = gi * (grid_w + gap)
        body.append(_t(x0 + label_w + nc * cw / 2, 14, label, size=12, anchor="middle", extra='font-weight="600"'))
        for i, lay in enumerate(g.layers):
            y = top + i * ch
            every = max(1, math.ceil(nr / 24))  # at most ~24 layer labels
            if lay is None or i % every == 0:
                name = "other" if lay is None else f"L{lay}"
                body.append(_t(x0 + label_w - 4, y + ch / 2 + 3.5, name, size=9 if ch < 11 else 10, anchor="end"))
            for j in range(nc):
                v, note = g.values[i][j], g.notes[i][j]
                x = x0 + label_w + j * cw
                if not note:  # no tensor here at all
                    continue
                fill = f"url(#{pid})" if v is None else colour(panel.scale.position(v))
                tip = note if v is not None else note.replace(NOT_MEASURED, "not measured")
                body.append(
                    f'<rect class="cell{" nm" if v is None else ""}" x="{x:.1f}" y="{y:.1f}" width="{cw - 1:.1f}" '
                    f'height="{ch - 1:.1f}" fill="{fill}"><title>{escape(tip)}</title></rect>'
                )
        for j, mod in enumerate(g.modules):
            x = x0 + label_w + j * cw + cw / 2
            y = top + nr * ch + 6
            body.append(_t(x, y, mod, size=10, anchor="end", extra=f'transform="rotate(-55 {x:.1f} {y:.1f})"'))
        body.append(_t(x0 + 2, top - 6, "layer", size=9, extra='fill="#666"') if gi == 0 else "")
    body += _colourbar(len(grids) * (grid_w + gap) + 4, top, nr * ch, panel.scale, panel.unit)
    return _svg(width, height, body, title=panel.title, kind="heatmap")


# ------------------------------------------------------------------------------------------------------------
# axes for bars and lines
class _Axes:
    def __init__(self, lo: float, hi: float, *, log: bool, x0: float, y0: float, w: float, h: float):
        if log and lo > 0:
            lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        elif hi == lo:
            lo, hi = lo - 1, hi + 1
        self.lo, self.hi, self.log = lo, hi, log and lo > 0
        self.x0, self.y0, self.w, self.h = x0, y0, w, h

    def y(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.y0 + self.h * (1 - t)

    def frame(self, ylabel: str) -> list[str]:
        out = [
            f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y0 + self.h}" stroke="#444"/>',
            f'<line x1="{self.x0}" y1="{self.y0 + self.h}" x2="{self.x0 + self.w}" y2="{self.y0 + self.h}" '
            f'stroke="#444"/>',
        ]
        for t in nice_ticks(self.lo, self.hi, 5, log=self.log):
            if not (self.lo - 1e-12 <= t <= self.hi * (1 + 1e-9) + 1e-12):
                continue
            ty = self.y(t)
            out.append(f'<line x1="{self.x0}" y1="{ty:.1f}" x2="{self.x0 + self.w}" y2="{ty:.1f}" stroke="#e3e3e3"/>')
            out.append(_t(self.x0 - 5, ty + 3.5, _tick_text(t), size=10, anchor="end"))
        cy = self.y0 + self.h / 2
        out.append(_t(14, cy, ylabel, size=11, anchor="middle", extra=f'transform="rotate(-90 14 {cy:.1f})"'))
        return out


def _legend(x: float, y: float, items: Sequence[tuple[str, str, str]]) -> list[str]:
    """Legend entries (label, colour, kind: 'box' | 'line' | 'dash' | 'dot') in a row from (x, y)."""
    out = []
    for label, col, kind in items:
        if kind == "box":
            out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{col}"/>')
        else:
            dash = {"dash": ' stroke-dasharray="5 3"', "dot": ' stroke-dasharray="2 2"'}.get(kind, "")
            out.append(
                f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 16:.1f}" y2="{y - 4:.1f}" stroke="{col}" '
                f'stroke-width="2"{dash}/>'
            )
        out.append(_t(x + 20, y, label, size=11))
        x += 30 + 6.3 * len(label)
    return out


def _range(values: Sequence[float], *, log: bool, zero: bool) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if zero and not log:
        lo = min(lo, 0.0)
    return lo, hi


def bars_svg(panel: BarPanel, colours: Mapping[str, str] | None = None) -> str:
    """Grouped bars (categories on x, runs side by side); a dashed baseline when the panel has one."""
    cats, series = panel.categories, panel.series
    n = max(len(series), 1)
    slot = max(26.0, min(64.0, 500 / max(len(cats), 1)))
    x0, top = 60.0, 28.0
    w, h = slot * len(cats), 180.0
    longest = max((len(c) for c in cats), default=4)
    bottom = 16 + min(90, 6 * longest * 0.8)
    width = x0 + w + 20
    values = [v for _, ys in series for v in ys if v is not None]
    if panel.baseline:
        values.append(panel.baseline[0])
    lo, hi = _range(values, log=panel.log, zero=True)
    ax = _Axes(lo, hi * (1.08 if not panel.log else 1), log=panel.log, x0=x0, y0=top, w=w, h=h)
    body = ax.frame(panel.ylabel)
    bw = slot * 0.8 / n
    base_y = ax.y(max(ax.lo, 0.0)) if not ax.log else ax.y0 + ax.h
    for si, (label, ys) in enumerate(series):
        col = run_colour(label, si, colours)
        for ci, v in enumerate(ys):
            bx = x0 + ci * slot + slot * 0.1 + si * bw
            if v is None:
                body.append(_t(bx + bw / 2, base_y - 3, "n/m", size=8, anchor="middle", extra='fill="#888"'))
                continue
            y = ax.y(v)
            body.append(
                f'<rect x="{bx:.1f}" y="{min(y, base_y):.1f}" width="{bw - 1:.1f}" height="{abs(base_y - y):.1f}" '
                f'fill="{col}"><title>{escape(f"{label}, {cats[ci]}: {value_text(v)}")}</title></rect>'
            )
    for ci, c in enumerate(cats):
        cx, cy = x0 + ci * slot + slot / 2, top + h + 8
        body.append(_t(cx, cy, c, size=10, anchor="end", extra=f'transform="rotate(-35 {cx:.1f} {cy:.1f})"'))
    legend = [(label, run_colour(label, i, colours), "box") for i, (label, _) in enumerate(series)]
    if panel.baseline:
        by = ax.y(panel.baseline[0])
        body.append(f'<line x1="{x0}" y1="{by:.1f}" x2="{x0 + w}" y2="{by:.1f}" stroke="#555" stroke-dasharray="5 3"/>')
        legend.append((panel.baseline[1], "#555", "dash"))
    body += _legend(x0, 14, legend)
    width = max(width, x0 + sum(30 + 6.3 * len(lb) for lb, _, _ in legend))
    return _svg(width, top + h + bottom, body, title=panel.title, kind="bars")


def lines_svg(panel: LinePanel, colours: Mapping[str, str] | None = None) -> str:
    """Curves over training; the threshold dashed; each series' marker (the locking onset) a dotted vertical
    line in the run's colour with its label."""
    x0, top, w, h = 60.0, 30.0, 290.0, 200.0
    xs = [x for s in panel.series for x in s.x]
    ys = [y for s in panel.series for y in s.y if y is not None]
    if panel.hline:
        ys.append(panel.hline[0])
    lo, hi = panel.ylim if panel.ylim else _range(ys, log=panel.log, zero=False)
    if not panel.ylim and not panel.log:  # a little air so that flat curves do not sit on the frame
        pad = 0.06 * (hi - lo) if hi > lo else 0.5 * abs(hi) or 1.0
        lo, hi = lo - pad, hi + pad
    ax = _Axes(lo, hi, log=panel.log, x0=x0, y0=top, w=w, h=h)
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if xlo == xhi:
        xlo, xhi = xlo - 1, xhi + 1

    def px(v: float) -> float:
        return x0 + w * (v - xlo) / (xhi - xlo)

    body = ax.frame(panel.ylabel)
    for t in nice_ticks(xlo, xhi, 5):
        if xlo - 1e-9 <= t <= xhi + 1e-9:
            body.append(_t(px(t), top + h + 14, _tick_text(t), size=10, anchor="middle"))
    body.append(_t(x0 + w / 2, top + h + 32, panel.xlabel, size=11, anchor="middle"))
    legend: list[tuple[str, str, str]] = []
    markers = 0
    for si, s in enumerate(panel.series):
        col = run_colour(s.label, si, colours)
        pts = [(px(x), ax.y(y)) for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y)]
        if pts:
            body.append(
                f'<polyline fill="none" stroke="{col}" stroke-width="2" points="'
                + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
                + '"/>'
            )
            for (a, b), x, y in zip(pts, [x for x, y in zip(s.x, s.y) if y is not None], s.y):
                body.append(
                    f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="{col}"><title>'
                    f"{escape(f'{s.label}: {_tick_text(x)} → {value_text(y)}')}</title></circle>"
                )
        legend.append((s.label, col, "line"))
        if s.marker is not None:
            mx = px(s.marker[0])
            body.append(
                f'<line class="onset" x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + h}" stroke="{col}" '
                f'stroke-dasharray="2 2" stroke-width="1.5"/>'
            )
            halo = f'fill="{col}" stroke="white" stroke-width="3" paint-order="stroke"'
            body.append(_t(mx + 3, top + h - 6 - 13 * markers, s.marker[1], size=10, extra=halo))
            markers += 1
    if panel.hline:
        hy = ax.y(panel.hline[0])
        body.append(f'<line x1="{x0}" y1="{hy:.1f}" x2="{x0 + w}" y2="{hy:.1f}" stroke="#555" stroke-dasharray="5 3"/>')
        legend.append((panel.hline[1], "#555", "dash"))
    body += _legend(x0, 16, legend)
    width = max(x0 + w + 20, x0 + sum(30 + 6.3 * len(lb) for lb, _, _ in legend))
    return _svg(width, top + h + 42, body, title=panel.title, kind="lines")


def run_colour(label: str, index: int, colours: Mapping[str, str] | None = None) -> str:
    """A run's colour: from ``colours`` (one page, one colour per run whichever panels it is in), else by
    its index in the panel."""
    if colours and label in colours:
        return colours[label]
    return PALETTE[index % len(PALETTE)]


def panel_svg(panel: Panel, colours: Mapping[str, str] | None = None) -> str:
    """Paint any panel; ``colours``: run label -> colour, shared by every panel of a page."""
    if isinstance(panel, HeatmapPanel):
        return heatmap_svg(panel)
    if isinstance(panel, BarPanel):
        return bars_svg(panel, colours)
    return lines_svg(panel, colours)
