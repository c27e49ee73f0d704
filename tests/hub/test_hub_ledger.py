"""The hub's ledger database (rl/hub/ledger.py): what survives a crash, and how a hub restores from it.

A "crash" here is what it is in production: the process dies (SIGKILL) or the connection
goes away with nothing flushed since the last save. What was saved is guaranteed; what
was not is handed out again, never lost and never consumed twice.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl.config import load_config
from rl.hub.data import PromptSet
from rl.hub.ledger import LedgerStore, LedgerStoreError, remove
from rl.hub.state import HubState
from rl.hub.submissions import validate_submission
from rl.wire.protocol import (
    Completion,
    LeaseRequest,
    Ledger,
    RegisterRequest,
    ScoredCompletion,
    ScoredGroup,
    SubmitRequest,
    TaskResult,
)

ROOT = Path(__file__).resolve().parents[2]


def ledger(position: int, pending: list[int], batches: int = 0) -> Ledger:
    return Ledger(seed=0, num_rows=10, position=position, pending=pending, consumed=position - len(pending),
                  batches=batches)  # fmt: skip


def test_saves_round_trip_and_write_only_changes(tmp_path):
    path = tmp_path / "hub.sqlite"
    store = LedgerStore(path)
    assert store.ledger is None and store.policy_version == -1
    first = ledger(6, [0, 3, 4, 5], batches=1)
    assert store.save(first, 2)
    assert not store.save(first, 2)  # nothing changed: no write
    assert store.save(first, 3)
    store.close()

    store = LedgerStore(path)
    assert store.ledger == first and store.policy_version == 3
    second = ledger(9, [4, 5, 6, 7, 8], batches=2)
    store.save(second, 3, batch=("pull-a", b'{"groups": []}'))
    store.close()

    store = LedgerStore(path)
    assert store.ledger == second
    assert store.replay("pull-a") == b'{"groups": []}'
    assert store.replay("pull-b") is None and store.replay(None) is None
    rows = sqlite3.connect(path).execute("SELECT task_id FROM pending ORDER BY task_id").fetchall()
    assert [r[0] for r in rows] == [4, 5, 6, 7, 8]  # the consumed ids left the table
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_reset_to_a_checkpoint_ledger_replaces_everything(tmp_path):
    store = LedgerStore(tmp_path / "hub.sqlite")
    store.save(ledger(9, [7, 8], batches=3), 3, batch=("pull-a", b"{}"))
    checkpoint = ledger(4, [2, 3], batches=1)
    store.reset(checkpoint)
    assert store.ledger == checkpoint and store.replay("pull-a") is None and store.policy_version == -1
    store.close()
    reopened = LedgerStore(tmp_path / "hub.sqlite")
    assert reopened.ledger == checkpoint and reopened.replay("pull-a") is None
    reopened.reset(None)
    assert reopened.ledger is None


def test_operator_records_are_written_when_changed_and_outlive_a_reset(tmp_path):
    store = LedgerStore(tmp_path / "hub.sqlite")
    assert store.operators == {}
    assert store.save(ledger(2, [1]), 0, operators={"op-a": '{"q": ""}', "op-b": '{"q": "forged"}'})
    assert not store.save(ledger(2, [1]), 0, operators={"op-a": '{"q": ""}'})  # nothing new
    assert store.save(ledger(2, [1]), 0, operators={"op-a": '{"q": "picked"}'})
    store.reset(ledger(1, [0]))  # --resume rolls the data back, not a quarantine
    store.close()
    reopened = LedgerStore(tmp_path / "hub.sqlite")
    assert reopened.operators == {"op-a": '{"q": "picked"}', "op-b": '{"q": "forged"}'}


def test_unusable_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "hub.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerStoreError, match="unreadable.*delete it"):
        LedgerStore(bad)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER); INSERT INTO meta VALUES ('schema', 99);")
    db.commit()
    db.close()
    with pytest.raises(LedgerStoreError, match="schema 99"):
        LedgerStore(other)


def test_remove_takes_the_wal_files_too(tmp_path):
    path = tmp_path / "hub.sqlite"
    store = LedgerStore(path)
    store.save(ledger(2, [1]), 0)
    siblings = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    assert all(p.exists() for p in siblings)  # open connection: WAL and shared memory on disk
    store.close()
    for p in [path, *siblings]:
        p.touch()
    remove(path)
    assert not any(p.exists() for p in [path, *siblings])


def test_sigkill_keeps_every_committed_save(tmp_path):
    """A process saving in a loop is SIGKILLed: the database holds the last save it reported, or a later one."""
    path = tmp_path / "hub.sqlite"
    script = textwrap.dedent(f"""
        import sys
        from rl.hub.ledger import LedgerStore
        from rl.wire.protocol import Ledger
        store = LedgerStore({str(path)!r})
        for i in range(1, 1_000_000):
            pending = list(range(max(0, i - 5), i))  # five newest ids in flight, the rest consumed
            led = Ledger(seed=0, num_rows=10, position=i, pending=pending, consumed=i - len(pending), batches=i)
            store.save(led, i, batch=(f"pull-{{i}}", b"x" * 1000))
            print(i, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    reported = 0
    for line in proc.stdout:
        reported = int(line)
        if reported >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = LedgerStore(path)
    saved = store.ledger
    assert saved is not None and saved.position >= reported
    i = saved.position  # a save is all or nothing: every field from the same save
    assert saved.pending == list(range(i - 5, i)) and saved.batches == i and saved.consumed == i - 5
    assert store.policy_version == i and store.replay(f"pull-{i}") == b"x" * 1000


# --------------------------------------------------------------------------- a hub's state through a crash


def make_state(ledger: Ledger | None = None) -> HubState:
    cfg = load_config(None, ["sampling.n=2", "sampling.max_tokens=4", "trainer.prompts_per_step=2",
                             "trainer.micro_batch_size=2", "async.max_staleness=2"])  # fmt: skip
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    prompts = PromptSet(rows=rows, prompt_ids=[[1, 2, i] for i in range(10)], skipped_too_long=0)
    state = HubState(cfg, prompts, vocab_size=50, ledger=ledger)
    state.policy_version = 0
    return state


def lease(state: HubState, worker_id: str, max_tasks: int) -> list[int]:
    got = state.lease(LeaseRequest(worker_id=worker_id, policy_version=0, max_tasks=max_tasks), None, 0.0)
    return [t.task_id for t in got.tasks]


def generate(state: HubState, worker_id: str, task_ids: list[int]) -> None:
    """Submit and score the leased tasks (as the server does once the verifier pool answered)."""
    (lease_id,) = state.leased[task_ids[0]]
    results = [TaskResult(task_id=t, completions=[Completion(token_ids=[3], logprobs=[-0.5])] * 2) for t in task_ids]
    req = SubmitRequest(worker_id=worker_id, lease_id=lease_id, policy_version=0, results=results)
    state.accept(req, validate_submission(state, req, None)[0], 0.0)
    for t in task_ids:
        completions = [ScoredCompletion(token_ids=[3], logprobs=[-0.5], finish_reason="stop", reward=r, components={})
                       for r in (0.0, 1.0)]  # fmt: skip
        state.scored(ScoredGroup(task_id=t, row_index=state.task_rows[t], prompt_token_ids=[1], policy_version=0,
                                 worker_id=worker_id, worker_name="w", completions=completions))  # fmt: skip


def test_hub_restored_from_the_database_loses_nothing_and_repeats_nothing(tmp_path):
    """The hub's discipline (rl/hub/service.py): a batch commits before its answer; leases are flushed lazily."""
    path = tmp_path / "hub.sqlite"
    store = LedgerStore(path)
    state = make_state()
    wid = state.register(RegisterRequest(name="w"), None, 0.0).worker_id
    first = lease(state, wid, 4)
    generate(state, wid, first)
    groups, _, _ = state.take_batch(2, step=0, skip_zero_variance=False)
    trained = [g.task_id for g in groups]
    store.save(state.ledger(), state.policy_version, batch=("pull-1", b"the answer"))  # before answering
    in_flight = [t for t in first if t not in trained]  # buffered, never handed to the trainer
    leased_late = lease(state, wid, 2)  # after the last flush: the crash loses these leases' record
    store.close()  # the crash: nothing written after the batch

    store = LedgerStore(path)
    restored = make_state(store.ledger)
    assert restored.batches == 1 and restored.consumed == 2
    assert store.replay("pull-1") == b"the answer"  # the trainer's retry of that pull gets it again
    wid = restored.register(RegisterRequest(name="w"), None, 0.0).worker_id
    handed = lease(restored, wid, 6)
    # In flight at the crash: generated again first; then the unrecorded leases' ids, in the same order.
    assert handed[: len(in_flight)] == sorted(in_flight)
    assert handed[len(in_flight) :] == leased_late == [4, 5]
    assert not set(handed) & set(trained)  # consumed stays consumed
    for t in handed:
        assert restored.task_rows[t] == state.order.index_of(t)  # same id, same prompt


def test_restarted_hub_serves_the_newest_version_on_disk(tmp_path, caplog):
    """v2 was written and announced, but the hub died before recording it: the files win, the ledger follows."""
    import torch

    from rl.hub.service import Hub
    from rl.weights.store import write_version

    policy = tmp_path / "policy"
    for version in (0, 1, 2):
        write_version(policy, version, {"w": torch.zeros(2)}, "float32")
    store = LedgerStore(tmp_path / "hub.sqlite")
    store.save(make_state().ledger(), 1)
    state = make_state(store.ledger)
    state.policy_version = -1  # as a new hub starts
    Hub(state.cfg, state, pool=None, tokenizer=None, policy_dir=policy, tokens=None, store=store)
    assert state.policy_version == 2 and store.policy_version == 2
    assert "the ledger says policy version 1 was published, the newest on disk is 2" in caplog.text
