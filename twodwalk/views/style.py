"""The one style table every figure and widget shares: the Okabe-Ito palette (safe for the
common colour-vision deficiencies), one style per paging level and per dimension, and what a
walk-grid cell that a cache served looks like. Meaning is carried by hatching, line styles,
marker shapes and labels as well, never by colour alone. No matplotlib here: widgets and
readouts use the styles without importing it.

Each hue means one thing in every figure:

    blue        the guest's page tables          vermillion   EPT
    bluish green the host's page tables          reddish purple shadow or bare-metal tables
    black       KVM's software steps (memslots)  yellow       a guest-physical mapping (GPM)
    sky blue    a paging-structure cache (PSC)   orange       a page-walk cache (PWC)

Paging levels are not a hue: they are shades of grey with their own hatch (and always a
label), so a level never reads as a dimension or a cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from twodwalk.engine.trace import PAGE_WALK_CACHE

# matplotlib's line styles: a name, or (offset, (on, off, ...)) in points
LineStyle = Literal["solid", "dashed", "dashdot", "dotted"] | tuple[float, tuple[float, ...]]

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
ORANGE, SKY_BLUE, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, BLACK = OKABE_ITO
GREY = "#BBBBBB"
FONT = 10  # the smallest text size: readable on a lecture projector
FIGSIZE = (9.0, 5.0)


@dataclass(frozen=True)
class Style:
    """How one category is drawn: colour, hatch, line style and label each carry the meaning;
    `tag` is the short text written inside a cell."""

    colour: str
    hatch: str = ""
    linestyle: LineStyle = "solid"
    label: str = ""
    tag: str = ""
    alpha: float = 1.0

    @property
    def face(self) -> tuple[float, float, float, float]:
        """The fill colour (a "#RRGGBB" string) with its transparency, as RGBA in 0..1."""
        rgb = [int(self.colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        return (rgb[0], rgb[1], rgb[2], self.alpha)


# One style per paging level, the same in every space: level 4 is the PML4 of the guest, of
# the host and of EPT alike, so the address fields, the grid and the graph match. Greys from
# dark (the root) to light, each with its hatch: no hue, which the dimensions own.
LEVEL_STYLES = {
    5: Style("#8C8C8C", "oo"),
    4: Style("#A6A6A6", "//"),
    3: Style("#BFBFBF", "\\\\"),
    2: Style("#D9D9D9", ".."),
    1: Style("#F0F0F0", "xx"),
}
PLAIN_STYLE = Style("#FFFFFF")  # what belongs to no level: the page offset, the data row
UNUSED_BITS_STYLE = Style(GREY)

# The hardware dimensions, and KVM's software path that fills EPT in (views/graph.py too).
DIMENSION_STYLES = {
    "guest": Style(BLUE, "", "solid", "guest page tables (hardware)"),
    "ept": Style(VERMILLION, "//", "dashed", "EPT (hardware)"),
    "native": Style(PURPLE, "..", (0, (8, 2)), "shadow or native tables (hardware)"),
    "memslot": Style(BLACK, "", "dashdot", "KVM memslot lookup (software)"),
    "host": Style(GREEN, "", "dotted", "host page tables (KVM software path)"),
    "kvm-walk": Style(BLUE, "", (0, (3, 1, 1, 1, 1, 1)), "guest tables read by KVM (software)"),
    "link": Style("#777777", "", (0, (1, 3)), "CR3, EPTP or a cache: no memory reference"),
}
HARDWARE_DIMENSIONS = ("guest", "ept", "native")

# What served a cell of the walk grid besides memory (the names `TableRead.cached` uses).
GUEST_PHYSICAL = "guest-physical"
PSC = "paging-structure cache"
CELL_STYLES = {
    GUEST_PHYSICAL: Style(
        YELLOW, "++", label="GPM: guest-physical mapping, no EPT walk", tag="GPM"
    ),
    PSC: Style(SKY_BLUE, "--", label="PSC: paging-structure cache, reads skipped", tag="PSC"),
    PAGE_WALK_CACHE: Style(
        ORANGE, "oo", label="PWC: page-walk cache (AMD-style), no memory read", tag="PWC"
    ),
    "data": Style("#FFFFFF", "", "dashed", "the data access (not a walk reference)", "data"),
}
EMPTY_CELL = Style("#FFFFFF", "", "dotted", "not read: the walk ended above, or stopped")
STOP_MARKER = "X"
