"""Training and evaluation prompts: load rows, apply the chat template, tokenize, order deterministically.

Rows come from reasoning-gym (procedural, offline), a JSONL file, or an HF
`datasets` source. Every row becomes a plain dict that the verifiers see as
`example` (`question`, `answer`, plus the source's own columns); the hub sends
workers only the token ids of the templated prompt.

`PromptOrder` gives the sequence of row indices the hub hands out: a seeded
permutation per epoch, so a run (and a resumed run) sees the same data order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl.config import DataConfig, EnvSource, HFDatasetSource, HumanEvalSource, JsonlSource, ReasoningGymSource

log = logging.getLogger(__name__)

# Eval rows of procedural sources come from a generator seeded apart from the training one.
EVAL_SEED_OFFSET = 1_000_003


class DataError(ValueError):
    """A data source that cannot be loaded or has the wrong shape."""


def _json_safe(value: Any) -> Any:
    """Rows cross process and HTTP boundaries as JSON: tuples become lists, etc."""
    return json.loads(json.dumps(value, default=str))


def _reasoning_gym_rows(src: ReasoningGymSource, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(src.dataset, size=size, seed=seed, **src.params)
    except Exception as e:  # unknown name or bad params: reasoning-gym raises various types
        raise DataError(f"reasoning-gym dataset {src.dataset!r} with params {src.params}: {e}") from e
    return [_json_safe(dict(entry)) for entry in dataset]


def jsonl_objects(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSON-lines file; `error` names the file and the first
    bad line (a missing file, invalid JSON, or a value that is not an object)."""
    if not path.is_file():
        raise error(f"file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _table_rows(src: JsonlSource | HFDatasetSource) -> list[dict]:
    if isinstance(src, JsonlSource):
        rows = [row for _, row in jsonl_objects(src.path, DataError)]
    else:
        import datasets

        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, data_files=src.data_files)
        except Exception as e:
            raise DataError(f"could not load dataset {src.path!r} (split {src.split!r}): {e}") from e
        rows = [_json_safe(dict(r)) for r in ds]
    out = []
    for i, row in enumerate(rows):
        for field in (src.prompt_field, src.answer_field):
            if field not in row:
                raise DataError(f"row {i} of {src.path} has no column {field!r} (columns: {sorted(row)})")
        out.append({**row, "question": row[src.prompt_field], "answer": row[src.answer_field]})
    return out


def load_rows(data: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for the configured source; no training row asks an eval row's question."""
    src = data.source
    if isinstance(src, EnvSource):
        from rl.envs import make

        env = make(src.name, src.params)
        train = env.rows(src.size, data.seed)
        evals = env.rows(data.eval_size, data.seed + EVAL_SEED_OFFSET) if data.eval_size else []
        return train, evals  # a game's first message repeats; its rows differ in what only the hub sees
    if isinstance(src, ReasoningGymSource):
        train = _reasoning_gym_rows(src, src.size, data.seed)
        evals = _reasoning_gym_rows(src, data.eval_size, data.seed + EVAL_SEED_OFFSET) if data.eval_size else []
        return _held_out(train, evals), evals
    if isinstance(src, HumanEvalSource):
        from verifiers.humaneval import load_humaneval

        rows = load_humaneval(src.limit)
    else:
        rows = _table_rows(src)
    if data.eval_size >= len(rows):
        raise DataError(f"data.eval_size ({data.eval_size}) leaves no training rows (source has {len(rows)})")
    cut = len(rows) - data.eval_size
    return _held_out(rows[:cut], rows[cut:]), rows[cut:]


def _held_out(train: list[dict], evals: list[dict]) -> list[dict]:
    """`train` without the rows whose question is also an eval question: a small procedural space
    (one-digit sums) repeats questions, and an eval the policy trained on measures memory, not skill."""
    asked = {str(row["question"]).strip() for row in evals}
    kept = [row for row in train if str(row["question"]).strip() not in asked]
    if len(kept) < len(train):
        log.info("held out %d of %d training rows that ask an eval question", len(train) - len(kept), len(train))
    if not kept:
        raise DataError(f"every training row asks one of the {len(evals)} eval questions: lower data.eval_size")
    return kept


def build_messages(row: dict, data: DataConfig) -> list[dict[str, str]]:
    """Chat messages for a row: system prompt, few-shot turns, then the question."""
    question = row["question"]
    if isinstance(question, list):  # already a conversation
        return list(question)
    messages: list[dict[str, str]] = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    for shot in data.few_shot:
        messages.append({"role": "user", "content": shot.question})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": str(question)})
    return messages


def tokenize_prompt(tokenizer, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
    """The prompt's ids by the model's chat template; `tools` (OpenAI function schemas, a row's `tools`) are
    shown the way the template shows them (Qwen2.5: in the system turn, calls as `<tool_call>` JSON)."""
    enc = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)  # fmt: skip
    return list(enc["input_ids"])


@dataclass
class PromptSet:
    """Rows with their templated, tokenized prompts; rows too long are dropped and counted."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    skipped_too_long: int

    @classmethod
    def build(cls, rows: list[dict], data: DataConfig, tokenizer) -> PromptSet:
        kept, ids, skipped = [], [], 0
        tooled = next((row for row in rows if row.get("tools")), None)
        if tooled is not None and tokenize_prompt(tokenizer, build_messages(tooled, data), tooled["tools"]) == (
            tokenize_prompt(tokenizer, build_messages(tooled, data))
        ):
            log.warning("the rows come with tools, but the model's chat template does not show them: the model "
                        "is not told its tools (use a model whose template shows tools, e.g. Qwen2.5, or "
                        "describe them in data.system_prompt)")  # fmt: skip
        for row in rows:
            tokens = tokenize_prompt(tokenizer, build_messages(row, data), row.get("tools"))
            if len(tokens) > data.max_prompt_tokens:
                skipped += 1
                continue
            kept.append(row)
            ids.append(tokens)
        if skipped:
            log.warning("skipped %d prompts longer than data.max_prompt_tokens=%d", skipped, data.max_prompt_tokens)
        if not kept:
            raise DataError("no prompt fits data.max_prompt_tokens; raise it or shorten the prompts")
        return cls(kept, ids, skipped)

    def __len__(self) -> int:
        return len(self.rows)


class PromptOrder:
    """Deterministic, resumable order of row indices: a fresh seeded permutation per epoch."""

    def __init__(self, num_rows: int, seed: int, position: int = 0):
        if num_rows <= 0:
            raise DataError("empty prompt set")
        self.num_rows = num_rows
        self.seed = seed
        self.position = position  # how many indices were handed out so far, across epochs
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def index_of(self, seq: int) -> int:
        """Row index of task sequence number `seq` (any seq already or not yet handed out)."""
        epoch, offset = divmod(seq, self.num_rows)
        return int(self._permutation(epoch)[offset])

    def next(self) -> tuple[int, int]:
        """(task sequence number, row index)."""
        epoch, offset = divmod(self.position, self.num_rows)
        index = int(self._permutation(epoch)[offset])
        seq = self.position
        self.position += 1
        return seq, index
