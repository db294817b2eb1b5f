"""The exercise's model: one seeded question, the feedback on an answer, hint and solution.

As in the OSTEP homework simulators, a seed names the question, so "seed 7" is the same
question for every student and the lecturer; "New question" moves to the next seed.
"""

from __future__ import annotations

from twodwalk.errors import TwodwalkError, check_choice
from twodwalk.exercises import SEED_LIMIT, TOPICS, Feedback, Question, quiz


class ExerciseModel:
    """The question shown and the feedback on the last answer."""

    def __init__(self, question_or_seed: Question | int, topic: str | None = None) -> None:
        if topic is not None:
            check_choice("topic", topic, tuple(TOPICS))
        self.topic = topic
        self.seed: int | None = None
        if isinstance(question_or_seed, Question):
            self.question = question_or_seed
        else:
            self.seed = question_or_seed
            self.question = quiz(question_or_seed, topic)
        self.feedback: Feedback | None = None

    @property
    def title(self) -> str:
        """The question's parameters, echoed so that anyone can ask for it again."""
        seed = "" if self.seed is None else f", seed {self.seed}"
        return f"Exercise: {self.question.topic}{seed}"

    def check(self, answer: str) -> Feedback:
        """Judge an answer with the question's own grader (any reasonable notation)."""
        if not answer.strip():
            self.feedback = Feedback(False, "Type an answer in the box first.")
        else:
            self.feedback = self.question.check(answer)
        return self.feedback

    def show_hint(self) -> str:
        return self.question.hint

    def reveal(self) -> str:
        return self.question.solution

    @property
    def can_advance(self) -> bool:
        return self.seed is not None

    def new_question(self) -> Question:
        """The next seed's question (of the same topic, if one was chosen)."""
        if self.seed is None:
            raise TwodwalkError(
                "this exercise was given a Question, not a seed: it has no next one"
            )
        self.seed = (self.seed + 1) % SEED_LIMIT
        self.question = quiz(self.seed, self.topic)
        self.feedback = None
        return self.question
