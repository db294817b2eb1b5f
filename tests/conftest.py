"""Shared pytest configuration: deterministic Hypothesis runs, and the slow groups marked so
that `make check` can leave them out (`pytest -m "not slow"`)."""

from __future__ import annotations

import pytest
from hypothesis import settings

# Test modules whose every test is slow, and the marker that names the group.
SLOW_GROUPS = {
    "test_notebooks": "notebooks",
    "test_browser": "browser",
    "test_binder_install": "binder",
    "test_realkvm": "realkvm",
    "test_realkvm_runner": "realkvm",
    "test_realkvm_sequences": "realkvm",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test of a slow group with its group's marker and with `slow`."""
    for item in items:
        group = SLOW_GROUPS.get(item.path.stem)
        if group is not None:
            item.add_marker(getattr(pytest.mark, group))
            item.add_marker(pytest.mark.slow)


settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=200,
    database=None,
)
settings.load_profile("ci")
