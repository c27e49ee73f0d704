"""The obvious games against the contribution record, played against a real hub process (`rl hub`) over HTTP,
with the trainer's own receipt signer (rl/trainer/receipts.py) on the batches it pulls.

- No receipt for a task the contributor did not hold (another's lease, another's worker id), for work of a
  quarantined operator (buffered or later), or for a masked sequence; quarantined time is recorded.
- Registering again (a new worker id, another token, after a restart) adds to the same record.
- A hub SIGKILLed and restarted keeps every committed count and trained entry, and a step's receipt sent
  again (the trainer's retry of a lost answer) replaces that step instead of adding to it.
"""

from __future__ import annotations

import signal
import sqlite3

import pytest
import torch
from helpers.contributions import generate, lease, register, submit, wait_until
from helpers.hub import ADMIN, OPERATORS, OTHER_WORKER, WORKER, free_port, publish_initial_policy, start_hub
from helpers.hub import write_config as write_hub_config

from rl.cli.contributions import fetch
from rl.hub.contribution_db import report
from rl.rundir import RunDir
from rl.trainer.receipts import Receipts
from rl.wire.admin import HubAdmin
from rl.wire.identity import public_id, write_key
from rl.wire.receipts import totals, verify_contributions
from rl.wire.tokens import token_id

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture
def keys(tmp_path) -> dict:
    paths = {name: tmp_path / f"{name}.pem" for name in ("alice", "bob")}
    for path in paths.values():
        write_key(path)
    return paths


def rows_of(run_dir) -> dict[str, dict]:
    return {r["contributor"]: r for r in report(RunDir(run_dir).hub_db)}


def train(admin: HubAdmin, receipts: Receipts, step: int, num_groups: int, masked: int = 0) -> list:
    """Pull a batch as the trainer does and sign its step, the first `masked` sequences masked (a logprob
    mismatch); returns the batch's groups."""
    groups = admin.pull(num_groups, step - 1, timeout_s=60.0).groups
    assert len(groups) == num_groups
    sequences = sum(len(g.completions) for g in groups)
    mask, codes = torch.ones(sequences, 4), torch.zeros(sequences, dtype=torch.long)
    mask[:masked], codes[:masked] = 0, 1
    receipts.issue(step, groups, mask, codes)
    return groups


def test_no_receipt_for_work_not_held_quarantined_or_masked(tmp_path, tiny_model_dir, keys):
    run_dir = tmp_path / "run"
    publish_initial_policy(run_dir, tiny_model_dir)
    hub = start_hub(write_hub_config(run_dir, tiny_model_dir), tmp_path / "hub.log")
    alice, bob = public_id_of(keys["alice"]), public_id_of(keys["bob"])
    carol = f"token:{token_id(OPERATORS[0])}"
    try:
        with hub.client(WORKER) as a, hub.client(OTHER_WORKER) as b, hub.client(OPERATORS[0]) as c, \
                HubAdmin(hub.url, ADMIN) as admin:  # fmt: skip
            receipts = Receipts(RunDir(run_dir), admin)
            a_id, b_id, c_id = register(a, load(keys["alice"])), register(b, load(keys["bob"])), register(c)
            lease_id, tasks = lease(a, a_id, 2)
            stolen = submit(b, b_id, lease_id, tasks)  # alice's lease, bob's registration
            assert stolen.status_code == 403 and stolen.json()["reason"] == "not_your_lease", stolen.text
            posing = submit(b, a_id, lease_id, tasks)  # alice's worker id, from bob's token
            assert posing.status_code == 403 and posing.json()["reason"] == "not_your_worker", posing.text
            assert submit(a, a_id, lease_id, tasks).status_code == 200
            carols = generate(c, c_id, 2)
            wait_until(lambda: admin.status().buffered == 4, "4 groups scored")
            admin.quarantine(c_id, "test: a cherry-picker")  # her buffered groups go back to the queue
            assert c.post("/v1/leases", json={"worker_id": c_id, "policy_version": 0}).status_code == 403
            groups = train(admin, receipts, 1, 2)
            assert {g.task_id for g in groups} == set(tasks) and {g.contributor for g in groups} == {alice}
            again = generate(a, a_id, 2)  # carol's tasks, re-queued: now alice's work
            assert sorted(again) == sorted(carols)
            wait_until(lambda: admin.status().buffered == 2, "alice's 2 groups scored")
            train(admin, receipts, 2, 2, masked=1)  # one sequence of alice's masked by the checks
            live = wait_until(lambda: {r.contributor: r for r in admin.status().contributors}, "status")
            assert live[alice].trained_samples == 7 and live[alice].share == 1.0  # `rl status`' share column
            assert live[bob].counts["rejected_groups"] == 2 and live[alice].counts["masked_samples"] == 1
        docs = {who: fetch(hub.url, token, keys.get(who), None) for who, token in
                (("alice", WORKER), ("bob", OTHER_WORKER), ("carol", OPERATORS[0]))}  # fmt: skip
        run_key = public_id(receipts.key)
        assert all(verify_contributions(d, run_key) == [] for d in docs.values())
        assert totals(docs["alice"]) == {"steps": 2, "groups": 4, "samples": 7, "tokens": 14}  # 8 sent, 1 masked
        assert totals(docs["bob"])["groups"] == totals(docs["carol"])["groups"] == 0
        rows = wait_until(lambda: (r := rows_of(run_dir)).get(carol, {}).get("quarantined_s") and r,
                          "carol's quarantined time written")  # fmt: skip
        assert rows[alice]["trained_samples"] == 7 and rows[alice]["masked"] == {"logprob_mismatch": 1}
        assert rows[alice]["masked_tokens"] == 2 and rows[alice]["share"] == 1.0
        assert rows[bob]["rejected"] == {"not_your_lease": 2} and rows[bob]["rejected_tokens"] == 8
        assert rows[bob]["trained_samples"] == 0
        assert rows[carol]["scored_groups"] == 2 and rows[carol]["trained_samples"] == 0  # work done, not trained
        assert rows[carol]["quarantined_s"] > 0 and rows[alice]["quarantined_s"] == 0
    finally:
        hub.stop()


def test_a_killed_hub_keeps_the_record_and_registering_again_adds_to_it(tmp_path, tiny_model_dir, keys):
    run_dir, port = tmp_path / "run", free_port()
    publish_initial_policy(run_dir, tiny_model_dir)
    config = write_hub_config(run_dir, tiny_model_dir)
    hub = start_hub(config, tmp_path / "hub.log", port=port)
    alice, anonymous = public_id_of(keys["alice"]), f"token:{token_id(OTHER_WORKER)}"
    try:
        with hub.client(WORKER) as a, hub.client(OTHER_WORKER) as o, HubAdmin(hub.url, ADMIN) as admin:
            receipts = Receipts(RunDir(run_dir), admin)
            generate(a, register(a, load(keys["alice"])), 2)
            generate(o, register(o), 2)
            wait_until(lambda: admin.status().buffered == 4, "4 groups scored")
            train(admin, receipts, 1, 2)
        # the hub writes its counts every 0.5 s: wait for every submission and score to be on disk, then kill
        before = wait_until(lambda: (r := rows_of(run_dir)) and all(r.get(c, {}).get("scored_groups") == 2
                                                                    for c in (alice, anonymous)) and r,
                            "the counts written")  # fmt: skip
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait()

        hub = start_hub(config, tmp_path / "hub.log", port=port)
        assert rows_of(run_dir) == before, "a restarted hub reads back the same record"
        with hub.client(WORKER) as a, hub.client(OPERATORS[1]) as a2, HubAdmin(hub.url, ADMIN) as admin:
            admin.record_receipt(receipts.last)  # the trainer's retry of step 1 (its answer was lost)
            receipts = Receipts(RunDir(run_dir), admin)
            a_id = register(a, load(keys["alice"]))  # alice again: a new worker id
            register(a2, load(keys["alice"]))  # and under another token
            generate(a, a_id, 2)  # the 2 tasks the killed hub held, re-queued
            wait_until(lambda: admin.status().buffered == 2, "2 groups scored")
            train(admin, receipts, 2, 2)
        after = wait_until(lambda: (r := rows_of(run_dir))[alice]["scored_groups"] == 4 and r, "the counts written")
        with sqlite3.connect(RunDir(run_dir).hub_db) as db:
            stored = db.execute("SELECT step, COUNT(*) FROM contrib_trained GROUP BY step ORDER BY step").fetchall()
            assert db.execute("SELECT step FROM contrib_receipts ORDER BY step").fetchall() == [(1,), (2,)]
        assert stored == [(1, 2), (2, 2)], "step 1 stored once, though reported twice"
        mine, old = after[alice], before[alice]
        assert mine["trained_groups"] == old["trained_groups"] + 2, "not reset, not doubled"
        assert mine["submitted_groups"] == old["submitted_groups"] + 2
        assert mine["registrations"] == 3 and mine["tokens"] == sorted({token_id(WORKER), token_id(OPERATORS[1])})
        assert after[anonymous] | {"last_seen": 0} == before[anonymous] | {"last_seen": 0, "share": after[anonymous]
                                                                             ["share"]}  # fmt: skip
        assert mine["first_seen"] == old["first_seen"]
        doc = fetch(hub.url, WORKER, keys["alice"], None)
        assert verify_contributions(doc, public_id(receipts.key)) == []
        assert totals(doc)["steps"] == 2 and totals(doc)["groups"] == mine["trained_groups"]
    finally:
        hub.stop()


def load(path):
    from rl.wire.identity import load_key

    return load_key(path)


def public_id_of(path) -> str:
    return public_id(load(path))
