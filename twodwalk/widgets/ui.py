"""The widgets: thin ipywidgets layers that wire controls to the models of this package.

Each helper keeps its model as `.model` and its controls as attributes (`gva_text`,
`next_button`, ...), and shows itself in a notebook as its `.widget` (a VBox), so one line
such as `tw.widgets.AddressExplorer("qemu")` is enough. Callbacks never raise: the model turns
bad input into one sentence, shown in an HTML line of class "twodwalk-error".

Figures are the views' pyplot-free matplotlib Figures, rendered to PNG and put in an Output
widget's `outputs` directly: a Figure made without pyplot has no PNG formatter in IPython
unless the inline backend happens to be loaded, and outputs set this way need no kernel, so
the callbacks run the same in plain pytest. Colours come from the Okabe-Ito palette the plots
use, and every colour is doubled by a word or a symbol.
"""

from __future__ import annotations

import base64
import html
import io
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from twodwalk.engine.machine import Machine
from twodwalk.engine.processor import AccessResult
from twodwalk.engine.units import PAGE_SIZE
from twodwalk.errors import TwodwalkError, parse_int
from twodwalk.exercises import Question
from twodwalk.views.style import BLACK
from twodwalk.views.text import size_text
from twodwalk.widgets.common import Source
from twodwalk.widgets.exercise import ExerciseModel
from twodwalk.widgets.explorer import CPLS, KINDS, ExplorerModel, ExplorerRequest
from twodwalk.widgets.inspector import InspectorModel
from twodwalk.widgets.stepper import StepperModel
from twodwalk.widgets.whatif import WHAT_IFS, Change, WhatIfModel

ERROR_CLASS = "twodwalk-error"
FEEDBACK_CLASS = "twodwalk-feedback"
PNG_CACHE_SIZE = 64
Output = dict[str, Any]  # one nbformat output (display_data or stream)


# --- shared pieces -----------------------------------------------------------------------------


WIDGET_DPI = 66  # a widget's figure, small enough to fit a laptop screen with its controls


def png_output(figure: Figure) -> Output:
    """A figure as an nbformat display_data output: the PNG, and its title as text."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=WIDGET_DPI)
    title = next((ax.get_title() for ax in figure.axes if ax.get_title()), "figure")
    return {
        "output_type": "display_data",
        "data": {
            "image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "text/plain": f"<figure: {title}>",
        },
        "metadata": {},
    }


class RenderedFigures:
    """PNGs by what their figure shows. Rasterising a walk grid costs about 100 times the
    walk itself, and sliding over a mapping draws the same grid again and again (a full 4x4
    walk looks the same at every GVA), so a figure whose model gives a key is drawn once."""

    def __init__(self, size: int = PNG_CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Output] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Figure]) -> Output:
        if key is None:
            return png_output(make())
        if key in self._items:
            self._items.move_to_end(key)
        else:
            self._items[key] = png_output(make())
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return self._items[key]


RENDERED = RenderedFigures()


def show_figure(out: Any, make: Callable[[], Figure], key: Hashable = None) -> None:
    """Show the figure `make` draws in an Output widget (`key`: see `RenderedFigures`)."""
    out.outputs = (RENDERED.get(key, make),)


def show_text(out: Any, text: str) -> None:
    """Show plain text in an Output widget, as a cell's printed output."""
    out.outputs = (
        ({"output_type": "stream", "name": "stdout", "text": text + "\n"},) if text else ()
    )


def error_line() -> Any:
    line = widgets.HTML(value="")
    line.add_class(ERROR_CLASS)
    return line


def show_error(line: Any, message: str) -> None:
    """One sentence with a warning sign and a vermillion bar; empty when all is well."""
    line.value = (
        f'<div class="{ERROR_CLASS}" role="alert" style="border-left: 4px solid {BLACK};'
        f' padding-left: 6px">&#9888; {html.escape(message)}</div>'
        if message
        else ""
    )


def preformatted(text: str) -> str:
    return f'<pre style="white-space: pre-wrap; margin: 0">{html.escape(text)}</pre>'


def prose(text: str) -> str:
    """A question as a reader meets it: sentences as wrapped prose, and the indented lines
    (a table dump, a list of entries) as monospace blocks that keep their columns and
    scroll sideways rather than break a number in two."""
    blocks: list[tuple[bool, list[str]]] = []
    for line in text.splitlines():
        literal = line.startswith(" ")
        if blocks and blocks[-1][0] == literal:
            blocks[-1][1].append(line)
        else:
            blocks.append((literal, [line]))
    parts = [
        f'<pre style="white-space: pre; overflow-x: auto; margin: 0 0 0.5em 0">'
        f"{html.escape(chr(10).join(lines))}</pre>"
        if literal
        else f'<p style="margin: 0 0 0.5em 0">{html.escape(" ".join(lines))}</p>'
        for literal, lines in blocks
    ]
    return "".join(parts)


class Panel:
    """A helper shown in a notebook as its `widget`. `show()` makes the controls and outputs
    show the model's state; `quietly()` lets code set controls without their observers
    running (observers check `busy`)."""

    widget: Any
    busy = False

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def show(self) -> None:
        raise NotImplementedError

    def then_show(self, action: Callable[[], object]) -> None:
        """Run a model action (a button's), then show where it left the model."""
        action()
        self.show()

    @contextmanager
    def quietly(self) -> Iterator[None]:
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


# --- AddressExplorer ---------------------------------------------------------------------------


class AddressExplorer(Panel):
    """Type or slide a GVA, pick the access, CPL and EPT or shadow paging: the walk grid and
    the monitor's lines follow each change."""

    def __init__(self, machine_or_scenario: Source = None) -> None:
        self.model = model = ExplorerModel(machine_or_scenario)
        request = model.request
        # Every keystroke reaches the kernel (continuous_update), so the typed address is
        # known when Enter's "submit" message comes: JupyterLite sends no change on Enter.
        self.gva_text = widgets.Text(value=request.gva, description="GVA", continuous_update=True)
        self.region_dropdown = widgets.Dropdown(
            options=[
                (f"{r.name}: {r.start:#x} (+{size_text(r.end - r.start)})", i)
                for i, r in enumerate(model.regions)
            ],
            description="mapping",
            layout=widgets.Layout(width="520px"),
        )
        self.page_slider = widgets.IntSlider(
            min=0, max=0, description="page", continuous_update=False
        )
        compact = {"button_width": "64px"}
        self.kind_buttons = widgets.ToggleButtons(
            options=list(KINDS), value=request.kind, description="access", style=compact
        )
        self.cpl_buttons = widgets.ToggleButtons(
            options=[(f"CPL {cpl}", cpl) for cpl in CPLS],
            value=request.cpl,
            description="CPL",
            style=compact,
        )
        self.value_text = widgets.Text(
            value=request.value,
            description="value",
            placeholder="for a write, e.g. 0x2a",
            continuous_update=False,
        )
        self.paging_buttons = widgets.ToggleButtons(
            options=[("EPT", True), ("shadow", False)],
            value=request.tdp,
            description="paging",
            tooltips=["EPT on: the two-dimensional walk", "EPT off: KVM's shadow tables"],
            style=compact,
        )
        self.flush_checkbox = widgets.Checkbox(
            value=request.flush_tlb,
            description="flush every translation cache first (a cold walk)",
            indent=False,
            layout=widgets.Layout(width="auto"),
        )
        self.walk_button = widgets.Button(description="walk again")
        self.error_line = error_line()
        self.walk_output = widgets.Output()
        self.text_output = widgets.Output(
            layout=widgets.Layout(max_height="520px", overflow="auto")
        )
        self.summary_line = widgets.HTML()
        self.views = widgets.Tab(children=[self.walk_output, self.text_output])
        self.views.set_title(0, "walk grid")
        self.views.set_title(1, "what happened, and why")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.gva_text, self.walk_button, self.flush_checkbox]),
                widgets.HBox([self.region_dropdown, self.page_slider]),
                widgets.HBox([self.kind_buttons, self.cpl_buttons]),
                widgets.HBox([self.paging_buttons, self.value_text]),
                self.error_line,
                self.summary_line,
                self.views,
            ]
        )
        self.gva_text.observe(self._on_typing, names="value")
        self.gva_text.on_msg(self._on_submit)
        for control in (
            self.kind_buttons,
            self.cpl_buttons,
            self.value_text,
            self.paging_buttons,
            self.flush_checkbox,
        ):
            control.observe(self._on_change, names="value")
        self.region_dropdown.observe(self._on_region, names="value")
        self.page_slider.observe(self._on_page, names="value")
        self.walk_button.on_click(lambda _: self.walk())
        self.walk()

    def walk(self) -> None:
        """Make the access the controls describe and show what the engine did."""
        self.model.run(
            ExplorerRequest(
                self.gva_text.value,
                self.kind_buttons.value,
                self.cpl_buttons.value,
                self.value_text.value,
                self.paging_buttons.value,
                self.flush_checkbox.value,
            )
        )
        self.show()

    def show(self) -> None:
        model = self.model
        with self.quietly():
            self.paging_buttons.value = model.tdp  # a refused switch springs back
            if model.gva is not None:
                self._follow(model.gva)
        self.value_text.disabled = self.kind_buttons.value != "write"
        show_error(self.error_line, model.error)
        if model.result is None:
            self.walk_output.outputs = self.text_output.outputs = ()
            self.summary_line.value = ""
            return
        show_figure(self.walk_output, model.figure, model.figure_key())
        show_text(self.text_output, model.text)
        self.summary_line.value = preformatted(model.summary)

    def _follow(self, gva: int) -> None:
        """Point the mapping picker and the page slider at `gva`, if a mapping holds it."""
        place = self.model.locate(gva)
        if place is not None:
            self.region_dropdown.value = place[0]
            self._fit_slider(place[0])
            self.page_slider.value = place[1]

    def _fit_slider(self, region: int) -> None:
        r = self.model.regions[region]
        self.page_slider.max = max((r.end - r.start) // PAGE_SIZE - 1, 0)

    def _on_change(self, change: dict[str, Any]) -> None:
        if not self.busy:
            self.walk()

    def _on_typing(self, change: dict[str, Any]) -> None:
        """Walk as the address is typed, once it reads as a number: a half-typed "0x" waits
        for more rather than showing an error (Enter shows it, `_on_submit`)."""
        try:
            parse_int(change["new"])
        except TwodwalkError:
            return
        self._on_change(change)

    def _on_submit(self, widget: Any, content: dict[str, Any], buffers: Any) -> None:
        """Enter in the address box (the front end's "submit" message): walk what is there,
        and say what is wrong with it if it is not an address."""
        del widget, buffers
        if content.get("event") == "submit" and not self.busy:
            self.walk()

    def _on_region(self, change: dict[str, Any]) -> None:
        if self.busy:
            return
        with self.quietly():
            self._fit_slider(change["new"])
            self.page_slider.value = 0
        self._go_to_page(change["new"], 0)

    def _on_page(self, change: dict[str, Any]) -> None:
        if not self.busy:
            self._go_to_page(self.region_dropdown.value, change["new"])

    def _go_to_page(self, region: int, page: int) -> None:
        """Set the GVA text to the page, keeping the offset in the page (which walks)."""
        offset = (self.model.gva or 0) % PAGE_SIZE
        self.gva_text.value = f"{self.model.page_gva(region, page, offset):#x}"


# --- WalkStepper -------------------------------------------------------------------------------


class WalkStepper(Panel):
    """Step through a walk's memory references in hardware order: the current cell of the
    grid and edge of the graph are drawn thick, with the entry read and its fields. Only the
    tab in view is drawn (a graph costs a third of a second to rasterise)."""

    def __init__(self, result_or_machine: AccessResult | Machine, gva: int | None = None) -> None:
        self.model = StepperModel(result_or_machine, gva)
        self.previous_button = widgets.Button(description="previous", icon="arrow-left")
        self.next_button = widgets.Button(description="next", icon="arrow-right")
        self.reset_button = widgets.Button(description="reset", icon="undo")
        self.step_label = widgets.HTML()
        self.entry_output = widgets.Output()
        self.grid_output = widgets.Output()
        self.graph_output = widgets.Output()
        self.views = widgets.Tab(
            children=[self.grid_output, self.graph_output], titles=("walk grid", "walk graph")
        )
        self.widget = widgets.VBox(
            [
                widgets.HBox(
                    [self.previous_button, self.next_button, self.reset_button, self.step_label]
                ),
                self.entry_output,
                self.views,
            ]
        )
        self._drawn: dict[int, int] = {}  # tab index -> the step its figure shows
        self.previous_button.on_click(lambda _: self.then_show(self.model.previous))
        self.next_button.on_click(lambda _: self.then_show(self.model.next))
        self.reset_button.on_click(lambda _: self.then_show(self.model.reset))
        self.views.observe(lambda _: self._draw(), names="selected_index")
        self.show()

    def show(self) -> None:
        model = self.model
        self.step_label.value = f"<b>{html.escape(model.label)}</b>"
        self.previous_button.disabled = model.position <= 1
        self.next_button.disabled = model.position >= model.count
        show_text(self.entry_output, model.entry_text)
        self._draw()

    def _draw(self) -> None:
        """Draw the figure of the tab in view, unless it already shows this step."""
        tab, position = self.views.selected_index or 0, self.model.position
        if self._drawn.get(tab) == position:
            return
        if tab:
            show_figure(self.graph_output, self.model.graph_figure)
        else:
            show_figure(self.grid_output, self.model.grid_figure, self.model.grid_key())
        self._drawn[tab] = position


# --- WhatIfLab ---------------------------------------------------------------------------------


class WhatIfLab(Panel):
    """Buttons that change the host, KVM or the guest under a running access; after each,
    the access runs again and a table shows what changed."""

    def __init__(
        self,
        machine_or_scenario: Source = None,
        gva: int | None = None,
        *,
        kind: str | None = None,
        cpl: int | None = None,
    ) -> None:
        self.model = model = WhatIfModel(machine_or_scenario, gva, kind=kind, cpl=cpl)
        access = model.access
        self.buttons = {
            key: widgets.Button(
                description=what.label, tooltip=what.why, layout=widgets.Layout(width="240px")
            )
            for key, what in WHAT_IFS.items()
        }
        for key, button in self.buttons.items():
            button.on_click(partial(self._on_what_if, key))
        self.rerun_button = widgets.Button(
            description="make the access again", icon="repeat", layout=widgets.Layout(width="auto")
        )
        self.reset_button = widgets.Button(description="reset", icon="undo")
        self.rerun_button.on_click(lambda _: self.then_show(model.rerun))
        self.reset_button.on_click(lambda _: self.then_show(model.reset))
        self.access_label = widgets.HTML(
            f"<b>access:</b> {access.kind} of {access.gva:#x} at CPL {access.cpl}"
        )
        self.message_line = widgets.HTML()
        self.error_line = error_line()
        self.table = widgets.HTML()
        self.trace_output = widgets.Output()
        self.widget = widgets.VBox(
            [
                self.access_label,
                widgets.GridBox(
                    list(self.buttons.values()),
                    layout=widgets.Layout(grid_template_columns="repeat(3, 250px)"),
                ),
                widgets.HBox([self.rerun_button, self.reset_button]),
                self.error_line,
                self.message_line,
                self.table,
                self.trace_output,
            ]
        )
        self.show()

    def _on_what_if(self, key: str, button: Any) -> None:
        self.then_show(partial(self.model.apply, key))

    def show(self) -> None:
        model = self.model
        show_error(self.error_line, model.error)
        self.message_line.value = f"<i>{html.escape(model.message)}</i>" if model.message else ""
        self.table.value = changes_table(model.changes)
        show_text(self.trace_output, model.trace_text)


def changes_table(changes: list[Change]) -> str:
    """The before/after table; a changed row is bold, marked with a black bar and the word
    "changed"; long values wrap inside their cells, so the table fits a laptop's width."""
    rows = [
        "<tr><th style='text-align:left'>what</th><th style='text-align:left'>before</th>"
        "<th style='text-align:left'>after</th><th></th></tr>"
    ]
    for c in changes:
        bar = f"border-left: 4px solid {BLACK};" if c.changed else "border-left: 4px solid white;"
        weight = "font-weight: bold;" if c.changed else ""
        cells = "".join(
            f"<td style='padding: 0 8px; overflow-wrap: anywhere; {weight}"
            f"{bar if i == 0 else ''}'>"
            f"{html.escape(text)}</td>"
            for i, text in enumerate((c.field, c.before, c.after, "changed" if c.changed else ""))
        )
        rows.append(f"<tr>{cells}</tr>")
    return (
        "<table class='twodwalk-changes' style='width: 100%; table-layout: fixed'>"
        f"{''.join(rows)}</table>"
    )


# --- MemoryInspector ---------------------------------------------------------------------------

SPACE_OPTIONS = [("HPA", "hpa"), ("GPA", "gpa"), ("HVA (VMM)", "hva")]
FORMAT_OPTIONS = [
    ("guest IA-32e entry", "guest"),
    ("EPT entry (Intel)", "ept"),
    ("nested page-table entry (AMD)", "npt"),
    ("host entry", "host"),
    ("raw bytes", "raw"),
]


class MemoryInspector(Panel):
    """A page of memory as 512 entries, each decoded in the format and level picked; the
    entry the address points into is spelled out field by field."""

    def __init__(
        self,
        machine: Machine,
        address: int = 0,
        space: str = "hpa",
        *,
        entry_format: str = "guest",
        level: int = 1,
    ) -> None:
        self.model = model = InspectorModel(machine, address, space, entry_format, level)
        self.address_text = widgets.Text(
            value=f"{model.address:#x}", description="address", continuous_update=False
        )
        self.space_dropdown = widgets.Dropdown(
            options=SPACE_OPTIONS, value=model.space, description="space"
        )
        self.format_dropdown = widgets.Dropdown(
            options=FORMAT_OPTIONS, value=model.entry_format, description="entries"
        )
        self.level_dropdown = widgets.Dropdown(description="level")
        self.previous_button = widgets.Button(description="previous page", icon="arrow-left")
        self.next_button = widgets.Button(description="next page", icon="arrow-right")
        self.error_line = error_line()
        self.entry_output = widgets.Output()
        self.page_output = widgets.Output()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.address_text, self.space_dropdown]),
                widgets.HBox([self.format_dropdown, self.level_dropdown]),
                widgets.HBox([self.previous_button, self.next_button]),
                self.error_line,
                self.entry_output,
                self.page_output,
            ]
        )
        self.address_text.observe(self._on_address, names="value")
        self.space_dropdown.observe(self._on_address, names="value")
        self.format_dropdown.observe(self._on_format, names="value")
        self.level_dropdown.observe(self._on_format, names="value")
        self.previous_button.on_click(lambda _: self.then_show(partial(model.move, -1)))
        self.next_button.on_click(lambda _: self.then_show(partial(model.move, 1)))
        with self.quietly():
            self._fit_levels(model.entry_format, model.level)
        self.show()

    def _fit_levels(self, name: str, wanted: int) -> None:
        """Offer the levels of a format, keeping the level wanted where it exists."""
        names = self.model.level_names(name)
        level = wanted if wanted in names else 1
        self.level_dropdown.options = [(f"{lv}: {n}", lv) for lv, n in sorted(names.items())] or [
            ("-", 1)
        ]
        self.level_dropdown.value = level
        self.level_dropdown.disabled = not names

    def _on_address(self, change: dict[str, Any]) -> None:
        if not self.busy:
            self.then_show(
                partial(self.model.goto, self.address_text.value, self.space_dropdown.value)
            )

    def _on_format(self, change: dict[str, Any]) -> None:
        if self.busy:
            return
        name, wanted = self.format_dropdown.value, self.level_dropdown.value
        with self.quietly():
            self._fit_levels(name, wanted)
        self.then_show(partial(self.model.choose_format, name, self.level_dropdown.value))

    def show(self) -> None:
        model = self.model
        with self.quietly():
            if not model.error:  # a refused address stays typed, for the reader to mend
                self.address_text.value = f"{model.address:#x}"
                self.space_dropdown.value = model.space
            self.format_dropdown.value = model.entry_format  # a refused format springs back
            self._fit_levels(model.entry_format, model.level)
        show_error(self.error_line, model.error)
        show_text(self.entry_output, model.entry_text())
        show_text(self.page_output, model.page_text())


# --- Exercise ----------------------------------------------------------------------------------


class Exercise(Panel):
    """A seeded question with an answer box: Check judges the answer with the question's
    grader, Hint and Reveal show the hint and the worked solution, and with a seed "New
    question" moves to the next seed."""

    def __init__(
        self, question_or_seed: Question | int, topic: str | None = None, *, reveal: bool = True
    ) -> None:
        self.model = model = ExerciseModel(question_or_seed, topic)
        self.title = widgets.HTML()
        self.prompt = widgets.HTML()
        self.answer_text = widgets.Text(description="answer", placeholder="your answer")
        self.check_button = widgets.Button(description="Check", button_style="primary")
        self.hint_button = widgets.Button(description="Hint")
        self.reveal_button = widgets.Button(description="Reveal solution") if reveal else None
        self.new_button = widgets.Button(description="New question") if model.can_advance else None
        self.feedback_line = widgets.HTML()
        self.feedback_line.add_class(FEEDBACK_CLASS)
        self.hint_line = widgets.HTML()
        self.solution_output = widgets.Output()
        buttons = [self.check_button, self.hint_button, self.reveal_button, self.new_button]
        self.widget = widgets.VBox(
            [
                self.title,
                self.prompt,
                widgets.HBox([self.answer_text, *(b for b in buttons if b is not None)]),
                self.feedback_line,
                self.hint_line,
                self.solution_output,
            ]
        )
        self.check_button.on_click(lambda _: self._check())
        self.hint_button.on_click(lambda _: self._hint())
        if self.reveal_button is not None:
            self.reveal_button.on_click(lambda _: self._reveal())
        if self.new_button is not None:
            self.new_button.on_click(lambda _: self._new())
        self.show()

    def _check(self) -> None:
        feedback = self.model.check(self.answer_text.value)
        # A symbol and words, not a hue: every hue means a tree or a cache in twodwalk.
        symbol = "&#10004;" if feedback.correct else "&#10008; Not yet:"
        self.feedback_line.value = (
            f'<div class="{FEEDBACK_CLASS}" style="border-left: 4px solid {BLACK};'
            f' padding-left: 6px">{symbol} {html.escape(feedback.message)}</div>'
        )

    def _hint(self) -> None:
        self.hint_line.value = "<b>Hint:</b> " + preformatted(self.model.show_hint())

    def _reveal(self) -> None:
        show_text(self.solution_output, self.model.reveal())

    def _new(self) -> None:
        self.model.new_question()
        self.answer_text.value = ""
        self.show()

    def show(self) -> None:
        """The question, with its feedback, hint and solution cleared."""
        self.title.value = f"<b>{html.escape(self.model.title)}</b>"
        self.prompt.value = prose(self.model.question.prompt)
        self.feedback_line.value = self.hint_line.value = ""
        self.solution_output.outputs = ()
