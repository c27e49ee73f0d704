"""Write a benchmark's results into its own `## <title>` section of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(title: str, script: str, body: str) -> None:
    """Replace (or append) the section `## title`; notes the script, date and machine."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    stamp = f"`{script}`, {datetime.date.today()}, {platform.machine()} {platform.system()}"
    section = f"## {title}\n\nMeasured by {stamp}.\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.write_text(text.rstrip() + "\n")
