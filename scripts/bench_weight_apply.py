"""Benchmark loading a delta version on a worker: applied in place vs rebuilt and reloaded in full (issue 19.3).

Both start from the engine holding v0 and the delta files of v1 on disk (the download is the same
for both and not timed):
  full      what a worker did before: rebuild v1's shards from v0's and the deltas (rl/weights/apply.py:
            every shard rewritten and sha256-hashed), then `Engine.load_weights` (every tensor reloaded)
  in place  `Engine.apply_delta`: only the changed elements rewritten in the live tensors, then checked
            against the manifest (rl/weights/inplace.py): their changed elements re-hashed (`changes`,
            the worker's default), or each changed tensor whole (`tensors`)
  reload    (vLLM only) the vLLM engine's previous in-place path, still its fallback for models whose
            tensors it cannot map: the delta applied to a host copy of the checkpoint tensors, then
            vLLM's reload of the layers that changed (`changes` hashing)
The methods are interleaved `--repeats` times (each first in turn); before each the engine goes
back to v0 (untimed): a full load of v0 for `full`; for in place, a full load of v0, then v1 and v2 (= v0
again, a delta from v1) applied in place, so the timed apply finds what a worker following deltas has
(vLLM on CPU: the plain weights kept at the last load, mapped and checked at the first apply).
Deviation from a run: v1 is synthetic, `--fraction` of each tensor's elements moved by one bf16 ulp
(an RL step changes ~1.4% of the elements, docs/benchmarks.md), written by the real PolicyWriter
as a delta version.

    .venv/bin/python scripts/bench_weight_apply.py [--model smollm2-135m-instruct] [--engine hf|vllm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.models import resolve_model  # noqa: E402
from rl.weights.apply import delta_files, rebuild_from_deltas  # noqa: E402
from rl.weights.files import ChangeHashes, TensorSpec  # noqa: E402
from rl.weights.store import PolicyWriter, export_version, read_manifest, version_dir, write_base  # noqa: E402
from rollout_workers.engines import EngineSpec, make_engine  # noqa: E402


def one_ulp_steps(state: dict[str, torch.Tensor], fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """`state` (bf16) with `fraction` of each tensor's elements moved one ulp up or down (their bits +-1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        bits = t.contiguous().view(torch.int16).clone()
        moved = torch.rand(bits.shape, generator=g) < fraction
        step = torch.where(torch.rand(bits.shape, generator=g) < 0.5, 1, -1).to(torch.int16)
        out[name] = (bits + step * moved).view(torch.bfloat16)
    return out


def write_versions(model_dir: Path, policy: Path, fraction: float, shard_mb: float) -> float:
    """v0 (the model in bf16), v1 (a delta) and v2 (v0 again) under `policy`; returns v1's changed fraction."""
    from safetensors.torch import load_file

    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    write_base(policy, model_dir)
    layout = [TensorSpec(k, tuple(t.shape), torch.bfloat16) for k, t in state.items()]
    writer = PolicyWriter(policy, layout, shard_bytes=int(shard_mb * 2**20), fmt="delta")
    writer.write(0, state.items())
    changed = writer.write(1, one_ulp_steps(state, fraction).items()).changed_fraction
    writer.write(2, state.items())
    return changed


def full_load(engine, policy: Path, v0: Path, work: Path) -> dict[str, float]:
    manifest, base = read_manifest(policy, 1), read_manifest(policy, 0)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for f in delta_files(manifest):  # what the worker downloaded (not timed)
        shutil.copy(version_dir(policy, 1) / f.name, work / f.name)
    start = time.perf_counter()
    rebuild_from_deltas(manifest, base, v0, work)
    rebuilt = time.perf_counter()
    engine.load_weights([work / f.name for f in manifest.full_shards()])
    end = time.perf_counter()
    return {"rebuild_s": rebuilt - start, "reload_s": end - rebuilt, "total_s": end - start}


def delta_of(policy: Path, version: int) -> tuple[list[bytes], ChangeHashes]:
    manifest = read_manifest(policy, version)
    deltas = [(version_dir(policy, version) / f.name).read_bytes() for f in delta_files(manifest)]
    return deltas, ChangeHashes(manifest.tensor_sha256, manifest.changes_sha256)


def _set_vllm_path(wrapper, reload: bool) -> None:
    """Run in vLLM's worker process (`wrapper`: vLLM's wrapper of the worker that holds the extension's
    state): deltas through a host copy and vLLM's reload (`reload`), or written in place (mapped again,
    and checked, at the next apply)."""
    worker = wrapper.worker
    if reload:
        worker.scatter_rl_maps = False
    else:
        worker.__dict__.pop("scatter_rl_maps", None)


def in_place(engine, policy: Path, verify: str) -> dict[str, float]:
    engine.apply_delta(*delta_of(policy, 1))  # what a worker following deltas holds (not timed)
    engine.apply_delta(*delta_of(policy, 2))
    deltas, hashes = delta_of(policy, 1)
    start = time.perf_counter()
    applied = engine.apply_delta(deltas, hashes, verify=verify)
    return {"total_s": time.perf_counter() - start, "hash_s": applied.hash_seconds, "elements": applied.elements}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or HF directory")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--fraction", type=float, default=0.014, help="elements changed per version")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mb", type=float, default=2048.0, help="weights.shard_mb (the default)")
    args = parser.parse_args()

    model_dir = Path(resolve_model(args.model))
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        tmp = Path(tmp)
        policy = tmp / "policy"
        changed = write_versions(model_dir, policy, args.fraction, args.shard_mb)
        v0 = export_version(policy, 0, tmp / "v0")
        shards_v0 = [v0 / f.name for f in read_manifest(policy, 0).full_shards()]
        engine = make_engine(EngineSpec(kind=args.engine), v0, max_model_len=512, dtype="bfloat16")
        rows = []
        methods = ["full", "changes", "tensors"] + (["reload"] if args.engine == "vllm" else [])
        for r in range(args.repeats):
            row = {}
            rotation = r % len(methods)
            for method in methods[rotation:] + methods[:rotation]:  # each first in turn
                if args.engine == "vllm":
                    engine.llm.collective_rpc(_set_vllm_path, args=(method == "reload",))
                engine.load_weights(shards_v0)  # back to v0 (not timed)
                if method == "full":
                    row[method] = full_load(engine, policy, v0, tmp / "v1")
                else:
                    row[method] = in_place(engine, policy, "changes" if method == "reload" else method)
            for method in methods[1:]:
                row[f"ratio_{method}"] = row[method]["total_s"] / row["full"]["total_s"]
            rows.append(row)
            print(json.dumps({"repeat": r, **row}), flush=True)
        engine.close()

    def spread_of(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    def spread(key: str, part: str = "total_s") -> str:
        return spread_of([row[key][part] if part else row[key] for row in rows])

    print(json.dumps({
        "model": args.model, "engine": args.engine, "changed_fraction": changed, "repeats": args.repeats,
        "full_s": spread("full"), "full_rebuild_s": spread("full", "rebuild_s"),
        "full_reload_s": spread("full", "reload_s"),
        "changes_s": spread("changes"), "changes_hash_s": spread("changes", "hash_s"),
        "tensors_s": spread("tensors"), "tensors_hash_s": spread("tensors", "hash_s"),
        "ratio_changes": spread("ratio_changes", ""), "ratio_tensors": spread("ratio_tensors", ""),
        **({"reload_s": spread("reload"), "ratio_reload": spread("ratio_reload", ""),
            "changes_vs_reload": spread_of([r["changes"]["total_s"] / r["reload"]["total_s"] for r in rows])}
           if "reload" in rows[0] else {}),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
