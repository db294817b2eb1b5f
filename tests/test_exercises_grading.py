"""The exercises as a whole (every topic seeded, solved, graded; how answers are read; bad
input)."""

from __future__ import annotations

import dataclasses

import pytest
from exercise_support import ALL_TOPICS, BIOS_HVA, GIB, MIB, RAM_HVA, SEEDS, wrong
from hypothesis import given, settings
from hypothesis import strategies as st

from twodwalk.errors import TwodwalkError
from twodwalk.exercises import (
    SEED_LIMIT,
    TOPICS,
    Feedback,
    ept_qualification_question,
    indices_question,
    memslot_question,
    number_readings,
    quiz,
    references_question,
    translate_question,
)

# --- every topic ---------------------------------------------------------------------------------


def test_topics_cover_the_required_ones() -> None:
    required = {"indices", "references", "error-code", "translate", "memslot", "ept-qualification"}
    assert required | {"tlb", "what-if", "roots", "shadow"} <= set(TOPICS)


@pytest.mark.parametrize("topic", ALL_TOPICS)
@pytest.mark.parametrize("seed", SEEDS)
def test_canonical_answer_is_accepted_and_shown(topic: str, seed: int) -> None:
    """Self-consistency only: the grader reads its own canonical answer back and the solution
    prints it. That the answer is *right* is checked against hand-worked values in each
    topic's section below (e.g. test_seeded_translate_follows_the_raw_entries)."""
    q = quiz(seed, topic)
    assert q.topic == topic
    assert q.check(q.answer) == Feedback(True, "Correct.")
    assert f"Answer: {q.answer}" in q.solution
    assert q.prompt and q.hint and q.solution.count("\n") >= 2


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_same_seed_same_question(topic: str) -> None:
    for seed in SEEDS:
        first, again = quiz(seed, topic), quiz(seed, topic)
        assert first == again
        assert (first.prompt, first.solution, first.answer) == (
            again.prompt,
            again.solution,
            again.answer,
        )
        assert TOPICS[topic](seed) == first


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_different_seeds_vary(topic: str) -> None:
    questions = [quiz(seed, topic) for seed in range(20)]
    assert len({q.prompt for q in questions}) >= 15
    assert len({q.answer for q in questions}) >= 3


def test_without_a_topic_the_seed_picks_one() -> None:
    picked = [quiz(seed) for seed in range(30)]
    assert len({q.topic for q in picked}) >= 4
    for seed, q in enumerate(picked):
        assert q == quiz(seed) == quiz(seed, q.topic)


@settings(max_examples=25)
@given(seed=st.integers(0, SEED_LIMIT - 1), topic=st.sampled_from(ALL_TOPICS))
def test_any_seed_builds_a_question(seed: int, topic: str) -> None:
    """Every seed in range builds a question without error (self-consistency again, not
    correctness: the grader reads its own answer back and the solution shows it)."""
    q = quiz(seed, topic)
    assert q.topic == topic and q.check(q.answer).correct
    assert q.answer in q.solution


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_unreadable_answers_say_what_format_is_expected(topic: str) -> None:
    q = quiz(0, topic)
    for junk in ("", "   ", "banana split", "0xZZ"):
        message = wrong(q, junk)
        assert message.startswith(f"Cannot read {junk!r}: give ")


def test_questions_and_feedback_are_frozen() -> None:
    q = quiz(1, "indices")
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.answer = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.check(q.answer).correct = False  # type: ignore[misc]


# --- reading numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "bare", "readings"),
    [
        ("0x1F", (16, 10), (31,)),
        ("1f", (10,), (31,)),
        ("1fh", (10,), (31,)),
        ("0b101", (16,), (5,)),
        ("0x7f00_1234", (16,), (0x7F00_1234,)),
        ("10", (16, 10), (16, 10)),
        ("10", (10,), (10,)),
        ("7", (16, 10), (7,)),
        ("0xg", (16,), ()),
        ("12.5", (10,), ()),
    ],
)
def test_number_readings(token: str, bare: tuple[int, ...], readings: tuple[int, ...]) -> None:
    assert number_readings(token.lower(), bare) == readings


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "match"),
    [
        (-1, r"seed=-0x1 is out of range: valid is 0 <= seed < 2\*\*63"),
        (SEED_LIMIT, r"seed=.* is out of range"),
        ("3", r"seed must be an integer, got '3' \(str\)"),
        (1.5, r"seed must be an integer, got 1.5 \(float\)"),
        (True, r"seed must be an integer, got True \(bool\)"),
    ],
)
def test_bad_seeds(seed: object, match: str) -> None:
    with pytest.raises(TwodwalkError, match=match):
        quiz(seed)  # type: ignore[arg-type]
    with pytest.raises(TwodwalkError, match=match):
        TOPICS["indices"](seed)  # type: ignore[arg-type]


def test_unknown_topic_lists_the_valid_ones() -> None:
    with pytest.raises(TwodwalkError, match=r"topic='cache' is not valid: choose one of indices,"):
        quiz(1, "cache")


def test_bad_builder_arguments() -> None:
    with pytest.raises(TwodwalkError, match=r"guest_page=8192 is not valid: choose 4096"):
        references_question(guest_page=8192)
    with pytest.raises(TwodwalkError, match=r"guest_levels='3' is not valid"):
        references_question(3, 4)
    with pytest.raises(TwodwalkError, match=r"which='data' is not valid: choose one of table"):
        ept_qualification_question("read", which="data")
    with pytest.raises(TwodwalkError, match=r"takes no EPT violation for the final page"):
        ept_qualification_question("read", first_read=True)
    with pytest.raises(TwodwalkError, match=r"gpa=0x1000 is out of range"):
        translate_question([(0x40_0000, 0x1000, 4096)], 0x40_0000)
    with pytest.raises(TwodwalkError, match=r"not canonical"):
        indices_question(0x8000_0000_0000)
    with pytest.raises(TwodwalkError, match=r"EEXIST"):
        memslot_question([(0, 0, 0, GIB, RAM_HVA), (1, 0, MIB, MIB, BIOS_HVA)], 0)
