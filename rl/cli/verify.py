"""`rl verify`: score a JSONL file of completions with the configured or named rewards.

Each input line is an object `{"completion": ..., "answer": ..., <other example
columns>}`; everything but `completion` is the example the verifiers see. The
command prints a per-row table and a summary, and with `--output` writes one
JSON object per input row, in order (`reward`, `components`, `info`). It is the
tool to debug a reward before spending GPU hours on it. Exit codes: 0 scored,
2 bad input (missing file, bad JSON line, unknown reward, no sandbox).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import mean
from typing import Any

from rich.console import Console
from rich.table import Table

from rl.hub.data import jsonl_objects
from verifiers.base import Reward, VerifierError

MAX_TABLE_ROWS = 200


class InputError(ValueError):
    """Unusable input: the message names the file and line."""


def parse_reward_names(spec: str) -> list[Any]:
    """`math,format,reasoning_gym:basic_arithmetic,pkg.mod:fn` -> RewardTerms (weight 1 each)."""
    from rl.config import RewardTerm

    terms = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        head, _, rest = name.partition(":")
        if head == "reasoning_gym" and rest:
            terms.append(RewardTerm(name="reasoning_gym", params={"dataset": rest}))
        else:
            terms.append(RewardTerm(name=name))
    if not terms:
        raise InputError("--rewards names no reward (e.g. --rewards math,format)")
    return terms


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(completion, example) per non-blank line; `InputError` names the first bad line."""
    items = []
    for lineno, row in jsonl_objects(path, InputError):
        completion = row.pop("completion", None)
        if not isinstance(completion, str):
            raise InputError(f"{path}:{lineno}: needs a string field 'completion'")
        items.append((completion, row))
    if not items:
        raise InputError(f"input file {path} has no rows")
    return items


def _table(rewards: list[Reward], term_names: list[str]) -> Table:
    table = Table(title="rewards", show_lines=False)
    table.add_column("row", justify="right")
    table.add_column("reward", justify="right")
    for name in term_names:
        table.add_column(name, justify="right")
    table.add_column("info", overflow="fold", max_width=60)
    for i, r in enumerate(rewards[:MAX_TABLE_ROWS]):
        cells = [f"{r.components.get(n, 0.0):.3g}" for n in term_names]
        table.add_row(str(i), f"{r.value:.3f}", *cells, r.info[:200])
    return table


def run_verify(cfg: Any, rewards: str | None, input: Path, output: Path | None) -> int:
    """Score `input` with `cfg.rewards` or the comma-separated `rewards` names; returns the exit code."""
    from verifiers.pool import VerifierPool
    from verifiers.terms import resolve_all

    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:
        terms = parse_reward_names(rewards) if rewards is not None else list(cfg.rewards.terms)
        workers = cfg.rewards.workers if cfg is not None else 2
        timeout_s = cfg.rewards.timeout_s if cfg is not None else 5.0
        resolve_all(terms, timeout_s)  # name and param errors first: cheap, and no processes started
        items = read_rows(Path(input))
        pool = VerifierPool(terms, workers=workers, timeout_s=timeout_s)
    except (InputError, VerifierError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    start = time.perf_counter()
    try:
        with pool:
            results = pool.score_many_sync(items)
            metrics = pool.metrics()
    except VerifierError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    elapsed = time.perf_counter() - start
    names = [t.name for t in pool.terms]
    out.print(_table(results, names))
    if len(results) > MAX_TABLE_ROWS:
        out.print(f"... {len(results) - MAX_TABLE_ROWS} more rows (all of them in --output)")
    summary = [f"rows: {len(results)}", f"mean reward: {mean(r.value for r in results):.4f}"]
    summary += [f"{n}: {mean(r.components.get(n, 0.0) for r in results):.4f}" for n in names]
    summary += [
        f"timeouts: {metrics['verifier/timeouts']:.0f}",
        f"errors: {metrics['verifier/errors']:.0f}",
        f"{elapsed:.1f}s incl. start-up",
    ]
    out.print("summary  " + "  ".join(summary), highlight=False)
    if output is not None:
        with Path(output).open("w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({"reward": r.value, "components": r.components, "info": r.info}) + "\n")
        out.print(f"wrote {len(results)} results to {output}", highlight=False)
    return 0
