"""The layout's rules, checked: import-linter's contracts (pyproject.toml) and the size of library files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("rl", "rollout_workers", "verifiers")
MAX_LINES = 600


def test_import_contracts_hold():
    """Roles import only shared leaves, verifiers nothing of rl, no circles: `lint-imports` from pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def test_library_files_stay_small():
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for d in LIBRARY for p in (ROOT / d).rglob("*.py")}
    too_long = {str(p): n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines (split by responsibility): {too_long}"
