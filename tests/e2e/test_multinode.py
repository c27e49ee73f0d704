"""`rl train` as 2 nodes x 1 rank: two `torchrun --nnodes 2 --node_rank {0,1}` processes on loopback.

The multi-node path of docs/operations.md, exercised on one machine: a static rendezvous at
127.0.0.1 (gloo; with one rank per node DeepSpeed's shared-memory all-reduce stays off, as
across real nodes), ZeRO-3, and an odd number of sequences per step (3 prompts x 3 completions:
rank 0 trains 5, rank 1 trains 4 and runs a zero-loss pass so ZeRO-3's collectives stay matched;
a mismatch would deadlock). Node 0's rank starts the real hub and vLLM worker, node 1's rank only
trains. A SIGINT to node 1's rank alone must stop both ranks after the same step with one
checkpoint (the ranks' stop agreement), and both nodes restarted with --resume continue from it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import helpers.train as h
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(config: Path, logs: Path, *args: str) -> list[tuple[subprocess.Popen, Path]]:
    """Node 0 and node 1 of one job: each its own torchrun (own session), both meeting at 127.0.0.1."""
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "rl.cli", "train", str(config), *args]  # fmt: skip
        log = logs.with_name(f"{logs.name}-node{node_rank}.log")
        out = open(log, "ab")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(cmd, env=h.train_env(), cwd=h.ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        nodes.append((proc, log))
    return nodes


def finish_all(nodes: list[tuple[subprocess.Popen, Path]], timeout: float = 400) -> list[int]:
    try:
        return [h.finish(proc, log, timeout) for proc, log in nodes]
    finally:  # one node failed or hung: do not leave the other waiting on its peer
        for proc, _ in nodes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    h.os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def rank_process(torchrun: subprocess.Popen):
    """The trainer rank a torchrun agent started (not the agent itself)."""
    for p in h.descendants(torchrun.pid):
        with contextlib.suppress(Exception):
            cmd = " ".join(p.cmdline())
            if "rl.cli" in cmd and "torch.distributed.run" not in cmd:
                return p
    raise AssertionError(f"no trainer rank under torchrun {torchrun.pid}")


def test_two_nodes_uneven_split_stop_agreement_and_resume(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    config = h.train_config(
        run_dir,
        tiny_model_dir,
        sampling={"n": 3},
        trainer={"max_steps": 8, "prompts_per_step": 3, "micro_batch_size": 2,
                 "deepspeed": "configs/deepspeed/zero3.json"},
    )  # fmt: skip
    metrics_path = run_dir / "metrics.jsonl"

    # First attempt: stop it from node 1 once a step is done.
    nodes = start_nodes(config, tmp_path / "first")
    (node0, log0), (node1, log1) = nodes
    h.wait_for(lambda: len(h.read_jsonl_live(metrics_path)) >= 1, "the first step", node0, log0, timeout=400)
    rank_process(node1).send_signal(signal.SIGINT)
    codes = finish_all(nodes)
    first0, first1 = log0.read_text(), log1.read_text()
    assert codes == [1, 1], (codes, h.tail(log0), h.tail(log1))  # each torchrun reports its rank's exit 130
    assert "SIGINT received" in first1 and "stopped by another rank" in first0, h.tail(log0)
    assert "DeepSpeed ZeRO-3 engine on cpu: rank 1/2" in first1
    # Rank 0 alone started the hub and the worker.
    assert first0.count("hub at http://") == 1 and "hub at http://" not in first1
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["hub.log", "worker-0.log"]

    stopped = h.by_step(h.read_jsonl(metrics_path))
    last = max(stopped)
    assert sorted(stopped) == list(range(1, last + 1)) and last < 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{last}"]
    assert {f.name for f in (run_dir / "checkpoints" / f"step_{last}").glob("rng_rank*.pt")} == {
        "rng_rank0.pt",
        "rng_rank1.pt",
    }

    # Both nodes resume from that checkpoint and train one more step.
    nodes = start_nodes(config, tmp_path / "resume", "--resume", f"trainer.max_steps={last + 1}")
    assert finish_all(nodes) == [0, 0], h.tail(nodes[0][1])
    resumed0 = nodes[0][1].read_text()
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{last}'}" in resumed0.replace("\n", "")

    metrics = h.by_step(h.read_jsonl(metrics_path))
    assert sorted(metrics) == list(range(1, last + 2))
    # Every step trained all 9 sequences (5 on rank 0, 4 + one zero-loss pass on rank 1).
    assert all(m["sequences"] == 9 and m["grad_norm"] > 0 for m in metrics.values())
    published = load_file(run_dir / "policy" / f"v{last + 1}" / "model.safetensors")
    exported = load_file(run_dir / "final" / "model.safetensors")
    assert published.keys() == exported.keys() and all((published[k] == exported[k]).all() for k in published)
