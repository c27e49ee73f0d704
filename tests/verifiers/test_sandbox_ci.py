"""Without bubblewrap, sandbox tests skip on a laptop but fail in CI (CI=true), so CI cannot go green unchecked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_sandbox_test(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no bwrap on it
    if ci is not None:
        env["CI"] = ci
    test = "tests/verifiers/test_code_exploits.py::test_the_hunts_work_when_tests_share_the_interpreter"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_missing_bubblewrap_skips_outside_ci_and_fails_in_ci(tmp_path: Path) -> None:
    local = run_sandbox_test(tmp_path, None)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
    ci = run_sandbox_test(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "CI=true but the sandbox cannot run here" in ci.stdout and "bwrap" in ci.stdout
