"""What a figure must satisfy to go on a projector, measured on the rendered artists: no two
texts overlap, none runs outside the figure, and a text written inside a box fits it."""

from __future__ import annotations

from itertools import combinations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

SLACK = 1.0  # pixels: anti-aliasing may touch, but not overlap


def _texts(figure: Figure) -> list[Text]:
    """The texts a viewer sees: not the tick labels of an axis that is switched off, nor
    those of ticks outside the view."""
    hidden: set[int] = set()
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            shown = ax.axison and axis.get_visible()
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not shown or not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [
        t
        for t in figure.findobj(Text)
        if isinstance(t, Text)
        and id(t) not in hidden
        and t.get_visible()
        and t.get_text().strip()
        and t.get_alpha() != 0
    ]


def _overlap(a: Bbox, b: Bbox) -> bool:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return bool(width > SLACK and height > SLACK)


def text_problems(figure: Figure) -> list[str]:
    """Every text that overlaps another, runs outside the figure, or spills out of the box
    it is written in (a Rectangle or rounded box whose area holds the text's anchor)."""
    FigureCanvasAgg(figure)
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    figure.draw(renderer)
    texts = [(t, t.get_window_extent(renderer)) for t in _texts(figure)]
    page = figure.bbox
    problems = [
        f"outside the figure: {t.get_text()!r}"
        for t, box in texts
        if box.x0 < page.x0 - SLACK
        or box.y0 < page.y0 - SLACK
        or box.x1 > page.x1 + SLACK
        or box.y1 > page.y1 + SLACK
    ]
    problems += [
        f"overlap: {a.get_text()!r} and {b.get_text()!r}"
        for (a, box_a), (b, box_b) in combinations(texts, 2)
        if _overlap(box_a, box_b)
    ]
    boxes = [
        p.get_window_extent(renderer)
        for p in figure.findobj(lambda a: isinstance(a, Rectangle | FancyBboxPatch))
        if p.get_visible()
        and p.axes is not None
        and p is not p.axes.patch
        and p.get_label() != "legend-frame"
    ]
    for t, box in texts:
        anchor = box.x0 + box.width / 2, box.y0 + box.height / 2
        holders = [b for b in boxes if b.contains(*anchor) and b.width < page.width / 2]
        tight = [b for b in holders if b.width * b.height < 4 * box.width * box.height]
        problems += [
            f"spills out of its box: {t.get_text()!r}"
            for b in tight
            if box.x0 < b.x0 - SLACK
            or box.x1 > b.x1 + SLACK
            or box.y0 < b.y0 - SLACK
            or box.y1 > b.y1 + SLACK
        ]
    return problems
