"""Benchmark the hub's control plane under an open-loop load of many simulated rollout workers.

What a real pool looks like to the hub: each worker heartbeats every `--heartbeat-s` and, every
1-10 s (uniform "think time": the generation a real GPU worker does), leases one prompt and submits
its group: n=8 completions of 256-1,024 tokens with a logprob per token (~120 kB of JSON, ~55 kB packed). The
schedule is open-loop: a worker's next submission is due at a time drawn in advance, not after
the previous answer, so a slow hub shows up as latency instead of quietly lowering the load.
A simulated trainer pulls batches of 64 groups as fast as the hub fills them.

Process layout (so the numbers are the hub's, not the load generator's):
- the hub (`rl hub`, uvicorn + uvloop) pinned to CPU 0 with `taskset`; its verifier pool's
  processes inherit that core (the reward here is the inline `format` term);
- the simulated workers in `--load-procs` other processes pinned to the remaining CPUs, each
  worker on its own keep-alive connection, on a minimal HTTP/1.1 client over asyncio streams
  (payloads are pre-encoded; per request the client only fills in ids);
- hub CPU time is read from /proc for the hub process alone (not its verifier children).

Rows: `--workers` open-loop sizes (default 100 1000 5000), then one saturation row: `--sat-conns`
workers with no think time, which keeps the hub core busy; its submissions/s is the saturation
throughput of one hub core. After every row an audit checks that every task id handed out is in
exactly one of queued, leased, scoring, buffered, or consumed by the simulated trainer.

Rows run once per `--wire` (JSON lists or packed arrays, docs/protocol.md), alternating, `--repeats` times.

    .venv/bin/python scripts/bench_hub.py [--workers 100 1000 5000] [--seconds 30] [--wire json packed]
        [--repeats 3] [--profile DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN, WORKER = "bench-admin-token", "bench-worker-token"
GROUP = 8
MIN_TOKENS, MAX_TOKENS = 256, 1024
TEMPLATES = 16
BASELINE_ROOT = ROOT
BASELINE_WIRE = "json"


# --------------------------------------------------------------------------- a minimal HTTP/1.1 client


class Conn:
    """One keep-alive connection; requests are sequential on it (as on a worker's connection)."""

    def __init__(self, host: str, port: int, token: str, secret: str = ""):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        if secret:  # a worker registration's secret, sent on every call (docs/protocol.md)
            self.auth += f"X-Worker-Secret: {secret}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            await self.open()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
        self.writer.write(head + self.auth + b"\r\n" + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- payloads


def group_templates(vocab: int, seed: int, wire: str) -> list[bytes]:
    """Pre-encoded `results[0].completions` JSON of GROUP completions each (ids filled in per request), as
    JSON lists or packed (rl/wire/packed.py): the same values either way (log-probs exact in float32)."""
    rng = random.Random(seed)
    out = []
    for _ in range(TEMPLATES):
        completions = []
        for _ in range(GROUP):
            n = rng.randint(MIN_TOKENS, MAX_TOKENS)
            ids = [rng.randrange(3, vocab) for _ in range(n)]
            # What a worker has: float32 log-probs (vLLM's), written as the shortest decimal that reads back.
            logprobs = [float(repr(float(x))) for x in np.float32([-rng.expovariate(1.0) for _ in range(n)])]
            if wire == "packed":
                from rl.wire.packed import pack_ids, pack_logprobs

                ids, logprobs = pack_ids(ids), pack_logprobs(logprobs)
            completions.append(
                {"token_ids": ids, "logprobs": logprobs, "finish_reason": "length" if n == MAX_TOKENS else "stop"}
            )
        out.append(json.dumps(completions, separators=(",", ":")).encode())
    return out


def submit_body(worker_id: str, lease_id: str, task_id: int, completions: bytes) -> bytes:
    return (
        b'{"worker_id":"%s","lease_id":"%s","policy_version":0,"gen_seconds":1.0,'
        b'"results":[{"task_id":%d,"completions":%s}]}' % (worker_id.encode(), lease_id.encode(), task_id, completions)
    )


# --------------------------------------------------------------------------- simulated workers


async def sim_worker(conn, wid, until, think, heartbeat_s, templates, stats, rng) -> None:
    hb_body = b'{"policy_version":0,"tokens_per_s":1000.0}'
    lease_body = b'{"worker_id":"%s","policy_version":0,"max_tasks":1}' % wid.encode()
    now = time.monotonic()
    next_submit = now + (rng.uniform(0, think[1]) if think[1] > 0 else 0.0)
    next_beat = now + rng.uniform(0, heartbeat_s)
    while True:
        due = min(next_submit, next_beat)
        if due >= until:
            return
        if (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        try:
            if next_beat <= next_submit:
                next_beat += heartbeat_s
                status, answer = await conn.request("POST", f"/v1/workers/{wid}/heartbeat", hb_body)
                stats["heartbeats" if status == 200 else "errors"] += 1
                if status != 200:
                    stats["error_kinds"].append(f"heartbeat {status} {answer[:80]!r}")
                continue
            # Open loop: due times are drawn in advance and do not wait for answers. No think time
            # (the saturation row) is a closed loop: the next request goes as soon as this one is answered.
            next_submit = next_submit + rng.uniform(*think) if think[1] > 0 else time.monotonic()
            t0 = time.perf_counter()
            status, body = await conn.request("POST", "/v1/leases", lease_body)
            t1 = time.perf_counter()
            stats["lease_ms"].append((t1 - t0) * 1000)
            if status != 200:
                stats["errors"] += 1
                stats["error_kinds"].append(f"lease {status} {body[:80]!r}")
                continue
            lease = json.loads(body)
            if lease["lease_id"] is None:
                stats["empty_leases"] += 1
                continue
            payload = submit_body(wid, lease["lease_id"], lease["tasks"][0]["task_id"], rng.choice(templates))
            status, answer = await conn.request("POST", "/v1/rollouts", payload)
            stats["submit_ms"].append((time.perf_counter() - t1) * 1000)
            stats["submissions" if status == 200 else "errors"] += 1
            if status != 200:
                stats["error_kinds"].append(f"submit {status} {answer[:80]!r}")
            stats["bytes"] += len(payload)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            stats["errors"] += 1
            stats["error_kinds"].append(type(e).__name__)
            conn.writer = None


async def load_main(host, port, ids, start_at, seconds, think, heartbeat_s, vocab, seed, wire) -> dict:
    templates = group_templates(vocab, seed, wire)
    stats = {"lease_ms": [], "submit_ms": [], "submissions": 0, "heartbeats": 0, "errors": 0,
             "empty_leases": 0, "bytes": 0, "error_kinds": []}  # fmt: skip
    conns = [Conn(host, port, WORKER, secret) for _, secret in ids]
    for c in conns:
        await c.open()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    until = time.monotonic() + seconds
    rng = random.Random(seed)
    await asyncio.gather(
        *(
            sim_worker(c, w, until, think, heartbeat_s, templates, stats, random.Random(rng.random()))
            for c, (w, _) in zip(conns, ids, strict=True)
        )
    )
    for c in conns:
        c.close()
    return stats


def load_process(args: tuple, out: mp.Queue) -> None:
    import uvloop

    out.put(uvloop.run(load_main(*args)))


# --------------------------------------------------------------------------- the simulated trainer


async def trainer_main(host, port, start_at, seconds, consumed: list[int]) -> None:
    conn = Conn(host, port, ADMIN)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    until = time.monotonic() + seconds + 2.0
    # A trainer step's batch (the config's prompts_per_step), as `rl train` pulls it. Pulls of 16 fell
    # behind a saturated hub (one round trip at a time through its queue): the buffer then grew without
    # bound, which a real run's staleness window never lets happen.
    body = b'{"num_groups":64,"step":0,"timeout_s":1.0}'
    while time.monotonic() < until:
        status, payload = await conn.request("POST", "/v1/batches", body)
        if status == 200:
            consumed.extend(g["task_id"] for g in json.loads(payload)["groups"])
    conn.close()


# --------------------------------------------------------------------------- hub process


def write_config(run_dir: Path, model: Path, workers: int) -> Path:
    cfg = {
        "run_name": "bench-hub",
        "run_dir": str(run_dir),
        "model": {"name": str(model), "max_model_len": 2048},
        "data": {"source": {"type": "reasoning_gym", "dataset": "basic_arithmetic", "size": 4000},
                 "eval_size": 0, "max_prompt_tokens": 256},
        "sampling": {"n": GROUP, "max_tokens": MAX_TOKENS},
        "trainer": {"prompts_per_step": 64, "micro_batch_size": 8},
        "rewards": {"terms": [{"name": "format"}], "workers": 1},
        "async": {"max_staleness": 1_000_000},
        "hub": {"buffer_size": 1_000_000, "max_body_mb": 4, "heartbeat_interval_s": 10.0, "lease_ttl_s": 600,
                "max_workers_per_token": max(64, workers)},
        "logging": {"wandb": {"mode": "disabled"}},
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


PROFILED = """import cProfile, runpy, sys, time
out = sys.argv.pop(1)
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module("rl.cli", run_name="__main__")
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


def start_hub(config: Path, log: Path, port: int, cpu: int, profile: Path | None = None,
              root: Path = ROOT) -> subprocess.Popen:  # fmt: skip
    env = {**os.environ, "RL_HUB_ADMIN_TOKEN": ADMIN, "RL_HUB_WORKER_TOKENS": WORKER, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}  # fmt: skip
    # Under cProfile with a CPU-time clock: time the hub spends descheduled on a loaded machine is not counted.
    run = ["-c", PROFILED, str(profile)] if profile is not None else ["-m", "rl.cli"]
    cmd = ["taskset", "-c", str(cpu), sys.executable, *run, "hub", str(config),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=root)  # noqa: SIM115
    from rl.wire.client import HubHTTP

    deadline = time.monotonic() + 180
    with HubHTTP(f"http://127.0.0.1:{port}", ADMIN) as probe:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"hub exited:\n{log.read_text()[-3000:]}")
            if probe.healthy():
                return proc
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("hub did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_get(port: int, path: str) -> dict:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    r.raise_for_status()
    return r.json()


def audit(port: int, consumed: list[int]) -> dict:
    """Every task id handed out is in exactly one place: queued, leased, scoring, buffered, or consumed."""
    places = admin_get(port, "/v1/audit")
    seen: dict[int, list[str]] = {}
    for place in ("queued", "leased", "scoring", "buffered"):
        for tid in places[place]:
            seen.setdefault(tid, []).append(place)
    for tid in consumed:
        seen.setdefault(tid, []).append("consumed")
    handed_out = places["position"]
    lost = [t for t in range(handed_out) if t not in seen]
    twice = {t: p for t, p in seen.items() if len(p) > 1}
    unknown = [t for t in seen if not 0 <= t < handed_out]
    if not places.get("counts_agree", 1):  # a hub without the check (a baseline) says nothing
        print("AUDIT: the hub's per-operator counts of registrations and leased tasks disagree with a recount")
    return {"handed_out": handed_out, "lost": len(lost), "twice": len(twice), "unknown": len(unknown)}


# --------------------------------------------------------------------------- one row


def run_row(tmp: Path, model: Path, vocab: int, workers: int, seconds: float, think: tuple[float, float],
            heartbeat_s: float, load_procs: int, hub_cpu: int, load_cpus: str, wire: str,
            profile: Path | None = None) -> dict:  # fmt: skip
    run_dir = tmp / f"run-{workers}-{think[1]:g}-{wire}-{time.monotonic_ns()}"
    config = write_config(run_dir, model, workers)
    from safetensors.torch import load_file

    from rl.weights.store import write_base, write_version

    write_base(run_dir / "policy", model)
    write_version(run_dir / "policy", 0, load_file(model / "model.safetensors"), "float32")
    port = free_port()
    baseline = wire == "baseline" and BASELINE_WIRE == "json"  # the hub of --baseline-root, sent JSON lists
    root, label = (BASELINE_ROOT if wire == "baseline" else ROOT), wire
    wire = BASELINE_WIRE if wire == "baseline" else wire
    hub = start_hub(config, run_dir / "hub.log", port, hub_cpu, profile, root)
    try:
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {WORKER}"},
                          timeout=60) as c:  # fmt: skip
            offer = {"name": "sim", "engine": "vllm"} if baseline else {"name": "sim", "engine": "vllm", "wire": [wire]}
            regs = [c.post("/v1/workers", json=offer).json() for i in range(workers)]
            assert baseline or all(r["wire"] == wire for r in regs), regs[0]
            ids = [(r["worker_id"], r.get("worker_secret", "")) for r in regs]
        start_at = time.time() + 3.0 + workers / 2000
        queue: mp.Queue = mp.get_context("spawn").Queue()
        ctx = mp.get_context("spawn")
        procs = []
        for k in range(load_procs):
            part = ids[k::load_procs]
            args = ("127.0.0.1", port, part, start_at, seconds, think, heartbeat_s, vocab, k,
                    "json" if baseline else wire)  # fmt: skip
            p = ctx.Process(target=load_process, args=(args, queue))
            p.start()
            subprocess.run(["taskset", "-pc", load_cpus, str(p.pid)], check=True, capture_output=True)
            procs.append(p)
        consumed: list[int] = []
        import threading

        trainer = threading.Thread(
            target=lambda: asyncio.run(trainer_main("127.0.0.1", port, start_at, seconds, consumed)), daemon=True
        )
        trainer.start()
        # Hub CPU over exactly the measured window (the load processes count what completes inside it).
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = cpu_seconds(hub.pid)
        time.sleep(seconds)
        hub_cpu_s, wall = cpu_seconds(hub.pid) - cpu0, seconds
        results = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        trainer.join(timeout=seconds + 60)
        time.sleep(2.0)  # scoring of the last submissions finishes
        check = audit(port, consumed)
    finally:
        if profile is not None:  # a clean exit writes the profile (uvicorn re-raises SIGTERM after its shutdown)
            import httpx

            httpx.post(f"http://127.0.0.1:{port}/v1/shutdown", headers={"Authorization": f"Bearer {ADMIN}"})
        else:
            hub.terminate()
        hub.wait(30)
    merged = {k: sum((r[k] for r in results), [] if isinstance(results[0][k], list) else 0) for k in results[0]}
    lease, submit = sorted(merged["lease_ms"]), sorted(merged["submit_ms"])

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    subs = merged["submissions"]
    return {
        "wire": label,
        "workers": workers,
        "think_s": f"{think[0]:g}-{think[1]:g}",
        "submissions_per_s": subs / seconds,
        "offered_per_s": workers / (sum(think) / 2) if think[1] > 0 else float("nan"),
        "lease_p50_ms": pct(lease, 0.5),
        "lease_p99_ms": pct(lease, 0.99),
        "submit_p50_ms": pct(submit, 0.5),
        "submit_p99_ms": pct(submit, 0.99),
        "hub_cpu_ms_per_submission": 1000 * hub_cpu_s / max(subs, 1),
        "hub_cpu_util": hub_cpu_s / wall,
        "mb_per_s": merged["bytes"] / seconds / 1e6,
        "errors": merged["errors"],
        "error_kinds": dict(Counter(merged["error_kinds"]).most_common(5)),
        "consumed": len(consumed),
        **check,
    }


def tiny_model(tmp: Path) -> tuple[Path, int]:
    from transformers import AutoConfig

    from rl.models import build_tiny_model

    model = tmp / "model"
    build_tiny_model(model)
    return model, AutoConfig.from_pretrained(model).vocab_size


def spread(values: list[float], fmt: str = ".1f") -> str:
    """median (min-max) of the repeats."""
    xs = sorted(values)
    median = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    return f"{median:{fmt}}" if len(xs) == 1 else f"{median:{fmt}} ({xs[0]:{fmt}}-{xs[-1]:{fmt}})"


def table(rows: list[dict], args) -> str:
    note = (
        f"{args.seconds:g} s per row after registration; hub pinned to CPU {args.hub_cpu} (`taskset`), simulated "
        f"workers in {args.load_procs} processes on CPU {args.load_cpus}; each submission is one group of {GROUP} "
        f"completions of {MIN_TOKENS}-{MAX_TOKENS} tokens with logprobs (JSON lists or packed); heartbeats every "
        f"{args.heartbeat_s:g} s; think time {args.think[0]:g}-{args.think[1]:g} s (open loop); last rows: no think "
        f"time (saturation). {args.repeats} interleaved repeats (the wires alternate within each repeat), median "
        "(min-max). `lost`/`twice`: task ids handed out that are in no place / in two places at the end (summed)."
    )
    header = ("| wire | workers | think (s) | offered subs/s | subs/s | lease p50 / p99 (ms) | submit p50 / p99 (ms) | "
              "hub CPU ms / sub | hub core busy | kB / sub | errors | lost | twice |")  # fmt: skip
    lines = [note, "", header, "|" + " --- |" * 13]
    keys = list(dict.fromkeys((r["workers"], r["think_s"], r["wire"]) for r in rows))
    for workers, think, wire in keys:
        rs = [r for r in rows if (r["workers"], r["think_s"], r["wire"]) == (workers, think, wire)]
        col = lambda k, fmt=".1f", rs=rs: spread([r[k] for r in rs], fmt)  # noqa: E731
        kb = spread([1000 * r["mb_per_s"] / max(r["submissions_per_s"], 1e-9) for r in rs], ".0f")
        lines.append(
            f"| {wire} | {workers} | {think} | {col('offered_per_s', '.0f')} | {col('submissions_per_s', '.0f')} | "
            f"{col('lease_p50_ms')} / {col('lease_p99_ms')} | {col('submit_p50_ms')} / {col('submit_p99_ms')} | "
            f"{col('hub_cpu_ms_per_submission', '.2f')} | {spread([100 * r['hub_cpu_util'] for r in rs], '.0f')}% | "
            f"{kb} | {sum(r['errors'] for r in rs)} | {sum(r['lost'] for r in rs)} | {sum(r['twice'] for r in rs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="*", default=[100, 1000, 5000])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--think", type=float, nargs=2, default=[1.0, 10.0], help="Uniform think time range (s).")
    ap.add_argument("--heartbeat-s", type=float, default=10.0)
    ap.add_argument("--sat-conns", type=int, default=64, help="Workers of the no-think-time saturation row (0: none).")
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--hub-cpu", type=int, default=0)
    ap.add_argument("--load-cpus", default="1")
    ap.add_argument("--wire", nargs="+", choices=["baseline", "json", "packed"], default=["json", "packed"],
                    help="Submission encodings to compare; each row runs once per wire.")  # fmt: skip
    ap.add_argument("--baseline-root", type=Path, help="Checkout whose hub the `baseline` wire runs (JSON lists).")
    ap.add_argument("--baseline-wire", choices=["json", "packed"], default="json",
                    help="What the `baseline` hub is sent: JSON lists, or packed (a checkout with it).")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="Interleaved repeats of every row and wire.")
    ap.add_argument("--profile", type=Path, help="Run the hub under cProfile; one .prof per row in this folder.")
    ap.add_argument("--write-docs", action="store_true", help="Replace the hub section of docs/benchmarks.md.")
    args = ap.parse_args()
    if "baseline" in args.wire:
        if args.baseline_root is None:
            ap.error("--wire baseline needs --baseline-root")
        global BASELINE_ROOT, BASELINE_WIRE
        BASELINE_ROOT, BASELINE_WIRE = args.baseline_root.resolve(), args.baseline_wire
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, vocab = tiny_model(tmp)
        plan = [(w, tuple(args.think)) for w in args.workers]
        if args.sat_conns:
            plan.append((args.sat_conns, (0.0, 0.0)))
        for repeat in range(args.repeats):
            for workers, think in plan:
                for wire in args.wire:
                    profile = None
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"hub-{wire}-{workers}-{think[1]:g}-{repeat}.prof"
                    row = run_row(tmp, model, vocab, workers, args.seconds, think, args.heartbeat_s, args.load_procs,
                                  args.hub_cpu, args.load_cpus, wire, profile)  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    text = table(rows, args)
    print(text)
    if args.write_docs:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_docs import replace_section

        replace_section("Hub control plane", "scripts/bench_hub.py", text)


if __name__ == "__main__":
    main()
