"""Benchmark how policy weights reach several workers: straight from the hub, through nginx, from disk.

A real hub (loopback) serves a delta run of a real model (default: SmolLM2-135M-Instruct,
bf16 shards of `--shard-mb`; v0 keyframe, then `--versions - 1` sparse steps that change
~1.2% of the elements, as measured on the quickstart). Then, each with fresh worker caches:

  direct:      `--workers` WeightSync clients fetch the latest version from the hub at once
  nginx:       the same through nginx in front of the hub (configs/nginx/weights-cache.conf)
  base-model:  one worker with `--base-model` (the checkpoint on disk) fetches it

and reports what the hub sent (its `weights_served` counter), what each worker received
from where, and the wall time. The byte counts are exact; the times are from a shared
machine over loopback and only indicative.

    .venv/bin/python scripts/bench_weights_cache.py [--model smollm2-135m-instruct] [--workers 4]
        [--versions 4] [--shard-mb 64] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from helpers.hub import ADMIN, WORKER, free_port, start_hub, write_config  # noqa: E402
from helpers.mirror import start_nginx  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Weight transport"


def build_store(model_dir: Path, policy_dir: Path, versions: int, shard_mb: int) -> None:
    """v0 = the checkpoint in bf16, then sparse steps (~1.2% of elements), as a delta run."""
    import torch
    from safetensors.torch import load_file

    from rl.weights.files import TensorSpec
    from rl.weights.store import PolicyWriter, write_base

    write_base(policy_dir, model_dir)
    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    layout = [TensorSpec(k, tuple(t.shape), torch.bfloat16) for k, t in state.items()]
    writer = PolicyWriter(policy_dir, layout, shard_bytes=shard_mb * 2**20, fmt="delta", keyframe_every=100)
    g = torch.Generator().manual_seed(0)
    for version in range(versions):
        if version:
            for k, t in state.items():
                mask = torch.rand(t.shape, generator=g) < 0.012
                state[k] = t + t.abs().mean() * 0.05 * torch.randn(t.shape, generator=g) * mask
        written = writer.write(version, state.items())
        shipped, full = written.bytes_shipped / 1e6, written.bytes_full / 1e6
        print(f"v{version}: {shipped:.1f} MB shipped of {full:.1f} MB", flush=True)


def served(hub) -> dict:
    with hub.client(ADMIN) as c:
        return c.get("/v1/status").json()["weights_served"]


def fetch_all(hub_url: str, caches: list[Path], **sync_kw) -> tuple[float, list[dict]]:
    from rollout_workers.client import HubClient
    from rollout_workers.weight_sync import WeightSync

    results: list[dict | None] = [None] * len(caches)

    def one(i: int) -> None:
        with HubClient(hub_url, WORKER) as client:
            sync = WeightSync(client, caches[i], **sync_kw)
            sync.fetch()
            results[i] = dict(sync.bytes_from)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(caches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results), "a worker failed (see the log above)"
    return time.perf_counter() - start, results  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    from rl.models import resolve_model
    from rl.weights.store import published_versions, read_manifest

    model_dir = Path(resolve_model(args.model))
    tmp = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    run_dir = tmp / "run"
    build_store(model_dir, run_dir / "policy", args.versions, args.shard_mb)
    latest = read_manifest(run_dir / "policy", published_versions(run_dir / "policy")[-1])
    full_mb = latest.bytes_full / 1e6
    hub = start_hub(write_config(run_dir, model_dir), tmp / "hub.log", port=free_port())
    nginx = start_nginx(tmp / "nginx", hub.url)
    rows = []
    try:
        for name, kw in (("direct", {}), ("nginx", {"weights_url": nginx.url})):
            before = served(hub)
            caches = [tmp / name / f"w{i}" for i in range(args.workers)]
            seconds, sources = fetch_all(hub.url, caches, **kw)
            hub_mb = (served(hub)["bytes"] - before["bytes"]) / 1e6
            got = {k: sum(s.get(k, 0) for s in sources) / 1e6 for k in ("hub", "mirror", "local")}
            rows.append((f"{args.workers} workers, {name}", hub_mb, got, seconds))
        before = served(hub)
        seconds, sources = fetch_all(hub.url, [tmp / "base" / "w0"], base_model=model_dir)
        hub_mb = (served(hub)["bytes"] - before["bytes"]) / 1e6
        got = {k: sources[0].get(k, 0) / 1e6 for k in ("hub", "mirror", "local")}
        rows.append(("1 worker, --base-model", hub_mb, got, seconds))
    finally:
        nginx.stop()
        hub.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # ~2 GB of policy store and worker caches

    header = (
        f"{model_dir.name}, bf16, {len(latest.full_shards())} shards of <= {args.shard_mb} MB "
        f"({full_mb:.0f} MB); the workers fetch v{latest.version} of a delta run (keyframe v0 + "
        f"{latest.version} sparse steps) with empty caches, at the same time."
    )
    table = [
        "| scenario | hub sent (MB) | from hub / cache / own disk (MB) | wall time (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, hub_mb, got, seconds in rows:
        table.append(
            f"| {name} | {hub_mb:.1f} | {got['hub']:.1f} / {got['mirror']:.1f} / {got['local']:.1f} | {seconds:.1f} |"
        )
    text = "\n".join([header, "", *table])
    print(text)
    print(json.dumps({"rows": [r[0] for r in rows]}))
    if args.write_docs:
        body = (
            f"{SECTION}\n\n`scripts/bench_weights_cache.py` (a real hub and nginx on loopback, "
            "2-core shared machine: times are indicative, byte counts exact).\n\n" + text + "\n"
        )
        docs = DOCS.read_text()
        if SECTION in docs:
            start = docs.index(SECTION)
            end = docs.find("\n## ", start + 1)
            docs = docs[:start] + body + (docs[end + 1 :] if end != -1 else "")
        else:
            docs = docs.rstrip() + "\n\n" + body
        DOCS.write_text(docs)


if __name__ == "__main__":
    main()
