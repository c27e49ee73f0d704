"""Shared by the sandbox tests: skip without bubblewrap on a laptop, fail without it in CI.

A CI machine that cannot run the sandbox would otherwise skip every hostile-code
test and report green, so with `CI=true` (GitHub Actions and most CI services set
it) a missing or broken bubblewrap fails those tests instead.
"""

from __future__ import annotations

import os

import pytest

from verifiers import sandbox


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def sandbox_required() -> None:
    """Use as `pytestmark = pytest.mark.usefixtures("sandbox_required")` (after importing it)."""
    reason = sandbox._probe()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI=true but the sandbox cannot run here (tests that need it must not skip): {reason}")
    pytest.skip(f"no sandbox here: {reason}")
