"""Write docs/configuration.md from the pydantic config models (field types, defaults, docs).

Run after changing rl/config/: `python scripts/gen_config_docs.py`. A test checks the file is current.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl.config import RunConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _type_name(ann) -> str:
    text = str(ann).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("rl.config.sections.", "").replace("rl.config.", "")
    return text.replace("<class '", "").replace("'>", "")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{value!r}`"
    return "required" if field.is_required() else f"`{field.default!r}`"


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    nested = []
    rows = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{prefix}{key}", ann, field.description))
            continue
        optional = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], BaseModel):
            # An optional section (e.g. trainer.lora): off by default, documented like the others.
            nested.append((f"{prefix}{key}", optional[0], f"{field.description} Off unless set."))
        symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
        bounds = " ".join(
            f"{symbols[attr]} {getattr(m, attr)}" for m in field.metadata for attr in symbols if hasattr(m, attr)
        )
        desc = (field.description or "").replace("|", "\\|")
        tname = _type_name(ann).replace("|", "\\|")
        rows.append(f"| `{prefix}{key}` | {tname} | {_default(field)} | {bounds} | {desc} |")
    if rows:
        out.append("| key | type | default | bounds | meaning |\n| --- | --- | --- | --- | --- |")
        out.extend(rows)
        out.append("")
    for key, sub, desc in nested:
        out.append(f"## `{key}`\n\n{desc or ''}\n")
        _section(sub, f"{key}.", out)


def render() -> str:
    out = [
        "# Configuration reference\n",
        "Generated from `rl/config/` by `scripts/gen_config_docs.py`; do not edit by hand.",
        "A run file sets only what differs from these defaults; `rl train CONFIG --dry-run` prints the",
        "resolved config. Data sources are a discriminated union on `data.source.type`:",
        "`reasoning_gym` (dataset, params, size), `jsonl` (path, prompt_field, answer_field) or",
        "`hf` (path, name, split, data_files, prompt_field, answer_field) or `humaneval` (limit).\n",
        "## top level\n",
    ]
    _section(RunConfig, "", out)
    source_union = RunConfig.model_fields["data"].annotation.model_fields["source"].annotation
    for src in typing.get_args(source_union):
        out.append(f"## `data.source` with type `{src.model_fields['type'].default}`\n")
        _section(src, "data.source.", out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
