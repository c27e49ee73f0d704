"""The worker loop (`run_worker`, `rl rollout`) against a stub hub on loopback.

HF engine in-thread for the loop logic (fast); the CLI as a subprocess for
signals and exit codes; one slow run with the real vLLM engine through a
policy update. The real-hub integration tests live with the hub.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from test_worker_helpers import TOKEN, StubHub, hf_logprobs, make_policy_store, perturbed, serve  # noqa: E402

from rl.weights import write_version  # noqa: E402
from rollout_workers.worker import run_worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def prompts(count: int, start: int = 40) -> list[list[int]]:
    return [[1, start + i, start + i + 1, 7] for i in range(count)]


@pytest.fixture
def policy_dir(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "policy"
    make_policy_store(tiny_model_dir, out)
    return out


def start_worker(url: str, tmp_path: Path, **kw) -> tuple[threading.Thread, dict]:
    """run_worker (HF engine) in a thread; the exit code lands in result["rc"]."""
    result: dict = {}
    kw = {"engine": "hf", "cache_dir": tmp_path / "cache", "name": "t", **kw}

    def target() -> None:
        result["rc"] = run_worker(url, TOKEN, **kw)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def check_logprobs(model_dir: Path, state: dict | None, hub: StubHub, submissions) -> None:
    prompt_of = {t.task_id: t.prompt_token_ids for _, tasks in hub.leases.values() for t in tasks}
    for sub in submissions:
        result = sub.results[0]
        c = result.completions[0]
        ref = hf_logprobs(model_dir, state, prompt_of[result.task_id], c.token_ids)
        assert max(abs(a - b) for a, b in zip(ref, c.logprobs, strict=True)) < 1e-3


def test_worker_leases_generates_submits_and_leaves(policy_dir, tiny_model_dir, tmp_path):
    hub = StubHub(policy_dir, prompts(10))
    with serve(hub.app) as url:
        thread, result = start_worker(url, tmp_path, max_prompts=6, prompts_per_lease=4)
        thread.join(timeout=120)
    assert result["rc"] == 0
    assert [len(s.results) for s in hub.submissions] == [4, 2]
    for sub in hub.submissions:
        assert sub.policy_version == 0 and sub.worker_id == "w0" and sub.gen_seconds > 0
        for r in sub.results:
            assert len(r.completions) == hub.sampling.n
            assert all(len(c.token_ids) <= hub.sampling.max_tokens for c in r.completions)
    assert hub.left == ["w0"]
    assert hub.registrations[0].engine == "hf" and hub.registrations[0].name == "t"
    check_logprobs(tiny_model_dir, None, hub, hub.submissions)


def test_worker_moves_to_new_policy(policy_dir, tiny_model_dir, tmp_path):
    hub = StubHub(policy_dir, prompts(2))
    v1 = perturbed(load_file(str(tiny_model_dir / "model.safetensors")), seed=1)
    with serve(hub.app) as url:
        thread, result = start_worker(url, tmp_path, max_prompts=6, prompts_per_lease=2)
        hub.wait_for(lambda: hub.submissions)
        # The hub asks for v1 before it is published: the worker polls, gently.
        hub.min_policy_version = 1
        hub.queue.extend(prompts(4, start=60))
        polls = len(hub.requests)
        threading.Event().wait(1.0)
        assert len(hub.requests) - polls < 20
        write_version(policy_dir, 1, v1, "float32")
        thread.join(timeout=120)
    assert result["rc"] == 0
    assert [s.policy_version for s in hub.submissions] == [0, 1, 1]
    check_logprobs(tiny_model_dir, v1, hub, hub.submissions[1:])
    assert sorted(p.name for p in (tmp_path / "cache").glob("v*")) == ["v0", "v1"]


def test_worker_rides_out_rejections_and_hub_restart(policy_dir, tmp_path):
    hub = StubHub(policy_dir, prompts(4))
    hub.reject_submits = 1
    with serve(hub.app) as url:
        port = int(url.rsplit(":", 1)[1])
        thread, result = start_worker(url, tmp_path, max_prompts=8, prompts_per_lease=2)
        hub.wait_for(lambda: len(hub.submissions) == 1 and not hub.queue)  # first one rejected
    # The hub is down for a while, then comes back with no memory of the worker.
    threading.Event().wait(1.0)
    assert thread.is_alive()
    restarted = StubHub(policy_dir, prompts(4, start=80))
    with serve(restarted.app, port=port):
        thread.join(timeout=120)
    assert result["rc"] == 0
    assert len(restarted.registrations) == 1 and restarted.left == ["w0"]
    assert sum(len(s.results) for s in restarted.submissions) == 4


def test_bad_token_exits_2(policy_dir, tmp_path):
    hub = StubHub(policy_dir)
    with serve(hub.app) as url:
        assert run_worker(url, "wrong", engine="hf", cache_dir=tmp_path) == 2


def rollout_cli(url: str, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "SCATTER_RL_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "rl.cli", "rollout", "--hub", url, "--token", TOKEN, *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_sigterm_leaves_cleanly(policy_dir, tmp_path):
    hub = StubHub(policy_dir, prompts(1000))
    with serve(hub.app) as url:
        proc = rollout_cli(url, tmp_path, "--engine", "hf", "--name", "cli")
        try:
            hub.wait_for(lambda: hub.submissions or proc.poll() is not None, timeout=120)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert hub.left == ["w0"]
    assert "registered with hub" in out and "loaded policy v0" in out


@pytest.mark.slow
def test_cli_vllm_worker_with_policy_update(policy_dir, tiny_model_dir, tmp_path):
    hub = StubHub(policy_dir, prompts(2))
    v1 = perturbed(load_file(str(tiny_model_dir / "model.safetensors")), seed=2)
    with serve(hub.app) as url:
        proc = rollout_cli(url, tmp_path, "--engine", "vllm", "--max-prompts", "4")
        try:
            hub.wait_for(lambda: hub.submissions or proc.poll() is not None, timeout=240)
            write_version(policy_dir, 1, v1, "float32")
            hub.min_policy_version = 1
            hub.queue.extend(prompts(2, start=70))
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert [s.policy_version for s in hub.submissions] == [0, 1]
    check_logprobs(tiny_model_dir, None, hub, hub.submissions[:1])
    check_logprobs(tiny_model_dir, v1, hub, hub.submissions[1:])
    assert hub.left == ["w0"]
