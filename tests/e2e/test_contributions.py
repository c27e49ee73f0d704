"""Contributions end to end: a real `rl train` powered by three external workers, its hub killed mid-run.

Workers (HF engine, each its own `rl rollout` process and token): alice's and bob's under their identities
(`rl identity new`, `--identity`), and one anonymous. After step 3 the hub is SIGKILLed; `rl train` restarts
it from its database and the workers register again (signing fresh challenges). After the run, a hub is
started again on the run directory, and each contributor fetches its receipts. Checked:
- the report's trained samples per contributor equal batches.jsonl minus the trainer's masks (metrics.jsonl),
  and its tokens what the receipts signed; every step has one receipt (none lost or doubled by the restart);
  registrations before and after the restart count as one contributor each;
- every contributor's receipts verify offline with the run's public key (`rl contributions verify`);
- a tampered receipt file, or one with another contributor's proof added, fails; alice cannot fetch bob's.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import helpers.train as h
import pytest
from helpers.attackers import known_hub
from helpers.contributions import expected_trained, kill_hub, signed_totals
from helpers.hub import OPERATORS, start_hub, start_worker, stop_process

from rl.cli.contributions import fetch
from rl.wire.identity import public_id, write_key
from rl.wire.protocol import HubError
from rl.wire.receipts import Contributions, verify_contributions
from rl.wire.tokens import token_id

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

N = 2  # sampling.n of train_config
STEPS = 8
KILL_AFTER = 3


def rl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True, cwd=h.ROOT,
                          env=h.train_env(), timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("contrib")
    run_dir = base / "run"
    keys = {name: base / f"{name}.pem" for name in ("alice", "bob")}
    for path in keys.values():
        assert rl("identity", "new", str(path)).returncode == 0
    hub, url = known_hub()
    config = h.train_config(run_dir, tiny_model_dir, trainer={"max_steps": STEPS}, rollout={"local_workers": 0},
                            hub=hub | {"heartbeat_interval_s": 1.0})  # fmt: skip
    log = base / "train.log"
    proc = h.start_train(config, log)
    specs = {"alice-1": (OPERATORS[0], keys["alice"]), "bob-1": (OPERATORS[1], keys["bob"]),
             "anon-1": (OPERATORS[2], None)}  # fmt: skip
    workers = [
        start_worker(url, base / f"{name}.log", base / f"cache-{name}", name=name, engine="hf", token=token,
                     extra=["--prompts-per-lease", "1", *(["--identity", str(key)] if key else [])])
        for name, (token, key) in specs.items()
    ]  # fmt: skip
    try:
        steps = lambda: len(h.read_jsonl_live(run_dir / "metrics.jsonl"))  # noqa: E731
        h.wait_for(lambda: steps() >= KILL_AFTER, f"{KILL_AFTER} steps", proc, log, timeout=400)
        kill_hub(proc.pid)
        code = h.finish(proc, log, timeout=600)
        died = [name for name, w in zip(specs, workers, strict=True) if w.poll() is not None]
    finally:
        for w in workers:
            stop_process(w)
    assert code == 0, h.tail(log)
    assert not died, "\n".join(f"--- {name}:\n{h.tail(base / f'{name}.log', 3000)}" for name in died)
    assert "restarting it from its ledger" in log.read_text(errors="replace"), h.tail(log)
    contributors = {
        "alice-1": public_id_of(keys["alice"]),
        "bob-1": public_id_of(keys["bob"]),
        "anon-1": f"token:{token_id(OPERATORS[2])}",
    }
    return {"run_dir": run_dir, "keys": keys, "contributors": contributors, "base": base, "url": url}


def public_id_of(path) -> str:
    from rl.wire.identity import load_key

    return public_id(load_key(path))


def test_the_report_counts_what_was_trained(run):
    run_dir, by_name = run["run_dir"], run["contributors"]
    result = rl("contributions", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["contributor"]: r for r in json.loads(result.stdout)}
    trained = expected_trained(run_dir, N, by_name)
    samples, tokens, signed_steps = signed_totals(run_dir)
    assert signed_steps == STEPS
    with sqlite3.connect(run_dir / "hub.sqlite") as db:  # one receipt per step, none lost or doubled
        stored = [s for (s,) in db.execute("SELECT step FROM contrib_receipts ORDER BY step")]
    assert stored == list(range(1, STEPS + 1))
    assert set(trained) <= set(by_name.values())
    for contributor in by_name.values():
        row = rows.get(contributor, {"trained_samples": 0, "trained_tokens": 0})
        assert row["trained_samples"] == trained[contributor] == samples[contributor], contributor
        assert row["trained_tokens"] == tokens[contributor], contributor
    assert sum(trained.values()) == sum(r["trained_samples"] for r in rows.values())
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert sum(1 for c in by_name.values() if rows.get(c, {}).get("trained_samples")) >= 2, rows
    # Registering again after the restart (each worker does on its next call, if the run is not over by then)
    # adds to the same contributor: no other contributor appears, and some have two registrations.
    assert set(rows) == set(by_name.values()), rows.keys()
    assert max(r["registrations"] for r in rows.values()) >= 2, rows
    # The hub's own counts (a hard kill may cost their last 0.5 s, so summed over contributors).
    assert sum(r["submitted_groups"] for r in rows.values()) >= sum(r["trained_groups"] for r in rows.values()) / 2
    assert all(sum(r[k] for r in rows.values()) > 0 for k in ("scored_groups", "generation_s")), rows
    print({c[:24]: (r["trained_samples"], r["trained_tokens"], f"{r['share']:.2f}") for c, r in rows.items()})
    steps = rl("contributions", str(run_dir), "--steps", "--json")  # per step, the same totals
    assert steps.returncode == 0, steps.stderr
    for contributor, row in rows.items():
        mine = [r for r in json.loads(steps.stdout) if r["contributor"] == contributor]
        assert sum(r["trained_samples"] for r in mine) == row["trained_samples"], contributor
        assert sum(r["masked_samples"] for r in mine) == row["masked_samples"], contributor
    csv = rl("contributions", str(run_dir), "--csv")
    assert csv.returncode == 0 and csv.stdout.splitlines()[0].startswith("contributor,kind,trained_samples")
    table = rl("contributions", str(run_dir))
    assert table.returncode == 0 and "share" in table.stdout


@pytest.fixture(scope="module")
def receipts(run) -> dict:
    """Each contributor's receipts, fetched from a hub started again on the finished run directory."""
    base, run_dir = run["base"], run["run_dir"]
    hub = start_hub(run_dir / "config.yaml", base / "hub-after.log")
    try:
        files = {}
        for name, token, key in (("alice", OPERATORS[0], run["keys"]["alice"]), ("bob", OPERATORS[1],
                                 run["keys"]["bob"]), ("anon", OPERATORS[2], None)):  # fmt: skip
            args = ["--identity", str(key)] if key else []
            out = base / f"{name}-receipts.json"
            got = rl("contributions", "fetch", "--hub", hub.url, "--token", token, *args, "-o", str(out))
            assert got.returncode == 0, got.stderr
            files[name] = out
        with pytest.raises(HubError) as info:  # alice's key does not open bob's receipts
            fetch(hub.url, OPERATORS[0], run["keys"]["alice"], run["contributors"]["bob-1"])
        assert info.value.reason == "not_your_contributions"
    finally:
        hub.stop()
    return files


def test_every_receipt_verifies_offline(run, receipts):
    run_key = run["run_dir"] / "run_key.pem.pub"
    for name, path in receipts.items():
        checked = rl("contributions", "verify", str(path), "--run-key", str(run_key))
        doc = Contributions.model_validate_json(path.read_text())
        assert checked.returncode == 0, (name, checked.stdout, checked.stderr)
        assert verify_contributions(doc, run_key.read_text().strip()) == []
        trained = sum(p.entry.samples for r in doc.receipts for p in r.proofs)
        assert f"{trained} samples" in checked.stdout, checked.stdout


def test_tampered_or_borrowed_receipts_fail(run, receipts):
    run_key = str(run["run_dir"] / "run_key.pem.pub")
    # Two contributors whose work was trained (the report test checks there are two; which two depends on
    # timing: a worker whose engine is still starting when the hub is killed may train nothing).
    docs = {name: json.loads(path.read_text()) for name, path in receipts.items()}
    trained = [name for name, doc in docs.items() if doc["receipts"]]
    assert len(trained) >= 2, {name: len(doc["receipts"]) for name, doc in docs.items()}
    owner, donor = docs[trained[0]], docs[trained[1]]
    tampered = json.loads(json.dumps(owner))
    tampered["receipts"][0]["proofs"][0]["entry"]["tokens"] += 1
    borrowed = json.loads(json.dumps(owner))
    borrowed["receipts"][0]["proofs"].append(donor["receipts"][0]["proofs"][0])
    for name, doc in (("tampered", tampered), ("borrowed", borrowed)):
        path = run["base"] / f"{name}.json"
        path.write_text(json.dumps(doc))
        checked = rl("contributions", "verify", str(path), "--run-key", run_key)
        assert checked.returncode == 1 and "FAIL" in checked.stderr, (name, checked.stdout, checked.stderr)
    other = run["base"] / "other.pem"
    write_key(other)
    wrong_key = rl("contributions", "verify", str(receipts[trained[0]]), "--run-key", f"{other}.pub")
    assert wrong_key.returncode == 1
