"""The notebook helpers, driven as a student drives them, without a browser: set a control's
value or click a button, then check the model's state, the error line, the text shown and the
figure's artists. Every expected value comes from the engine or the scenario, not from the
widgets' own code."""

from __future__ import annotations

import html
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

import twodwalk as tw
import twodwalk.widgets as tww
from twodwalk import widgets as widget_package
from twodwalk.engine.trace import KvmStep, TlbHit, VmExit
from twodwalk.engine.units import HUGE_PAGE_SIZE
from twodwalk.exercises import quiz
from twodwalk.scenarios import TOY_GVA, scenario
from twodwalk.views.plots import walk_grid
from twodwalk.widgets import common, exercise, explorer, inspector, stepper, ui, whatif
from twodwalk.widgets.explorer import ExplorerModel, ExplorerRequest
from twodwalk.widgets.ui import ERROR_CLASS, RenderedFigures

DATA_GVA = TOY_GVA + 0x1000  # the toy's writable data page (GPA 0x6000)
THICK_CELL, THICK_EDGE = 4.5, 6.0  # how plot_walk_grid and plot_walk_graph draw a highlight


def text_of(out: Any) -> str:
    """The text an Output widget shows (its stream outputs)."""
    return "".join(o["text"] for o in out.outputs if o["output_type"] == "stream")


def has_png(out: Any) -> bool:
    return any("image/png" in o.get("data", {}) for o in out.outputs)


def error_of(panel: Any) -> str:
    line = panel.error_line
    assert ERROR_CLASS in line._dom_classes
    return str(line.value)


def thick(figure: Figure, kind: type, width: float) -> list[Any]:
    return [p for p in figure.axes[0].patches if isinstance(p, kind) and p.get_linewidth() == width]


def references(model: ExplorerModel) -> Counter[str]:
    assert model.result is not None
    return Counter(r.dimension for r in model.result.trace.memory_references())


# --- packaging -------------------------------------------------------------------------------


def test_widgets_are_a_lazy_attribute_of_the_package() -> None:
    code = (
        "import sys, twodwalk as tw; assert 'ipywidgets' not in sys.modules;"
        " tw.widgets.AddressExplorer; assert 'ipywidgets' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert tw.widgets is widget_package is tww


def test_models_import_no_ipywidgets() -> None:
    for module in (common, explorer, stepper, whatif, inspector, exercise):
        assert "import ipywidgets" not in Path(str(module.__file__)).read_text()


def test_each_helper_displays_itself_as_a_widget() -> None:
    bundle = tww.Exercise(1)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


# --- AddressExplorer -------------------------------------------------------------------------


def test_explorer_opens_on_the_default_scenario_first_write() -> None:
    e = tww.AddressExplorer()
    first_write = next(a for a in scenario("qemu").accesses if a.kind == "write")
    assert e.model.gva == first_write.gva and e.kind_buttons.value == "write"
    assert error_of(e) == ""
    assert has_png(e.walk_output)
    shown = text_of(e.text_output)
    assert e.model.result is not None
    assert f"gpa: {e.model.result.gpa:#x}" in shown and "hardware references" in shown


def test_explorer_of_a_scenario_opens_on_a_cold_walk() -> None:
    """The scenario's accesses built the EPT entries and the explorer flushes every cache:
    a cold walk, all 24 references and no VM exit (as notebooks 00 and 01 say)."""
    e = tww.AddressExplorer("toy")
    assert e.model.result is not None and e.model.result.trace.of_type(VmExit) == []
    assert references(e.model) == Counter(guest=4, ept=20)
    assert e.model.figure().axes[0].get_title().endswith("24 memory references")
    assert " 24 " in text_of(e.text_output)


def test_explorer_of_a_fresh_machine_shows_the_first_touch() -> None:
    e = tww.AddressExplorer(scenario("toy").build())
    assert "EPT_VIOLATION" in text_of(e.text_output)
    assert sum(references(e.model).values()) < 24, "the last attempt reuses cached GPAs"
    e.walk_button.click()
    assert references(e.model) == Counter(guest=4, ept=20)


def test_explorer_without_flush_shows_the_tlb_hit() -> None:
    e = tww.AddressExplorer("toy")
    e.flush_checkbox.value = False
    e.walk_button.click()
    assert e.model.result is not None and e.model.result.trace.of_type(TlbHit)
    assert "the TLB held the translation" in text_of(e.text_output)


@pytest.mark.parametrize(
    ("gva", "words"),
    [
        ("xyz", "is not a number"),
        ("0x1_0000_0000_0000_0000", "out of range"),
        ("0x8080605ffc", "cross a 4 KiB page boundary"),
    ],
)
def test_explorer_shows_bad_input_inline(gva: str, words: str) -> None:
    e = tww.AddressExplorer("toy")
    e.gva_text.value = gva
    e.gva_text._handle_custom_msg({"event": "submit"}, [])  # Enter, as the front end sends it
    assert words in error_of(e)
    assert e.model.result is None
    assert e.walk_output.outputs == () and e.text_output.outputs == ()
    e.gva_text.value = f"{TOY_GVA:#x}"
    assert error_of(e) == "" and has_png(e.walk_output)


def test_explorer_walks_as_an_address_is_typed_and_on_enter() -> None:
    """Each keystroke reaches the kernel; a half-typed address waits silently, a whole one
    walks, and Enter (the "submit" message, all JupyterLite sends) walks what is there."""
    e = tww.AddressExplorer("toy")
    e.gva_text.value = "0x"
    assert error_of(e) == "", "no error while an address is being typed"
    e.gva_text.value = "0x0"
    assert "0x0" in text_of(e.text_output) or error_of(e) != "", "a whole address walks"
    walked = e.model.request
    e.gva_text.value = f"{TOY_GVA:#x}"
    assert e.model.request != walked
    before = e.model.result
    e.gva_text._handle_custom_msg({"event": "submit"}, [])
    assert e.model.result is not before, "Enter walks again"


def test_explorer_non_canonical_gva_is_explained_and_shown_as_gp() -> None:
    e = tww.AddressExplorer("toy")
    e.kind_buttons.value = "read"
    e.gva_text.value = "0x8000_0000_0000"
    assert "not canonical" in error_of(e) and "#GP(0)" in error_of(e)
    assert "#GP(0)" in text_of(e.text_output)


def test_explorer_write_needs_a_value_and_only_a_write_takes_one() -> None:
    e = tww.AddressExplorer("toy")
    e.kind_buttons.value = "write"
    assert not e.value_text.disabled
    e.value_text.value = ""
    assert "a write needs a value" in error_of(e)
    e.value_text.value = "0x2a"
    assert error_of(e) == ""
    assert e.model.result is not None and e.model.result.value == 0x2A
    e.kind_buttons.value = "read"
    assert e.value_text.disabled
    assert e.model.result is not None and e.model.result.value == 0x2A


def test_explorer_cpl_and_kind_reach_the_engine() -> None:
    e = tww.AddressExplorer("toy")
    e.gva_text.value = f"{TOY_GVA:#x}"  # the toy's code page: user, read-only, executable
    e.kind_buttons.value = "write"
    assert "#PF" in text_of(e.text_output)
    e.kind_buttons.value = "fetch"
    assert "#PF" not in text_of(e.text_output)
    e.gva_text.value = f"{DATA_GVA:#x}"  # data: XD=1, so a fetch faults
    assert "#PF" in text_of(e.text_output)
    e.kind_buttons.value = "read"
    e.cpl_buttons.value = 0
    assert e.model.machine.vcpu.cpl == 0 and "#PF" not in text_of(e.text_output)


def test_explorer_slider_and_text_follow_each_other() -> None:
    e = tww.AddressExplorer("qemu")
    regions = e.model.regions
    heap = next(i for i, r in enumerate(regions) if r.name == "bash: heap")
    e.region_dropdown.value = heap
    assert e.page_slider.max == (regions[heap].end - regions[heap].start) // 4096 - 1
    assert e.page_slider.value == 0
    offset = e.model.gva is not None and e.model.gva % 4096
    e.page_slider.value = 3
    assert e.gva_text.value == f"{regions[heap].start + 3 * 4096 + offset:#x}"
    assert e.model.gva == regions[heap].start + 3 * 4096 + offset
    stack = next(i for i, r in enumerate(regions) if r.name == "bash: stack")
    e.gva_text.value = f"{regions[stack].start + 4096 + 16:#x}"
    assert (e.region_dropdown.value, e.page_slider.value) == (stack, 1)


def test_explorer_switches_between_ept_and_shadow_paging() -> None:
    e = tww.AddressExplorer("toy")
    ept_machine = e.model.machine
    e.kind_buttons.value = "read"
    e.paging_buttons.value = False
    assert not e.model.machine.vm.tdp
    e.walk_button.click()
    assert set(references(e.model)) == {"native"}
    e.paging_buttons.value = True
    assert e.model.machine is ept_machine, "the EPT machine is kept, warm"


def test_explorer_of_a_machine_cannot_switch_paging() -> None:
    e = tww.AddressExplorer(scenario("toy").build())
    e.paging_buttons.value = False
    assert "give the explorer a scenario" in error_of(e)
    assert e.paging_buttons.value is True and e.model.machine.vm.tdp


def test_explorer_model_works_without_widgets() -> None:
    model = ExplorerModel("toy")
    assert model.run(ExplorerRequest(f"{DATA_GVA:#x}", "read", 3)) is not None
    assert model.error == "" and "gpa: 0x6000" in model.text
    assert model.run(ExplorerRequest("0d12", "write", 3, "")) is None
    assert "needs a value" in model.error and model.text == ""
    with pytest.raises(tw.TwodwalkError, match="no access has run"):
        model.figure()


def test_equal_walk_grids_are_rasterised_once() -> None:
    model = ExplorerModel("toy")
    drawn: list[Figure] = []

    def make() -> Figure:
        drawn.append(model.figure())
        return drawn[-1]

    cache = RenderedFigures(size=2)
    outputs = []
    for gva, flush in ((TOY_GVA, False), (DATA_GVA, True), (DATA_GVA + 8, True)):
        # a TLB hit (the scenario's own accesses filled the TLB), then two full 4x4 walks
        model.run(ExplorerRequest(f"{gva:#x}", "read", 3, flush_tlb=flush))
        outputs.append(cache.get(model.figure_key(), make))
    assert outputs[0] is not outputs[1] and outputs[1] is outputs[2]
    assert len(drawn) == 2


# --- WalkStepper -----------------------------------------------------------------------------


def test_stepper_steps_through_the_24_references_in_hardware_order() -> None:
    s = tww.WalkStepper(scenario("toy").build(), DATA_GVA)
    refs = s.model.result.trace.memory_references()
    assert s.model.count == len(refs) == 24
    assert s.step_label.value == "<b>step 1 of 24</b>"
    assert s.previous_button.disabled and not s.next_button.disabled
    assert "EPT PML4E (EPT level 4), translating the GPA of the guest level-4 table" in text_of(
        s.entry_output
    )
    for _ in range(4):
        s.next_button.click()
    assert s.model.position == 5
    shown = text_of(s.entry_output)
    assert "PML4E (guest level 4)" in shown and "table at GPA" in shown
    assert f"entry read at HPA {refs[4].address:#x}" in shown
    s.reset_button.click()
    assert s.model.position == 1


def test_stepper_highlights_the_current_cell_and_edge() -> None:
    s = tww.WalkStepper(scenario("toy").build(), DATA_GVA)
    for _ in range(6):
        s.next_button.click()
    assert has_png(s.grid_output) and s.graph_output.outputs == (), "the graph tab is hidden"
    s.views.selected_index = 1
    assert has_png(s.graph_output)
    (cell,) = thick(s.model.grid_figure(), Rectangle, THICK_CELL)
    grid = walk_grid(s.model.result.trace)
    (expected,) = [c for c in grid.cells if c.number == 7]
    assert (round(cell.get_y()), round(cell.get_x())) == (expected.row, expected.col)
    assert len(thick(s.model.graph_figure(), FancyArrowPatch, THICK_EDGE)) == 1


def test_stepper_stops_at_both_ends() -> None:
    s = tww.WalkStepper(scenario("toy").build(), DATA_GVA)
    s.previous_button.click()
    assert s.model.position == 1
    for _ in range(30):
        s.next_button.click()
    assert s.model.position == 24 and s.next_button.disabled


def test_stepper_of_a_tlb_hit_has_nothing_to_step() -> None:
    m = scenario("toy").build()
    m.vcpu.access(DATA_GVA, "read")
    s = tww.WalkStepper(m.vcpu.access(DATA_GVA, "read"))
    assert s.model.count == 0 and "TLB held the translation" in s.step_label.value
    assert s.previous_button.disabled and s.next_button.disabled


# --- WhatIfLab -------------------------------------------------------------------------------


def changed(lab: Any) -> dict[str, tuple[str, str]]:
    return {c.field: (c.before, c.after) for c in lab.model.changes if c.changed}


def test_lab_starts_from_the_steady_state() -> None:
    lab = tww.WhatIfLab("toy")
    assert lab.model.access.gva == DATA_GVA + 8 and lab.model.access.kind == "write"
    assert lab.model.result.trace.of_type(TlbHit)
    assert changed(lab) == {}
    assert error_of(lab) == ""


def test_lab_swap_out_shows_the_swap_in() -> None:
    lab = tww.WhatIfLab("toy")
    lab.buttons["swap-out"].click()
    diff = changed(lab)
    assert "swap offset" in lab.message_line.value
    assert diff["TLB"] == ("hit", "miss")
    assert diff["host page faults"][1].startswith("swap-in")
    assert "EPT_VIOLATION" in diff["VM exits"][1]
    assert "changed" in lab.table.value
    assert "host page fault" in text_of(lab.trace_output)


def test_lab_migrate_and_ksm_change_the_frame() -> None:
    lab = tww.WhatIfLab("toy")
    before = lab.model.result.hpa
    lab.buttons["migrate"].click()
    assert lab.model.result.hpa != before
    lab.buttons["ksm-merge"].click()
    assert error_of(lab) == ""
    assert "copy-on-write" in changed(lab)["host page faults"][1], "the write breaks KSM's CoW"


def test_lab_thp_split_and_collapse() -> None:
    lab = tww.WhatIfLab("qemu")
    lab.buttons["swap-out"].click()
    assert "split_thp() it first" in error_of(lab)
    lab.buttons["thp-collapse"].click()
    assert "not mapped by small pages" in error_of(lab)
    lab.buttons["thp-split"].click()
    assert error_of(lab) == ""
    assert "level 1" in lab.model.trace_text  # kvm_mmu_hugepage_adjust: 4 KiB now
    lab.buttons["thp-collapse"].click()
    assert error_of(lab) == ""
    assert lab.model.result.hpa is not None
    assert lab.model.result.hpa & ~(HUGE_PAGE_SIZE - 1) == int(
        lab.message_line.value.split("HPA ")[1].split("<")[0], 16
    )


def test_lab_inapplicable_what_if_changes_nothing() -> None:
    lab = tww.WhatIfLab("toy")
    lab.buttons["swap-out"].click()
    table = lab.table.value
    lab.buttons["thp-split"].click()
    assert "not applicable here" in error_of(lab) and "2 MiB page" in error_of(lab)
    assert lab.table.value == table and lab.message_line.value == ""


def test_lab_memslot_moves_and_deletes() -> None:
    lab = tww.WhatIfLab("toy")
    lab.buttons["memslot-move"].click()
    assert "#PF" in changed(lab)["outcome"][1], "the guest's tables moved away with the slot"
    lab.reset_button.click()
    assert lab.model.result.fault is None and changed(lab) == {}
    lab.buttons["memslot-delete"].click()
    assert "#PF" in changed(lab)["outcome"][1]


def test_lab_dirty_logging_logs_the_next_write_once() -> None:
    lab = tww.WhatIfLab("toy")
    lab.buttons["dirty-logging"].click()
    assert "fast_page_fault" in changed(lab)["KVM steps"][1]
    lab.buttons["dirty-logging"].click()
    assert "already logs dirty pages" in error_of(lab)


def test_lab_guest_pte_edit_is_stale_until_invlpg() -> None:
    lab = tww.WhatIfLab("toy", DATA_GVA, kind="read")
    value = lab.model.result.value
    lab.buttons["edit-pte"].click()
    assert "cleared P" in lab.message_line.value
    assert changed(lab) == {}, "the TLB still holds the old translation"
    assert lab.model.result.value == value
    lab.buttons["invlpg"].click()
    assert changed(lab)["outcome"][1].startswith("#PF")
    lab.buttons["edit-pte"].click()  # restore P: the #PF is not cached, so it is seen at once
    assert lab.model.result.fault is None and lab.model.result.value == value


def test_lab_switches_to_shadow_paging() -> None:
    lab = tww.WhatIfLab("toy")
    lab.buttons["switch-paging"].click()
    assert not lab.model.machine.vm.tdp
    assert "EXCEPTION_NMI" in changed(lab)["VM exits"][1]
    lab.rerun_button.click()
    assert changed(lab)["TLB"] == ("miss", "hit")
    lab.buttons["edit-pte"].click()
    assert "KVM zapped the shadow entry (kvm_mmu_pte_write)" in lab.message_line.value
    assert changed(lab)["outcome"][1].startswith("#PF"), "no stale window without INVLPG"


def test_lab_of_a_machine_cannot_rebuild() -> None:
    m = scenario("toy").build()
    m.guest.map(0x1234_5000, 0x9000, 4096, rw=1)
    lab = tww.WhatIfLab(m)
    assert lab.model.access.gva == 0x1234_5000  # a read of its first mapping, at CPL 0
    lab.reset_button.click()
    assert "give the lab a scenario" in error_of(lab)
    lab.buttons["switch-paging"].click()
    assert "give the lab a scenario" in error_of(lab)


# --- MemoryInspector -------------------------------------------------------------------------


def warm_toy() -> tw.Machine:
    m = scenario("toy").build()
    m.vcpu.access(DATA_GVA, "read")
    return m


def test_inspector_decodes_the_guest_root_table() -> None:
    m = warm_toy()
    fmt = m.guest.format
    pml4e = m.vcpu.cr3 + 8 * fmt.index(DATA_GVA, 4)
    i = tww.MemoryInspector(m, pml4e, "gpa", entry_format="guest", level=4)
    assert error_of(i) == ""
    page = text_of(i.page_output)
    assert f">   {fmt.index(DATA_GVA, 4)} " in page and "next table" in page
    assert "are zero" in page
    assert text_of(i.entry_output).startswith("PML4E")


def test_inspector_reads_ept_and_host_tables_at_hpas() -> None:
    m = warm_toy()
    i = tww.MemoryInspector(m, m.vm.ept.eptp.root, entry_format="ept", level=4)
    assert text_of(i.entry_output).startswith("EPT PML4E") and "(present)" in text_of(
        i.entry_output
    )
    i.format_dropdown.value = "host"
    assert [v for _, v in i.level_dropdown.options] == [1, 2, 3, 4]
    i.format_dropdown.value = "raw"
    assert i.level_dropdown.disabled and "bytes" in text_of(i.entry_output)


def test_inspector_reads_amd_nested_tables_as_long_mode_entries() -> None:
    """On AMD the nested tables are long-mode entries under nCR3: the inspector decodes
    them so, and refuses the EPT format inline, naming the VM's own."""
    m = scenario("toy-amd").build()
    scenario("toy-amd").run(m)
    i = tww.MemoryInspector(m, m.vm.ept.ncr3, entry_format="npt", level=4)
    shown = text_of(i.entry_output)
    assert shown.startswith("nested PML4E") and "U/S" in shown and "(present)" in shown
    i.format_dropdown.value = "ept"
    assert i.format_dropdown.value == "npt", "a refused format springs back"
    assert "its second dimension is NPT, choose &#x27;npt&#x27;" in error_of(i)


def test_inspector_level_picked_by_the_reader_stays_picked() -> None:
    m = warm_toy()
    i = tww.MemoryInspector(m, m.vcpu.cr3, "gpa", entry_format="guest", level=4)
    i.level_dropdown.value = 2
    assert i.level_dropdown.value == 2 and i.model.level == 2
    assert text_of(i.entry_output).startswith("PDE")


def test_inspector_navigates_and_reports_errors_inline() -> None:
    m = warm_toy()
    root = m.vcpu.cr3  # the guest allocates its tables from the top of RAM down
    i = tww.MemoryInspector(m, root, "gpa")
    start = i.model.hpa
    assert start is not None
    i.previous_button.click()
    assert i.model.address == root - 4096 and i.address_text.value == f"{root - 4096:#x}"
    i.next_button.click()
    assert i.model.hpa == start
    i.next_button.click()
    assert "No memory is mapped" in error_of(i), "the page above the top of RAM"
    assert i.model.hpa == start and i.model.address == root
    i.address_text.value = "0x7000"
    assert "has no host frame" in error_of(i), "never touched"
    i.address_text.value = "zz"
    assert "is not a number" in error_of(i)
    assert i.model.hpa == start, "the last good page stays"
    i.space_dropdown.value = "hva"
    i.address_text.value = "0x1000"
    assert "in no VMA" in error_of(i)
    i.space_dropdown.value = "gpa"
    i.address_text.value = f"{16 << 20:#x}"  # beyond the toy's 1 MiB of RAM
    assert "No memory is mapped" in error_of(i)


def test_inspector_refuses_ept_entries_without_ept() -> None:
    m = scenario("toy-shadow").build()
    i = tww.MemoryInspector(m, 0)
    i.format_dropdown.value = "ept"
    assert "EPT off" in error_of(i)
    assert i.format_dropdown.value == "guest", "a refused choice springs back"


# --- Exercise --------------------------------------------------------------------------------


def test_exercise_checks_hints_reveals_and_moves_on() -> None:
    x = tww.Exercise(7)
    question = quiz(7)
    assert question.prompt.splitlines()[0] in html.unescape(x.prompt.value)
    assert "seed 7" in x.title.value
    x.check_button.click()
    assert "Type an answer" in x.feedback_line.value
    x.answer_text.value = "certainly not this"
    x.check_button.click()
    assert "Not yet" in x.feedback_line.value
    x.answer_text.value = question.answer
    x.check_button.click()
    assert "Correct" in x.feedback_line.value and "Not yet" not in x.feedback_line.value
    x.hint_button.click()
    assert "Hint" in x.hint_line.value
    assert x.reveal_button is not None and x.new_button is not None
    x.reveal_button.click()
    assert text_of(x.solution_output).strip() == question.solution.strip()
    x.new_button.click()
    assert x.model.seed == 8 and x.model.question.prompt == quiz(8).prompt
    assert x.answer_text.value == "" and x.feedback_line.value == x.hint_line.value == ""
    assert x.solution_output.outputs == ()


def test_exercise_of_a_question_has_no_next_and_may_hide_the_solution() -> None:
    x = tww.Exercise(quiz(3, "indices"), reveal=False)
    assert x.reveal_button is None and x.new_button is None
    with pytest.raises(tw.TwodwalkError, match="no next one"):
        x.model.new_question()


def test_exercise_keeps_its_topic() -> None:
    x = tww.Exercise(3, "memslot")
    assert x.new_button is not None
    x.new_button.click()
    assert x.model.question.topic == "memslot"
    with pytest.raises(tw.TwodwalkError, match="topic"):
        tww.Exercise(3, "nonsense")


def test_lab_fault_that_races_the_host_retries() -> None:
    """mmu.c `is_page_fault_stale`: the host migrates the page between `hva_to_pfn` and the
    install, so the first fault installs nothing and the guest faults again; the second
    installs the page's newest frame."""
    lab = tww.WhatIfLab("toy", DATA_GVA, kind="read")
    value = lab.model.result.value
    lab.buttons["race-with-invalidation"].click()
    result = lab.model.result
    stale = [s for s in result.trace.of_type(KvmStep) if s.function == "is_page_fault_stale"]
    assert len(stale) == 1 and "RET_PF_RETRY" in stale[0].detail
    assert [e.name for e in result.trace.of_type(VmExit)] == ["EPT_VIOLATION", "EPT_VIOLATION"]
    hva = lab.model.machine.vm.gpa_to_hva(result.gpa or 0)
    assert hva is not None
    found = lab.model.machine.vmm.tables.find_leaf(hva & ~0xFFF)
    assert found is not None
    frame = lab.model.machine.memory.read_u64(found.slot) & 0xF_FFFF_FFFF_F000
    assert (result.value, result.hpa) == (value, frame | (result.hpa or 0) & 0xFFF)


def test_the_lab_model_reads_out_in_one_style() -> None:
    """What the lab shows now is read as attributes, never called: `changes` is a property
    like `trace_text`, and `message` and `result` are plain attributes."""
    import inspect

    for name in ("changes", "trace_text"):
        assert isinstance(inspect.getattr_static(whatif.WhatIfModel, name), property), name
    lab = tww.WhatIfLab("toy")
    assert isinstance(lab.model.changes, list) and isinstance(lab.model.message, str)


def test_the_explorer_says_why_an_access_ended_so() -> None:
    model = ExplorerModel("toy")
    model.run(ExplorerRequest(f"{TOY_GVA + 8:#x}", "write", 3, value="1"))
    text = model.text
    why = text.splitlines().index("why:")
    assert text.splitlines()[why + 1] == "The guest's own page tables refused the access."
    assert "R/W (bit 1) is 0 there." in text


def test_the_explorer_fits_a_laptop_screen() -> None:
    """Controls in four rows, a two-line summary, then the grid and the text in tabs: the
    grid's PNG (the tallest part) leaves room for the rest in about 700 px."""
    import base64
    import struct

    e = tww.AddressExplorer("toy")
    (png,) = [o["data"]["image/png"] for o in e.walk_output.outputs]
    width, height = struct.unpack(">II", base64.b64decode(png)[16:24])
    assert height <= 560 and width <= 900, (width, height)
    assert len(e.widget.children) == 7 and e.views.get_title(1) == "what happened, and why"
    assert e.summary_line.value.count("\n") == 1


def test_exercise_prompts_are_prose_with_dumps_kept_in_columns() -> None:
    shown = ui.prose("Walk this table by hand, please.\n  PTE @ 0x49c0 = 0x494003\n  PDE x\nThen?")
    assert shown.startswith('<p style="margin: 0 0 0.5em 0">Walk this table by hand, please.</p>')
    assert (
        '<pre style="white-space: pre;' in shown and "  PTE @ 0x49c0 = 0x494003\n  PDE x" in shown
    )
    assert shown.endswith('<p style="margin: 0 0 0.5em 0">Then?</p>')
