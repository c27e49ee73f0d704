"""The hub's CPU time per submission, measured in process: no sockets, no load generator.

`scripts/bench_hub.py` measures the hub behind real HTTP under an open-loop load; on a shared,
loaded machine its load generator (and its latencies) move with the neighbours. This script asks
the one question that does not: how many CPU-seconds does the hub's own code spend per
submission? It drives the hub's real ASGI app (rl/hub/routes.py, everything but uvicorn's HTTP
parsing) from one event loop: per submission one lease and one `POST /v1/rollouts` (a group of
8 completions of 256-1,024 tokens, as in bench_hub.py), its scoring (the inline `format` term,
decoding included), and a sixteenth of a 16-group batch pull. CPU time is `time.process_time`
of this process (the verifier pool's processes are idle: `format` scores inline).

Each measurement is a fresh child process pinned with `taskset`; the wires alternate within each
repeat. `baseline` runs the hub of another checkout (`--baseline-root`, e.g. the main branch
before the packed wire) with JSON lists, or with the packed wire (`--baseline-wire packed`: a checkout
that has it, e.g. main before the hub's hot routes).

    .venv/bin/python scripts/bench_hub_cpu.py [--wire baseline json packed] [--baseline-root ../main]
        [--baseline-wire json|packed] [--submissions 300] [--repeats 3] [--cpu 0] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = list(sys.path)
from bench_hub import ADMIN, WORKER, group_templates, spread, submit_body, tiny_model, write_config  # noqa: E402

sys.path[:] = PATH  # bench_hub puts this checkout first: `rl` must come from PYTHONPATH (a baseline's checkout)

BATCH = 16


class App:
    """Requests straight into an ASGI app: (status, body)."""

    def __init__(self, app) -> None:
        self.app = app

    async def request(self, method: str, path: str, body: bytes = b"", token: str = WORKER, secret: str = ""):
        headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        if secret:
            headers.append((b"x-worker-secret", secret.encode()))
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            if pending:
                return pending.pop()
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        await self.app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def drive(hub, app: App, wire: str, submissions: int, profile: Path | None) -> dict:
    templates = group_templates(hub.state.vocab_size, 0, "json" if wire == "baseline" else wire)
    offer = (
        {"name": "sim", "engine": "vllm"} if wire == "baseline" else {"name": "sim", "engine": "vllm", "wire": [wire]}
    )
    workers = []
    for _ in range(BATCH):
        status, body = await app.request("POST", "/v1/workers", json.dumps(offer).encode())
        reg = json.loads(body)
        if status != 200:
            raise RuntimeError(f"registration refused: {status} {body[:300]!r}")
        workers.append((reg["worker_id"], reg["worker_secret"]))

    async def one(k: int) -> None:
        wid, secret = workers[k % BATCH]
        ask = b'{"worker_id":"%s","policy_version":0,"max_tasks":1}' % wid.encode()
        status, body = await app.request("POST", "/v1/leases", ask, secret=secret)
        lease = json.loads(body)  # a few hundred bytes (the client's only parse)
        payload = submit_body(wid, lease["lease_id"], lease["tasks"][0]["task_id"], templates[k % len(templates)])
        status, body = await app.request("POST", "/v1/rollouts", payload, secret=secret)
        if status != 200:
            raise RuntimeError(f"submission refused: {status} {body[:300]!r}")
        if k % BATCH == BATCH - 1:
            while hub._scoring_tasks:
                await asyncio.sleep(0)
            pull = b'{"num_groups":%d,"step":0,"timeout_s":0}' % BATCH
            status, body = await app.request("POST", "/v1/batches", pull, token=ADMIN)
            if status != 200 or b'"complete":true' not in body:  # not parsed: this process's CPU time is the hub's
                raise RuntimeError(f"batch pull failed: {status} {body[:300]!r}")

    for k in range(2 * BATCH):  # warm-up: first calls, caches
        await one(k)
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    cpu, wall = time.process_time(), time.perf_counter()
    for k in range(submissions):
        await one(k)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    return {"wire": wire, "submissions": submissions, "cpu_ms_per_submission": 1000 * cpu / submissions,
            "wall_ms_per_submission": 1000 * wall / submissions}  # fmt: skip


def child(args) -> None:
    import uvloop
    from safetensors.torch import load_file

    from rl.config import load_config
    from rl.hub.main import build_hub
    from rl.hub.routes import create_app
    from rl.weights.store import write_base, write_version
    from rl.wire.tokens import Tokens

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, _ = tiny_model(tmp)
        config = write_config(tmp / "run", model, BATCH)
        write_base(tmp / "run" / "policy", model)
        write_version(tmp / "run" / "policy", 0, load_file(model / "model.safetensors"), "float32")

        async def main() -> dict:
            hub = build_hub(load_config(config, []), tokens=Tokens(ADMIN, [WORKER]))
            app = App(create_app(hub))
            gc.collect()  # as `rl hub` does after start-up (rl/hub/main.py): what it built is never scanned again
            gc.freeze()
            try:
                return await drive(hub, app, args.child, args.submissions, args.profile)
            finally:
                hub.pool.close()

        print("RESULT " + json.dumps(uvloop.run(main())), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wire", nargs="+", choices=["baseline", "json", "packed"], default=["json", "packed"])
    ap.add_argument("--baseline-root", type=Path, help="Checkout whose hub the `baseline` wire runs (JSON lists).")
    ap.add_argument("--baseline-wire", choices=["json", "packed"], default="json",
                    help="The wire the `baseline` checkout's hub gets (json: a worker that offers none).")  # fmt: skip
    ap.add_argument("--submissions", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", default="0", help="taskset CPU list of each measurement's process.")
    ap.add_argument("--profile", type=Path, help="cProfile (CPU-time clock) each measurement into this folder.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if "baseline" in args.wire and args.baseline_root is None:
        ap.error("--wire baseline needs --baseline-root")
    rows = []
    for repeat in range(args.repeats):
        for wire in args.wire:
            root = args.baseline_root.resolve() if wire == "baseline" else ROOT
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
            driven = "packed" if wire == "baseline" and args.baseline_wire == "packed" else wire
            cmd = ["taskset", "-c", args.cpu, sys.executable, __file__, "--child", driven,
                   "--submissions", str(args.submissions)]  # fmt: skip
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                cmd += ["--profile", str(args.profile.resolve() / f"hub-cpu-{wire}-{repeat}.prof")]
            out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
            result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not result:
                raise RuntimeError(f"{wire} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            rows.append({**json.loads(result[0][7:]), "wire": wire})
            print(json.dumps(rows[-1]), flush=True)
    first = args.wire[0]
    print(f"\n| wire | hub CPU ms / submission | submissions/s per core | vs {first} (per repeat) |")
    print("| --- | ---: | ---: | ---: |")
    for wire in args.wire:
        mine = [r["cpu_ms_per_submission"] for r in rows if r["wire"] == wire]
        ref = [r["cpu_ms_per_submission"] for r in rows if r["wire"] == first]
        print(f"| {wire} | {spread(mine, '.2f')} | {spread([1000 / m for m in mine], '.0f')} | "
              f"{spread([a / b for a, b in zip(ref, mine, strict=True)], '.2f')}x |")  # fmt: skip


if __name__ == "__main__":
    main()
