"""Generation engines: one interface, two implementations (vLLM, plain transformers).

An engine holds one policy in memory, samples `n` completions per prompt with
the per-token logprob of every sampled token, and swaps its weights in place
between generation batches (`load_weights`). Both engines report logprobs of the
*raw* model distribution (log_softmax of the unscaled logits, i.e. temperature
1, before top-k/top-p), which is what vLLM returns by default and what the
trainer recomputes; the importance weights in the loss rely on that.

`make_engine("vllm" | "hf", ...)` picks one; the heavy imports (vllm,
transformers) happen only when an engine is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from rl.protocol import Completion, SamplingParamsWire

__all__ = ["Completion", "Engine", "EngineKind", "make_engine"]

EngineKind = Literal["vllm", "hf"]


class Engine(ABC):
    """A policy loaded for sampling; not thread-safe (one generate/load at a time)."""

    name: str = "engine"

    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int,
        dtype: str,
        tensor_parallel: int = 1,
        seed: int = 0,
        kv_cache_gib: float = 1.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.tensor_parallel = tensor_parallel
        self.seed = seed
        self.kv_cache_gib = kv_cache_gib

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParamsWire) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt (same order as `prompts`).

        A completion never exceeds `sampling.max_tokens`, nor `max_model_len` in
        total with its prompt; a prompt that leaves no room gets an empty list.
        """

    @abstractmethod
    def load_weights(self, shards: list[Path]) -> None:
        """Replace the weights in place from the safetensors shards of a full version (same architecture)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's memory and processes."""

    def room_for(self, prompt: list[int], max_tokens: int) -> int:
        """Tokens a completion of `prompt` may have: max_tokens, capped by max_model_len."""
        return max(0, min(max_tokens, self.max_model_len - len(prompt)))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_engine(
    kind: EngineKind,
    model_dir: Path,
    *,
    max_model_len: int,
    dtype: str,
    tensor_parallel: int = 1,
    seed: int = 0,
    kv_cache_gib: float = 1.0,
) -> Engine:
    """Build the engine named `kind` ("vllm" or "hf") for the HF directory `model_dir`."""
    kwargs = dict(
        max_model_len=max_model_len,
        dtype=dtype,
        tensor_parallel=tensor_parallel,
        seed=seed,
        kv_cache_gib=kv_cache_gib,
    )
    if kind == "vllm":
        from rollout_workers.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, **kwargs)
    if kind == "hf":
        from rollout_workers.engines.hf_engine import HFEngine

        return HFEngine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; expected 'vllm' or 'hf'")
