"""Attacking operators beside real `rl train` runs: tiny model, its vLLM-CPU worker, DeepSpeed, the hub's HTTP.

An operator is one worker token with as many registrations as it likes (tests/helpers/attackers.py):
- a hoarder leases all it can with 4 registrations and never submits, heartbeating so the hub keeps it;
  leases live 300 s, so only fair shares and backup leases (rl/hub/fair.py) can keep the run going. It
  arrives before the run's own worker, or after step 2; steps per second are compared with an unattacked run;
- a picker samples 6 candidates per completion under seeds of its own choosing, submits the shortest (what
  the length reward favours) with their true logprobs, and registers afresh every 2 tasks. It samples with
  the newest version it can fetch, or with (and claiming) the one before, which the staleness window allows.
  Its share of the sequences the trainer kept must stay under 5%, and its quarantine must outlive it.

Shares are computed from what the trainer saw: `batches.jsonl` (whose groups each step trained) and the
per-worker masked counts in `metrics.jsonl`. Every run sets `trust.mask_special_tokens: false`: the tiny
random model samples special tokens like any other token, which masks a few honest sequences and is not
what these attacks are about; the honest worker's masked fraction must then be 0.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import helpers.train as h
import pytest
from helpers.attackers import Hoarder, Picker, known_hub
from helpers.hub import ADMIN, OPERATORS

from rl.wire.admin import HubAdmin
from rl.wire.protocol import HubError, RegisterRequest
from rl.wire.tokens import token_id
from rollout_workers.client import HubClient

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

N = 2  # sampling.n of train_config
STEPS = 10
TRUST = {"mask_special_tokens": False}
HOARD = {"lease_ttl_s": 300.0, "backup_min_s": 1.0}  # expiry never frees a hoarded task; tiny tasks: fast backups


def steps_per_s(run_dir, after: int) -> float:
    """Steps after step `after` per second of the trainer's loop (their `perf/step_s`: waiting included)."""
    metrics = h.by_step(h.read_jsonl(run_dir / "metrics.jsonl"))
    later = [metrics[s]["perf/step_s"] for s in sorted(metrics) if s > after]
    return len(later) / sum(later)


def trained_by_worker(run_dir) -> tuple[Counter, Counter]:
    """(sequences handed to the trainer, sequences it masked) per worker name, over the whole run."""
    seen, masked = Counter(), Counter()
    for record in h.read_jsonl(run_dir / "batches.jsonl"):
        for name in record["workers"]:
            seen[name] += N
    for record in h.read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key.startswith("trust/worker/") and key.endswith("/masked"):
                masked[key.removeprefix("trust/worker/").rsplit("-w-", 1)[0]] += int(value)
    return seen, masked


# --------------------------------------------------------------------------- hoarding


def hoarding_run(run_dir, model_dir, hoarder_from: int | None, deadline_s: float) -> dict:
    """A 10-step run; a hoarder joins once step `hoarder_from` is logged (0: before the run's own worker,
    None: never). Past `deadline_s` the run is interrupted (Ctrl-C)."""
    hub, url = known_hub()
    config = h.train_config(run_dir, model_dir, trainer={"max_steps": STEPS}, hub=HOARD | hub, trust=TRUST)
    log = run_dir.parent / "train.log"
    hoarder = Hoarder(url, OPERATORS[0], registrations=4)
    start = time.monotonic()
    if hoarder_from == 0:
        hoarder.start()  # it registers as soon as the hub answers, before the local worker has its engine
    proc = h.start_train(config, log)
    try:
        if hoarder_from:
            done = lambda: any(r["step"] >= hoarder_from for r in h.read_jsonl_live(run_dir / "metrics.jsonl"))
            h.wait_for(done, f"step {hoarder_from}", proc, log, timeout=deadline_s)
            hoarder.start()
        code, end = h.finish_by(proc, log, start + deadline_s)
    finally:
        if hoarder.is_alive():
            hoarder.stop()
    steps = len(h.read_jsonl(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").is_file() else 0
    return {"code": code, "wall_s": end - start, "steps": steps, "run_dir": run_dir, "log": log,
            "hoarded": hoarder.leased_tasks, "errors": hoarder.errors}  # fmt: skip


@pytest.fixture(scope="module")
def unattacked(tiny_model_dir, tmp_path_factory) -> dict:
    run = hoarding_run(tmp_path_factory.mktemp("unattacked") / "run", tiny_model_dir, None, deadline_s=240)
    assert run["code"] == 0, h.tail(run["log"])
    return run


def test_hoarder_arriving_first_does_not_stall_the_run(unattacked, tiny_model_dir, tmp_path):
    """A hoarder that registers before the run's own worker: the run's steps per second (whole run, start-up
    included in both) are at least half the unattacked run's. It is stopped at twice the unattacked wall time."""
    run = hoarding_run(tmp_path / "run", tiny_model_dir, 0, deadline_s=2 * unattacked["wall_s"])
    plain = STEPS / unattacked["wall_s"]
    rate = run["steps"] / run["wall_s"]
    detail = (f"hoarded: {run['steps']} steps in {run['wall_s']:.0f} s ({rate:.3f} steps/s, exit {run['code']}), "
              f"unattacked: {STEPS} in {unattacked['wall_s']:.0f} s ({plain:.3f}/s), x{rate / plain:.2f}; "
              f"{run['hoarded']} tasks granted to the hoarder; its errors {Counter(run['errors'])}")  # fmt: skip
    print(detail)
    assert run["hoarded"] > 0, detail
    assert rate >= 0.5 * plain, detail
    assert run["code"] == 0, detail + "\n" + h.tail(run["log"])


@pytest.mark.xfail(
    strict=False,
    reason="two operators halve the window by design: measured x0.47-0.72 in tiny runs before backup leases, x0.56 "
    "with them (threshold x0.5)",
)
def test_hoarder_arriving_mid_run_does_not_stall_the_run(unattacked, tiny_model_dir, tmp_path):
    """A hoarder that joins after step 2: steps 3 to 10 per second are at least half the unattacked run's."""
    run = hoarding_run(tmp_path / "run", tiny_model_dir, 2, deadline_s=2 * unattacked["wall_s"] + 60)
    detail = f"hoarded: {run['steps']} steps, exit {run['code']}, {run['hoarded']} tasks granted to the hoarder"
    assert run["code"] == 0, detail + "\n" + h.tail(run["log"])
    plain, rate = steps_per_s(unattacked["run_dir"], after=2), steps_per_s(run["run_dir"], after=2)
    detail += f"; steps 3-{STEPS}: {rate:.2f} steps/s vs {plain:.2f} unattacked (x{rate / plain:.2f})"
    print(detail)
    assert run["hoarded"] > 0, detail
    assert rate >= 0.5 * plain, detail


# --------------------------------------------------------------------------- cherry-picking


def picking_run(run_dir, model_dir, behind: int) -> dict:
    """A run with a picker (`behind`: Picker's) beside the local worker, until 8 steps after the picker's operator
    was quarantined (or 24 steps without); then a fresh registration with its token, the hub's status, and a
    terminal-style Ctrl-C.

    `trust.quarantine_min_sequences` 8 (default 32): the picker's 4th checked group can quarantine it.
    `async.max_staleness` 4: the picker loads every new version into transformers, slower than the vLLM worker
    on 2 CPUs; with 1 most of its groups would be refused as stale, and the checks would judge little."""
    hub, url = known_hub()
    trust = TRUST | {"quarantine_min_sequences": 8, "kept_versions": 4}  # every version the window admits
    config = h.train_config(run_dir, model_dir, trainer={"max_steps": 200}, hub=hub, trust=trust,
                            **{"async": {"max_staleness": 4}})  # fmt: skip
    picker = Picker(url, OPERATORS[1], run_dir / "policy", run_dir.parent / "picker-cache", behind=behind)
    log, batches = run_dir.parent / "train.log", run_dir / "batches.jsonl"
    out = {"run_dir": run_dir, "picker": picker, "log": log, "quarantine_step": None}
    start = time.monotonic()

    def settled() -> bool:
        steps = len(h.read_jsonl_live(batches))
        if out["quarantine_step"] is None and "quarantined" in picker.errors + picker.refused:  # a lease or a
            out["quarantine_step"], out["quarantine_s"] = steps, time.monotonic() - start  # registration refused
        return steps >= (24 if out["quarantine_step"] is None else out["quarantine_step"] + 8)

    picker.start()
    proc = h.start_train(config, log)
    admin = HubAdmin(url, ADMIN, patience_s=10.0)
    try:
        h.wait_for(settled, "8 steps after the picker's quarantine, or 24", proc, log, timeout=180)
        with HubClient(url, OPERATORS[1], max_retry_s=5.0) as fresh:
            try:
                fresh.register(RegisterRequest(name="picker-fresh", engine="hf"))
                out["fresh"] = "registered"
            except HubError as e:
                out["fresh"] = (e.status, e.reason)
        out["status"] = admin.status()
    finally:
        picker.stop()
        admin.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        out["code"] = h.finish(proc, log, timeout=120)
    op = token_id(OPERATORS[1])
    lines = (run_dir / "logs" / "hub.log").read_text(errors="replace").splitlines()
    out["hub_reason"] = [ln.split("re-queued): ", 1)[1].strip() for ln in lines if f"operator {op} quarantined" in ln]
    return out


@pytest.fixture(scope="module")
def picked_run(tiny_model_dir, tmp_path_factory) -> dict:
    return picking_run(tmp_path_factory.mktemp("picked") / "run", tiny_model_dir, behind=0)


def check_picking(run: dict) -> None:
    """The picker's share of the sequences the trainer kept is under 5%; no honest worker masked or quarantined."""
    run_dir, picker, status = run["run_dir"], run["picker"], run["status"]
    assert run["code"] == 130, h.tail(run["log"])
    seen, masked = trained_by_worker(run_dir)
    kept = {name: seen[name] - masked[name] for name in seen}
    picks = [name for name in seen if name.startswith("picker-")]
    honest = [name for name in seen if name.startswith("local-")]
    picked_kept, total_kept = sum(kept[n] for n in picks), sum(kept.values())
    share, picked_seen = picked_kept / total_kept, sum(seen[n] for n in picks)
    honest_seen = sum(seen[n] for n in honest)
    honest_masked = sum(masked[n] for n in honest) / max(honest_seen, 1)
    reasons, checked = Counter(), []
    for record in h.read_jsonl(run_dir / "metrics.jsonl"):
        reasons.update({k.removeprefix("trust/rejected/"): int(v) for k, v in record.items()
                        if k.startswith("trust/rejected/") and v})  # fmt: skip
        checked.append(record.get("trust/draws_checked_fraction"))
    honest_workers = [w for w in status.workers if w.name.startswith("local-")]
    honest_trust = [(w.trust.sequences_checked, w.trust.rejected) for w in honest_workers if w.trust]
    quarantine = (f"quarantined after {run['quarantine_s']:.0f} s (step {run['quarantine_step']}): {run['hub_reason']}"
                  if run["quarantine_step"] is not None else "never quarantined")  # fmt: skip
    summary = (f"picker (behind {picker.behind}): {picker.submitted} tasks accepted from {len(picker.names)} "
               f"registrations; {picked_seen} of {sum(seen.values())} sequences handed to the trainer were its, "
               f"{picked_kept} kept ({share:.1%} of {total_kept} kept); masked by reason {dict(reasons)}; "
               f"draw-checked fraction per step {checked}; honest masked {honest_masked:.1%} of {honest_seen} "
               f"(hub's record: checked, rejected {honest_trust}); {quarantine}")  # fmt: skip
    print(summary)
    assert picked_seen >= 8, f"the picker's work barely reached the trainer: {summary}"
    assert honest_seen and honest_masked == 0, summary
    assert honest_workers and all(w.quarantined == "" for w in honest_workers), (summary, honest_workers)
    picker_op = token_id(OPERATORS[1])
    assert all(o.quarantined == "" for o in status.operators if o.operator != picker_op), (summary, status.operators)
    assert share < 0.05, summary


def test_cherry_picking_operator_trains_nothing(picked_run):
    """A picker sampling with the newest version it can fetch (its groups are stale when it lags)."""
    check_picking(picked_run)


def test_cherry_picking_with_a_stale_claim_trains_nothing(tiny_model_dir, tmp_path):
    """A picker that samples with, and claims, the version before the newest (inside the staleness window)."""
    check_picking(picking_run(tmp_path / "run", tiny_model_dir, behind=1))


def test_quarantine_outlives_registrations(picked_run):
    """Once quarantined, the picker's operator cannot come back under a new registration."""
    picker = picked_run["picker"]
    assert picked_run["hub_reason"], "the hub's log has no quarantine of the picker's operator"
    assert picked_run["fresh"] == (403, "quarantined"), picked_run["fresh"]
    assert picker.refused and set(picker.refused) == {"quarantined"}, picker.refused
    print(f"fresh registration: {picked_run['fresh']}; the picker's own {len(picker.refused)} attempts refused")
