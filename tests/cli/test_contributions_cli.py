"""`rl identity new` and `rl contributions` as a user runs them: keys, the report, offline verification, and a
clear message with exit 2 for every bad input (the end-to-end run is tests/e2e/test_contributions.py)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from rl.hub.contribution_db import ContributionDB
from rl.wire.identity import load_key, public_id, write_key
from rl.wire.receipts import Contributions, ReceiptEntry, StepReceipt, proofs_for, sign_step, token_digest

ROOT = Path(__file__).resolve().parents[2]


def rl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_identity_new_writes_a_key_pair_and_never_overwrites(tmp_path):
    key = tmp_path / "me.pem"
    made = rl("identity", "new", str(key))
    assert made.returncode == 0, made.stderr
    public = (tmp_path / "me.pem.pub").read_text().strip()
    assert public == public_id(load_key(key)) and public in made.stdout
    again = rl("identity", "new", str(key))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert (tmp_path / "me.pem.pub").read_text().strip() == public


def test_report_and_verify_from_a_run_directory(tmp_path):
    run_key = write_key(tmp_path / "run_key.pem")
    me = public_id(write_key(tmp_path / "me.pem"))
    db = ContributionDB(tmp_path / "hub.sqlite")
    db.register("w-1", me, "tok1", "mine", 1_700_000_000.0)
    db.register("w-2", "token:tok2", "tok2", "anon", 1_700_000_000.0)
    steps = []
    for step in (1, 2):
        entries = [
            ReceiptEntry(contributor=c, task_id=10 * step + i, policy_version=step - 1, samples=2, tokens=t,
                         digest=token_digest([[1] * t]))
            for i, (c, t) in enumerate(((me, 6), ("token:tok2", 2)))
        ]  # fmt: skip
        receipt = sign_step(run_key, public_id(run_key), step, entries)
        db.record_step(StepReceipt(receipt=receipt, entries=entries), 1_700_000_100.0)
        steps.append((receipt, entries))
    db.close()
    report = rl("contributions", str(tmp_path), "--json")
    assert report.returncode == 0, report.stderr
    rows = {r["contributor"]: r for r in json.loads(report.stdout)}
    assert rows[me]["trained_tokens"] == 12 and rows[me]["share"] == 0.75 and rows[me]["versions"] == [0, 1]
    assert rows["token:tok2"]["trained_samples"] == 4 and rows["token:tok2"]["kind"] == "token"
    table = rl("contributions", "report", str(tmp_path))
    assert table.returncode == 0 and "75.0%" in table.stdout
    as_csv = rl("contributions", str(tmp_path), "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    csv_rows = {r["contributor"]: r for r in csv.DictReader(io.StringIO(as_csv.stdout))}
    assert csv_rows[me]["trained_tokens"] == "12" and csv_rows[me]["versions"] == "0-1"
    assert csv_rows[me]["first_seen"] == "2023-11-14 22:13:20"
    by_step = rl("contributions", str(tmp_path), "--steps", "--json")
    assert by_step.returncode == 0, by_step.stderr
    assert [(r["step"], r["contributor"], r["trained_tokens"], r["share"]) for r in json.loads(by_step.stdout)] == [
        (1, me, 6, 0.75), (1, "token:tok2", 2, 0.25), (2, me, 6, 0.75), (2, "token:tok2", 2, 0.25)]  # fmt: skip
    step_csv = rl("contributions", str(tmp_path), "--steps", "--csv")
    assert step_csv.returncode == 0 and step_csv.stdout.startswith("step,contributor,kind,trained_samples")
    step_table = rl("contributions", str(tmp_path), "--steps")
    assert step_table.returncode == 0 and "per step" in step_table.stdout
    doc = Contributions(contributor=me, run_key=public_id(run_key),
                        receipts=[proofs_for(r, entries, me) for r, entries in steps])  # fmt: skip
    (tmp_path / "mine.json").write_text(doc.model_dump_json())
    ok = rl("contributions", "verify", str(tmp_path / "mine.json"), "--run-key", str(tmp_path / "run_key.pem.pub"))
    assert ok.returncode == 0 and "2 steps, 2 groups, 4 samples, 12 tokens" in ok.stdout, ok.stderr


def test_bad_inputs_are_clear_errors(tmp_path):
    write_key(tmp_path / "run.pem")
    (tmp_path / "junk.json").write_text("{}")
    cases = [
        (("contributions", str(tmp_path / "nowhere")), "no hub database"),
        (("contributions", str(tmp_path), "--json", "--csv"), "not both"),
        (("contributions", "verify", str(tmp_path / "junk.json"), "--run-key", str(tmp_path / "run.pem.pub")),
         "is not a receipts file"),
        (("contributions", "verify", str(tmp_path / "none.json"), "--run-key", "x"), "cannot read"),
        (("rollout", "--hub", "http://127.0.0.1:9", "--token", "t", "--identity", str(tmp_path / "junk.json")),
         "--identity"),
    ]  # fmt: skip
    doc = Contributions(contributor="token:abc", run_key=public_id(load_key(tmp_path / "run.pem")))
    (tmp_path / "empty.json").write_text(doc.model_dump_json())
    cases.append((("contributions", "verify", str(tmp_path / "empty.json"), "--run-key", "ed25519:12"), "--run-key"))
    for args, message in cases:
        res = rl(*args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
