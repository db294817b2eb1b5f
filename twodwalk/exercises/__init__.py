"""Seeded exercises: the same seed gives the same question, and the engine gives the answer.

The pattern is OSTEP's simulators (`paging-linear-translate.py -s N -c`): a seed picks the
parameters, the student works the problem by hand, and solve mode prints the worked answer.
Every answer here comes from running the engine on the question's own tables, memslots or
machine (never from a table of answers), so a question cannot disagree with the notebooks.
This is the pure model: the `twodwalk quiz` command and the `Exercise` widget wrap it.

`quiz(seed, topic)` picks a question; `TOPICS` maps each topic to its seeded generator; the
`*_question` functions build one question from explicit parameters, for a notebook that wants a
particular case. The handler lab (`check_handler`) grades code instead of an answer: the
reader's EPT-violation handler, run on small guests in place of KVM's own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType

from twodwalk.errors import check_choice
from twodwalk.exercises.capstone import CAPSTONE_PARTS, _seeded_capstone, capstone_question
from twodwalk.exercises.ept_qualification import _seeded_qualification, ept_qualification_question
from twodwalk.exercises.error_code import _seeded_error_code, error_code_question
from twodwalk.exercises.grading import (
    SEED_LIMIT,
    Bases,
    Bit,
    Feedback,
    Grader,
    Question,
    SequenceReader,
    Value,
    ValueReader,
    check_seed,
    number_readings,
)
from twodwalk.exercises.grid import GRID_ASKS, _seeded_grid, grid_question
from twodwalk.exercises.guest_memfd import STORIES as GUEST_MEMFD_STORIES
from twodwalk.exercises.guest_memfd import _seeded_guest_memfd, guest_memfd_question
from twodwalk.exercises.handler import (
    EptViolation,
    HandlerReport,
    check_handler,
    reference_handler,
)
from twodwalk.exercises.indices import _seeded_indices, indices_question
from twodwalk.exercises.memslot import (
    SlotSpec,
    _seeded_memslot,
    memslot_question,
    memslots_of_machine_question,
)
from twodwalk.exercises.nested import NESTED_HISTORIES, _seeded_nested, nested_question
from twodwalk.exercises.npf import ENTRY_STORIES as NPT_ENTRY_STORIES
from twodwalk.exercises.npf import STORIES as NPF_STORIES
from twodwalk.exercises.npf import _seeded_npf, _seeded_npt_entry, npf_question, npt_entry_question
from twodwalk.exercises.references import _seeded_references, references_question
from twodwalk.exercises.roots import ROOT_WALKS, _seeded_roots, roots_question
from twodwalk.exercises.shadow import SHADOW_ACTIONS, _seeded_shadow, shadow_question
from twodwalk.exercises.tlb import TLB_PAGES, TLB_STEPS, _seeded_tlb, tlb_question
from twodwalk.exercises.translate import TRANSLATE_SPACES, _seeded_translate, translate_question
from twodwalk.exercises.translate_2d import _seeded_translate_2d, translate_2d_question
from twodwalk.exercises.what_if import STRUCTURES, WHAT_IFS, _seeded_what_if, what_if_question

__all__ = [
    "CAPSTONE_PARTS",
    "GRID_ASKS",
    "GUEST_MEMFD_STORIES",
    "NESTED_HISTORIES",
    "NPF_STORIES",
    "NPT_ENTRY_STORIES",
    "ROOT_WALKS",
    "SEED_LIMIT",
    "SHADOW_ACTIONS",
    "STRUCTURES",
    "TLB_PAGES",
    "TLB_STEPS",
    "TOPICS",
    "TRANSLATE_SPACES",
    "WHAT_IFS",
    "Bases",
    "Bit",
    "EptViolation",
    "Feedback",
    "Grader",
    "HandlerReport",
    "Question",
    "SequenceReader",
    "SlotSpec",
    "Value",
    "ValueReader",
    "capstone_question",
    "check_handler",
    "ept_qualification_question",
    "error_code_question",
    "grid_question",
    "guest_memfd_question",
    "indices_question",
    "memslot_question",
    "memslots_of_machine_question",
    "nested_question",
    "npf_question",
    "npt_entry_question",
    "number_readings",
    "quiz",
    "reference_handler",
    "references_question",
    "roots_question",
    "shadow_question",
    "tlb_question",
    "translate_2d_question",
    "translate_question",
    "what_if_question",
]

# --- choosing a question -------------------------------------------------------------------------

TOPICS: Mapping[str, Callable[[int], Question]] = MappingProxyType(
    {
        "indices": _seeded_indices,
        "references": _seeded_references,
        "error-code": _seeded_error_code,
        "translate": _seeded_translate,
        "translate-2d": _seeded_translate_2d,
        "memslot": _seeded_memslot,
        "ept-qualification": _seeded_qualification,
        "tlb": _seeded_tlb,
        "what-if": _seeded_what_if,
        "roots": _seeded_roots,
        "shadow": _seeded_shadow,
        "grid": _seeded_grid,
        "capstone": _seeded_capstone,
        "guest-memfd": _seeded_guest_memfd,
        "nested": _seeded_nested,
        "npf": _seeded_npf,
        "npt-entry": _seeded_npt_entry,
    }
)


def quiz(seed: int, topic: str | None = None) -> Question:
    """The question for `seed`: the same seed (and topic) always gives the same question.
    Without a topic, the seed picks one too."""
    check_seed(seed)
    if topic is None:
        topic = random.Random(seed).choice(tuple(TOPICS))
    return TOPICS[check_choice("topic", topic, tuple(TOPICS))](seed)
