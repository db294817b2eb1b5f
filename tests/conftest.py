"""Shared pytest configuration: deterministic Hypothesis runs."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=200,
    database=None,
)
settings.load_profile("ci")
