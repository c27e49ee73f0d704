"""vLLM V1 logits processor for verifiable sampling: a seeded request samples only its seeded draw.

Loaded by `LLM(logits_processors=[PROCESSOR])` in every engine process. A request opts in
through `SamplingParams.extra_args` (`seeded_args`): its seed and the task's sampling rule
(the wire values, so the draw uses exactly what the trainer checks against). Before every
sampling step the processor replaces each seeded row of the float32 logits by a row that is
-inf except at `rl.sampling.draw(row, rule, uniform(seed, position))`, position = tokens the
request has generated so far; vLLM's own temperature/top-k/top-p/greedy then can only pick
that token. It is not argmax-invariant, so vLLM runs it before greedy sampling and after
it computed the returned logprobs (`logprobs_mode="raw_logprobs"`): those stay the raw
distribution's. Requests without the extra args are untouched.

One seed per request: vLLM expands n > 1 into children that share the parent's extra_args,
so the engine sends seeded completions as n requests of n = 1.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rl.sampling import SamplingRule, draws, seed_tensor, uniforms

PROCESSOR = "rollout_workers.engines.vllm_seeded:SeededDrawProcessor"
SEED_ARG = "scatter_seed"
RULE_ARG = "scatter_rule"


def seeded_args(seed: int, rule: SamplingRule) -> dict:
    """`SamplingParams.extra_args` of a request whose completion is the seeded draw of `seed`."""
    return {SEED_ARG: seed, RULE_ARG: [rule.temperature, rule.top_k, rule.top_p]}


class SeededDrawProcessor(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[int, SamplingRule, list[int]]] = {}
        """Batch index -> (seed, rule, the request's output token ids: a live reference, its length is the position)."""

    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token, greedy or not

    @staticmethod
    def _state(params, _prompt_ids, output_ids: list[int]) -> tuple[int, SamplingRule, list[int]] | None:
        args = params.extra_args or {}
        if SEED_ARG not in args:
            return None
        temperature, top_k, top_p = args[RULE_ARG]
        return int(args[SEED_ARG]), SamplingRule(float(temperature), int(top_k), float(top_p)), output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        by_rule: dict[SamplingRule, list[int]] = defaultdict(list)
        for index, (_, rule, _) in self.rows.items():
            by_rule[rule].append(index)
        for rule, indices in by_rule.items():
            seeds = seed_tensor([self.rows[i][0] for i in indices])
            positions = torch.tensor([len(self.rows[i][2]) for i in indices], dtype=torch.int64)
            rows = torch.tensor(indices, dtype=torch.int64, device=logits.device)
            tokens = draws(logits[rows], rule, uniforms(seeds, positions)).to(logits.device)
            logits[rows] = float("-inf")
            logits[rows, tokens] = 0.0
        return logits
