"""Benchmark the hub's control plane: N simulated workers (real HTTP clients) against a real hub process.

Workers register (before the clock starts), then lease, "generate" instantly (fixed token ids)
and submit, each on its own keep-alive connection; a simulated trainer pulls batches. Reports
submissions/s, lease latency p50/p99 (requests completed inside the window) and lost tasks
(handed out but neither consumed, buffered, scoring, leased nor queued at the end: must be 0)
for N = 10, 100, 1000. Simulated workers have no think time (real ones generate for seconds
between calls), so with many of them the latency is queueing: about N / throughput. They all
run in this one process, competing with the hub for CPU on a small machine: the numbers are a
floor for the hub, not a ceiling.

    .venv/bin/python scripts/bench_hub.py [--workers 10 100 1000] [--seconds 20] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers.hub import ADMIN, WORKER, publish_initial_policy, start_hub, write_config  # noqa: E402


async def register(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/workers", json={"name": "sim", "engine": "hf"})
    r.raise_for_status()
    return r.json()["worker_id"]


async def worker_loop(client: httpx.AsyncClient, wid: str, stop: float, n: int, stats: dict) -> None:
    comps = [{"token_ids": [5, 6, 7, 8], "logprobs": [-0.5] * 4, "finish_reason": "stop"}] * n
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/leases", json={"worker_id": wid, "policy_version": 0, "max_tasks": 2})
        except httpx.TransportError:
            stats["errors"] += 1
            continue
        if time.monotonic() < stop:  # only what completes inside the window counts
            stats["lease_ms"].append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            stats["errors"] += 1
            continue
        lease = r.json()
        if lease["lease_id"] is None:
            await asyncio.sleep(min(lease["retry_after_s"], 0.2))
            continue
        body = {"worker_id": wid, "lease_id": lease["lease_id"], "policy_version": 0,
                "results": [{"task_id": t["task_id"], "completions": comps} for t in lease["tasks"]]}  # fmt: skip
        try:
            r = await client.post("/v1/rollouts", json=body)
        except httpx.TransportError:  # counted; an unanswered lease expires and its tasks are re-queued
            stats["errors"] += 1
            continue
        if r.status_code != 200:
            stats["errors"] += 1
        elif time.monotonic() < stop:
            stats["submissions"] += 1
            stats["tasks"] += len(r.json()["accepted"])
    await client.delete(f"/v1/workers/{wid}")


async def trainer_loop(url: str, stop: float, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        while time.monotonic() < stop:
            r = await c.post("/v1/batches", json={"num_groups": 8, "step": 0, "timeout_s": 1.0})
            stats["consumed"] += len(r.json()["groups"])


async def run(url: str, num_workers: int, seconds: float, n: int) -> dict:
    stats = {"lease_ms": [], "submissions": 0, "tasks": 0, "errors": 0, "consumed": 0}
    # One client (one connection) per simulated worker, as real workers have: a single shared
    # pool of N connections costs httpcore O(N) per request and would measure the client instead.
    headers = {"Authorization": f"Bearer {WORKER}"}
    tls = ssl.create_default_context()  # unused on http://, but each client would load the CA bundle (~40 ms)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=url, headers=headers, timeout=120, verify=tls))
            for _ in range(num_workers)
        ]
        ids = await asyncio.gather(*(register(c) for c in clients))  # before the clock starts
        stop = time.monotonic() + seconds
        loops = (worker_loop(c, w, stop, n, stats) for c, w in zip(clients, ids, strict=True))
        await asyncio.gather(trainer_loop(url, stop, stats), *loops)
        elapsed = seconds  # requests still in flight at the end are not counted
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        await asyncio.sleep(3.0)  # let scoring finish
        st = (await c.get("/v1/status")).json()
        ledger = (await c.get("/v1/ledger")).json()
    accounted = st["consumed"] + len(ledger["pending"])
    lease = sorted(stats["lease_ms"])
    return {
        "workers": num_workers,
        "submissions_per_s": stats["submissions"] / elapsed,
        "tasks_per_s": stats["tasks"] / elapsed,
        "lease_p50_ms": statistics.median(lease) if lease else float("nan"),
        "lease_p99_ms": lease[int(0.99 * (len(lease) - 1))] if lease else float("nan"),
        "errors": stats["errors"],
        "handed_out": ledger["position"],
        "lost": ledger["position"] - accounted,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--write-docs", action="store_true", help="Replace the hub section of docs/benchmarks.md.")
    args = ap.parse_args()
    from rl.models import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        build_tiny_model(model)
        for num in args.workers:
            run_dir = tmp / f"run-{num}"
            config = write_config(
                run_dir, model,
                data={"source": {"type": "reasoning_gym", "dataset": "basic_arithmetic", "size": 5000}},
                hub={"buffer_size": 100_000, "max_body_mb": 4, "heartbeat_interval_s": 30.0},
                rewards={"terms": [{"name": "format"}], "workers": 1},
                **{"async": {"max_staleness": 100_000}},
            )  # fmt: skip
            publish_initial_policy(run_dir, model)
            hub = start_hub(config, run_dir / "hub.log")
            try:
                rows.append(asyncio.run(run(hub.url, num, args.seconds, n=2)))
            finally:
                hub.stop()
            print(rows[-1], flush=True)
    note = (
        f"{args.seconds:g} s per row; each submission carries 2 tasks x n=2 completions of 4 tokens; `format` "
        f"reward; simulated workers have no think time and share this {os.cpu_count()}-core machine with the hub "
        "(one process for all of them), so p50 latency is mostly queueing (about N / throughput)."
    )
    header = "| workers | submissions/s | tasks/s | lease p50 (ms) | lease p99 (ms) | errors | handed out | lost |"
    table = [note, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        table.append(
            f"| {r['workers']} | {r['submissions_per_s']:.0f} | {r['tasks_per_s']:.0f} | {r['lease_p50_ms']:.1f} | "
            f"{r['lease_p99_ms']:.1f} | {r['errors']} | {r['handed_out']} | {r['lost']} |"
        )
    print("\n".join(table))
    if args.write_docs:
        from bench_docs import replace_section

        replace_section("Hub control plane", "scripts/bench_hub.py", "\n".join(table))


if __name__ == "__main__":
    main()
