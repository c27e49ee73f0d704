"""False positives of the trust checks in a real run: `rl train` with only external honest workers.

Starts `rl train CONFIG` with no local workers (`rollout.local_workers=0`) and N honest `rl rollout`
processes joining over HTTP with one worker token (one operator, like a volunteer with N machines),
trains `--steps` steps with every trust check on (provenance, seeded draws, quarantine), polls the
hub's status, and prints what the checks did to honest work: sequences masked by reason, per worker,
and any quarantined worker or operator. docs/security.md has the numbers.

    python scripts/measure_operator_fp.py quickstart --workers 4 --steps 30 --out runs/fp-operators
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config file or a shipped config's name")
    parser.add_argument("--workers", type=int, default=4, help="external honest workers")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/fp-operators"), help="the run directory")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    args = parser.parse_args()

    from rl.wire.admin import HubAdmin

    run_dir = args.out.resolve()
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: pick another --out (a fresh run is measured)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin_token, worker_token = f"adm-{secrets.token_urlsafe(16)}", f"wrk-{secrets.token_urlsafe(16)}"
    url = f"http://127.0.0.1:{port}"
    overrides = [f"run_dir={run_dir}", "rollout.local_workers=0", f"trainer.max_steps={args.steps}",
                 f"hub.port={port}", f"hub.admin_token={admin_token}", f"hub.worker_tokens=[{worker_token}]",
                 "eval.every=0", "eval.num_prompts=16", "eval.samples=0", "trust.enabled=true"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline")
    logs = run_dir.parent / f"{run_dir.name}-logs"
    logs.mkdir(exist_ok=True)
    start = time.monotonic()
    train_log = (logs / "train.log").open("w")
    train = subprocess.Popen([sys.executable, "-m", "rl.cli", "train", args.config, *overrides], env=env,
                             stdout=train_log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    workers: list[subprocess.Popen] = []
    last_status = None
    admin = HubAdmin(url, admin_token, patience_s=5.0)
    try:
        while not admin.healthy():
            if train.poll() is not None:
                sys.exit(f"rl train exited ({train.returncode}) before its hub answered; see {logs / 'train.log'}")
            time.sleep(2.0)
        for i in range(args.workers):
            wenv = dict(env, OMP_NUM_THREADS="1", RL_HUB_TOKEN=worker_token)
            cmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", url, "--name", f"honest-{i}", "--seed", str(i),
                   "--prompts-per-lease", "2", "--kv-cache-gib", str(args.kv_cache_gib),
                   "--cache-dir", str(logs / f"cache-{i}")]  # fmt: skip
            out = (logs / f"worker-{i}.log").open("w")
            worker = subprocess.Popen(cmd, env=wenv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            workers.append(worker)
        while train.poll() is None and time.monotonic() - start < args.timeout_s:
            try:
                last_status = admin.status(limit=1000)
            except Exception as e:  # noqa: BLE001 - the hub goes away at the end of the run
                print(f"status unavailable: {e}", flush=True)
            steps = len(read_jsonl(run_dir / "metrics.jsonl"))
            print(f"{time.monotonic() - start:6.0f} s: step {steps}/{args.steps}", flush=True)
            time.sleep(30.0)
    finally:
        for p in [*workers, train]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in [*workers, train]:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        admin.close()

    from rl.config import load_config

    n = load_config(args.config).sampling.n
    metrics, batches = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "batches.jsonl")
    metrics = [m for m in metrics if "trust/masked_sequences" in m]  # trained steps (not step 0's evaluation)
    distances = sorted(m.get("trust/draw_distance_max", 0.0) for m in metrics)
    sequences, masked, reasons = Counter(), Counter(), Counter()
    for record in batches:
        for name in record["workers"]:
            sequences[name] += n
    for m in metrics:
        for key, value in m.items():
            if key.startswith("trust/worker/") and key.endswith("/masked"):
                masked[key.removeprefix("trust/worker/").rsplit("-w-", 1)[0]] += int(value)
            if key.startswith("trust/rejected/") and value:
                reasons[key.removeprefix("trust/rejected/")] += int(value)
    total, total_masked = sum(sequences.values()), sum(masked.values())
    quarantined = []
    if last_status is not None:
        quarantined = [(w.name, w.quarantined) for w in last_status.workers if w.quarantined]
        quarantined += [(o.operator, o.quarantined) for o in last_status.operators if o.quarantined]
    summary = {
        "config": args.config,
        "workers": args.workers,
        "steps_trained": len(metrics),
        "train_exit": train.returncode,
        "wall_s": round(time.monotonic() - start),
        "sequences_checked": total,
        "sequences_by_worker": dict(sequences),
        "sequences_masked": total_masked,
        "masked_by_reason": dict(reasons),
        "masked_by_worker": dict(masked),
        "masked_fraction": total_masked / max(total, 1),
        "draws_checked_fraction_mean": sum(m.get("trust/draws_checked_fraction", 0.0) for m in metrics)
        / max(len(metrics), 1),
        "draw_distance_max_per_step": {
            "median": distances[len(distances) // 2] if distances else None,
            "max": distances[-1] if distances else None,
        },
        "quarantined": quarantined,
    }
    (run_dir / "fp_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
