"""Contributions on the hub (rl/hub/contributions.py) over real HTTP: identities, receipts, who may read them.

Registrations prove an identity by signing a challenge; receipts go only to the contributor they name (its
key's signature of a fresh challenge, its own token) or the admin; the ledger's tables survive a reopened
database and a step reported twice is stored once. What the trainer puts in a receipt (only unmasked
sequences) is `step_entries`, tested here on a batch with masked sequences.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.contributions import scored_group
from helpers.hub import ADMIN, OTHER_WORKER, WORKER, LiveHub, live_config, publish_initial_policy
from rich.console import Console

from rl.cli.contributions import fetch
from rl.cli.status_view import render
from rl.hub.contribution_db import report
from rl.hub.contributions import ContributionLedger
from rl.trainer.receipts import step_entries
from rl.wire.identity import challenge_message, public_id, sign, write_key
from rl.wire.protocol import HubError, HubStatus
from rl.wire.receipts import ReceiptEntry, StepReceipt, sign_step, token_digest, verify_contributions
from rl.wire.tokens import token_id


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    with LiveHub(live_config(tmp_path_factory.mktemp("contrib"), tiny_model_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {name: d / f"{name}.pem" for name in ("alice", "bob", "run")} | {
        f"{name}_key": write_key(d / f"{name}.pem") for name in ("alice", "bob", "run")
    }


def client(hub, token=WORKER, **headers) -> httpx.Client:
    return httpx.Client(base_url=hub.url, headers={"Authorization": f"Bearer {token}", **headers}, timeout=30.0)


def challenge(hub, token=WORKER) -> str:
    with client(hub, token) as c:
        return c.post("/v1/challenges").json()["challenge"]


def register(hub, key=None, token=WORKER, purpose="register", **proof) -> httpx.Response:
    body = {"name": "c", "engine": "hf"}
    if key is not None:
        ch = challenge(hub, token)
        body["identity"] = {"public_key": public_id(key), "challenge": ch,
                            "signature": sign(key, challenge_message(ch, purpose))} | proof  # fmt: skip
    with client(hub, token) as c:
        return c.post("/v1/workers", json=body)


def test_identity_token_and_registration_are_distinct_in_status(hub, keys):
    alice = public_id(keys["alice_key"])
    first, second = register(hub, keys["alice_key"]), register(hub, keys["alice_key"], token=OTHER_WORKER)
    anonymous = register(hub)
    assert first.status_code == second.status_code == anonymous.status_code == 200, first.text
    with client(hub, ADMIN) as c:
        status = c.get("/v1/status").json()
    rows = {w["worker_id"]: w for w in status["workers"]}
    assert rows[first.json()["worker_id"]]["contributor"] == alice == rows[second.json()["worker_id"]]["contributor"]
    assert rows[first.json()["worker_id"]]["operator"] == token_id(WORKER)
    assert rows[second.json()["worker_id"]]["operator"] == token_id(OTHER_WORKER)  # one identity, two tokens
    assert rows[anonymous.json()["worker_id"]]["contributor"] == f"token:{token_id(WORKER)}"
    live = {c["contributor"]: c["workers"] for c in status["contributors"]}
    assert live[alice] >= 2 and live[f"token:{token_id(WORKER)}"] >= 1
    with client(hub, OTHER_WORKER) as c:  # a worker token sees its own contributors only
        seen = {row["contributor"] for row in c.get("/v1/status").json()["contributors"]}
    assert alice in seen and f"token:{token_id(WORKER)}" not in seen
    console = Console(width=240, record=True)
    console.print(render(HubStatus.model_validate(status)))  # `rl status`: a contributors table and column
    text = console.export_text()
    assert "contributors (" in text and alice[:24] in text and "share" in text


def test_a_wrong_signature_or_a_used_challenge_is_refused(hub, keys):
    r = register(hub, keys["alice_key"], purpose="contributions x")  # signed for another purpose
    assert r.status_code == 403 and r.json()["reason"] == "bad_identity"
    r = register(hub, keys["alice_key"], public_key=public_id(keys["bob_key"]))  # alice's signature, bob's key
    assert r.status_code == 403 and r.json()["reason"] == "bad_identity"
    ch = challenge(hub)
    proof = {"public_key": public_id(keys["bob_key"]), "challenge": ch,
             "signature": sign(keys["bob_key"], challenge_message(ch, "register"))}  # fmt: skip
    with client(hub) as c:
        assert c.post("/v1/workers", json={"name": "c", "identity": proof}).status_code == 200
        again = c.post("/v1/workers", json={"name": "c", "identity": proof})  # replayed
        assert again.status_code == 409 and again.json()["reason"] == "unknown_challenge"
        bad = c.post("/v1/workers", json={"name": "c", "identity": {**proof, "public_key": "ed25519:xyz"}})
        assert bad.status_code == 422


def entry(contributor: str, task_id: int) -> ReceiptEntry:
    ids = [[task_id, 1, 2]]
    return ReceiptEntry(contributor=contributor, task_id=task_id, policy_version=0, samples=1, tokens=3,
                        digest=token_digest(ids))  # fmt: skip


def step_report(keys, step: int, entries: list[ReceiptEntry], key=None) -> StepReceipt:
    key = key or keys["run_key"]
    return StepReceipt(receipt=sign_step(key, public_id(key), step, entries), entries=entries)


def test_receipts_go_to_their_contributor_only(hub, keys):
    alice, bob, anon = public_id(keys["alice_key"]), public_id(keys["bob_key"]), f"token:{token_id(WORKER)}"
    run_key = public_id(keys["run_key"])
    with client(hub, ADMIN) as c:
        for step in (1, 2):
            entries = [entry(alice, 10 * step), entry(bob, 10 * step + 1), entry(anon, 10 * step + 2)]
            r = c.post("/v1/receipts", content=step_report(keys, step, entries).model_dump_json(),
                       headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200, r.text
        forged = step_report(keys, 3, [entry(alice, 99)], key=keys["alice_key"])  # not the run's key
        r = c.post("/v1/receipts", content=forged.model_dump_json(), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["reason"] == "bad_receipt"
        padded = step_report(keys, 3, [entry(alice, 99)])
        padded.entries.append(entry(alice, 100))  # an entry the root does not cover
        r = c.post("/v1/receipts", content=padded.model_dump_json(), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["reason"] == "bad_receipt"
    mine = fetch(hub.url, WORKER, keys["alice"], None)
    assert verify_contributions(mine, run_key) == [] and mine.contributor == alice
    assert [p.entry.task_id for r in mine.receipts for p in r.proofs] == [10, 20]
    newer = fetch(hub.url, WORKER, keys["alice"], None, from_step=2)  # only what is new since step 2
    assert [p.entry.task_id for r in newer.receipts for p in r.proofs] == [20]
    token_doc = fetch(hub.url, WORKER, None, None)  # no identity: the token's own work
    assert [p.entry.task_id for r in token_doc.receipts for p in r.proofs] == [12, 22]
    assert verify_contributions(token_doc, run_key) == []
    for token, key, whose in ((WORKER, keys["alice"], bob), (OTHER_WORKER, None, anon), (WORKER, None, bob)):
        with pytest.raises(HubError) as info:  # alice's key for bob's receipts; another token's; no proof
            fetch(hub.url, token, key, whose)
        assert info.value.status == 403 and info.value.reason == "not_your_contributions"
    assert [p.entry.task_id for r in fetch(hub.url, ADMIN, None, bob).receipts for p in r.proofs] == [11, 21]
    with client(hub, ADMIN) as c:  # not a contributor's name: a 4xx, never a 500
        r = c.get("/v1/contributions/nobody")
        assert r.status_code == 422 and r.json()["reason"] == "bad_contributor"


def test_masked_sequences_get_no_entry_and_are_counted_by_reason():
    groups = [scored_group(1, "w-a", "token:a"), scored_group(2, "w-b", "token:b"), scored_group(3, "w-c", "")]
    trained = [True, False, False, False, True, True]
    codes = [0, 1, 2, 2, 0, 0]  # 1: logprob_mismatch, 2: special_token (provenance.REASONS)
    entries, masked = step_entries(groups, trained, codes)
    assert [(e.contributor, e.task_id, e.samples, e.tokens) for e in entries] == [
        ("token:a", 1, 1, 2),
        ("worker:w-c", 3, 2, 4),  # a group the hub did not label: credited to its registration
    ]
    assert entries[0].digest == token_digest([[1, 1]])
    assert [(m.contributor, m.task_id, m.reasons) for m in masked] == [
        ("token:a", 1, {"logprob_mismatch": 1}),
        ("token:b", 2, {"special_token": 2}),  # wholly masked: no entry, so no receipt
    ]
    assert [m.tokens for m in masked] == [{"logprob_mismatch": 2}, {"special_token": 4}]


def test_the_ledger_survives_a_reopen_and_a_step_reported_twice_counts_once(tmp_path, keys):
    db = tmp_path / "hub.sqlite"
    alice = public_id(keys["alice_key"])
    ledger = ContributionLedger(db)
    ledger.bind("w-1", alice, "tok", "a")
    ledger.count("w-1", "submitted", 0, 0, 2, 4, 40, seconds=1.5)
    ledger.count("w-1", "rejected", 0, 0, 1, reason="bad_length")
    ledger.flush()
    for step in (1, 2, 2):  # step 2's answer was lost: the trainer sent it again
        report_ = step_report(keys, step, [entry(alice, step), entry("token:t", 100 + step)])
        ledger.db.record_step(report_, 0.0)
    ledger.close()
    reopened = ContributionLedger(db)
    assert reopened.db.trained_totals() == {alice: (2, 6, 0), "token:t": (2, 6, 0)}
    reopened.db.record_step(step_report(keys, 2, [entry(alice, 7)]), 0.0)  # resumed at step 1: step 2 again
    assert reopened.db.trained_totals() == {alice: (2, 6, 0), "token:t": (1, 3, 0)}
    reopened.close()
    rows = {r["contributor"]: r for r in report(db)}
    assert rows[alice]["trained_samples"] == 2 and rows[alice]["submitted_groups"] == 2
    assert rows[alice]["submitted_tokens"] == 40 and rows[alice]["generation_s"] == 1.5
    assert rows[alice]["rejected"] == {"bad_length": 1} and rows[alice]["rejected_rate"] == pytest.approx(1 / 3)
    assert rows[alice]["share"] == pytest.approx(2 / 3)
    assert rows[alice]["tokens"] == ["tok"] and rows[alice]["registrations"] == 1


def test_quarantined_time_is_counted_once_per_contributor_and_outlives_a_restart(tmp_path, keys):
    db = tmp_path / "hub.sqlite"
    alice = public_id(keys["alice_key"])
    ledger = ContributionLedger(db)
    ledger.bind("w-1", alice, "tok-a", "a")
    ledger.bind("w-2", alice, "tok-b", "a")  # one identity under two tokens, both quarantined
    ledger.bind("w-3", "token:tok-c", "tok-c", "c")
    ledger.tick({}, 0, 0, now=100.0)  # the first tick only starts the clock
    ledger.tick({"tok-a": "x", "tok-b": "y"}, 1, 0, now=102.5)
    ledger.flush()
    ledger.close()
    reopened = ContributionLedger(db)  # a restarted hub knows alice's tokens from the database
    assert reopened.tokens_of[alice] == {"tok-a", "tok-b"}
    reopened.tick({}, 1, 0, now=200.0)
    reopened.tick({"tok-b": "y"}, 2, 1, now=201.0)
    reopened.flush()
    reopened.close()
    rows = {r["contributor"]: r for r in report(db)}
    assert rows[alice]["quarantined_s"] == pytest.approx(3.5) and rows["token:tok-c"]["quarantined_s"] == 0
    assert rows[alice]["registrations"] == 2


def test_an_environment_runs_groups_are_credited_and_observed_like_single_turn_groups(tmp_path, tiny_model_dir):
    """Both kinds of task end on one path: a group of graded episodes is labelled with its contributor,
    counted as scored work and counted as evidence for its operator's trust."""
    from rl.wire.protocol import Completion, RegisterRequest, SubmitRequest, TaskResult
    from rollout_workers.client import HubClient

    game = {"source": {"type": "env", "name": "guess_number", "size": 8, "params": {"low": 1, "high": 2,
            "max_turns": 1}}, "eval_size": 0, "max_prompt_tokens": 128}  # fmt: skip
    cfg = live_config(tmp_path, tiny_model_dir, data=game, sampling={"n": 2, "max_tokens": 8})
    publish_initial_policy(tmp_path, tiny_model_dir)
    with LiveHub(cfg) as live:
        live.publish(0)
        tok = live.hub.tokenizer
        worker = HubClient(live.url, WORKER, max_retry_s=10.0)
        worker.register(RegisterRequest(name="w"))
        lease = worker.lease(policy_version=0, max_tasks=1)
        (task,) = lease.tasks
        ids = tok("1", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        turn = Completion(token_ids=ids, logprobs=[-0.5] * len(ids))
        worker.submit(SubmitRequest(worker_id=worker.worker_id, lease_id=lease.lease_id, policy_version=0,
                                    results=[TaskResult(task_id=task.task_id, completions=[turn, turn])]))  # fmt: skip
        live.wait_for(lambda: task.task_id in live.state.buffer, what="the graded group")  # one turn: done
        group = live.state.buffer[task.task_id]
        assert group.contributor == f"token:{token_id(WORKER)}"
        assert live.hub.trust.workers[worker.worker_id].groups == 1
        totals = live.hub.contributions.totals[group.contributor]  # [groups, samples, tokens, seconds] by event
        assert totals["scored"][:2] == [1, 2] and totals["submitted"][:2] == [1, 2]
        worker.close()
