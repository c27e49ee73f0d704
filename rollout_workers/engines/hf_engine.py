"""Plain transformers generation engine: the fallback when vLLM is not available.

`model.generate` samples `n` rows per prompt; one `step()` generates the oldest waiting prompt together
with the waiting prompts of the same sampling and room (up to `BATCH_ROWS` rows), left-padded to one
length (the model's position ids follow the attention mask, so padding changes nothing but rounding);
each prompt is prefilled once and its cache repeated for its n rows, as vLLM's prefix cache shares it.
Each sampled token's logprob is log_softmax of the *unprocessed* logits (`output_logits=True`): the raw
model distribution at temperature 1, before top-k/top-p, exactly what vLLM returns with `logprobs=0`.
Slower than vLLM (no continuous batching: a step runs until its longest row ends), but the same
contract. Seeded completions decode greedily through `SeededDraw`, which leaves only the seeded draw finite.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Hashable
from pathlib import Path

import torch

from rl.sampling import SamplingRule, draws, seed_tensor, uniforms
from rl.weights.files import ChangeHashes
from rl.weights.inplace import Applied, Verify
from rl.wire.protocol import Completion, SamplingParamsWire
from rollout_workers.engines import Engine, EngineSpec, sampling_rule

log = logging.getLogger(__name__)

BATCH_ROWS = {"cpu": 64, "cuda": 256}
"""Most rows (prompts x n) one `step()` generates together, by device type."""
LOGITS_BUDGET = {"cpu": 2 << 30, "cuda": 16 << 30}
"""Bytes a step's kept logits may take (`output_logits`: rows x tokens x vocabulary, ~10 bytes an element with
the float32 copy and the log-softmax); fewer rows per step where long completions and a large vocabulary need
it, never fewer than one prompt's n."""


class HFEngine(Engine):
    name = "hf"
    applies_deltas = True  # the model's parameters are the shards' tensors, same names and dtype

    def __init__(self, spec: EngineSpec, model_dir: Path, *, max_model_len: int, dtype: str) -> None:
        super().__init__(spec, model_dir, max_model_len=max_model_len, dtype=dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        seed = spec.seed
        if spec.tensor_parallel != 1:
            log.warning("the hf engine ignores tensor_parallel=%d (runs on one device)", spec.tensor_parallel)
        start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.generator_seed = seed
        self.queue: deque[tuple[Hashable, list[int], SamplingParamsWire, list[int] | None]] = deque()
        self.batch_rows = BATCH_ROWS.get(self.device.type, 64)
        self.share_prefill = True
        """Prefill each prompt once for its n rows (False: every row computes its prompt, as before; benchmarks)."""
        torch.manual_seed(seed)
        log.info("hf engine ready in %.1f s (%s, %s)", time.perf_counter() - start, self.device, dtype)

    def add(
        self, key: Hashable, prompt: list[int], sampling: SamplingParamsWire, seeds: list[int] | None = None
    ) -> bool:
        self.check_seeds(seeds, sampling)
        if self.room_for(prompt, sampling.max_tokens) == 0:
            log.warning("prompt of %d tokens leaves no room under max_model_len; skipped", len(prompt))
            return False
        self.queue.append((key, prompt, sampling, seeds))
        return True

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, list[Completion]]]:
        """Generate the oldest waiting prompt and, in the same batch, the waiting prompts that share its
        sampling, its room under max_model_len and whether they are seeded (up to `BATCH_ROWS` rows)."""
        if not self.queue:
            return []
        key, prompt, sampling, seeds = self.queue.popleft()
        room, batch, others = self.room_for(prompt, sampling.max_tokens), [(key, prompt, seeds)], deque()
        rows, most = sampling.n, self.rows_for(room)
        while self.queue:
            item = self.queue.popleft()
            k, p, s, sd = item
            fits = rows + s.n <= most and s == sampling and (sd is None) == (seeds is None)
            if fits and self.room_for(p, s.max_tokens) == room:
                batch.append((k, p, sd))
                rows += s.n
            else:
                others.append(item)
        self.queue = others
        seed_lists = None if seeds is None else [sd for *_, sd in batch]
        outputs = self._generate([p for _, p, _ in batch], sampling, seed_lists)
        return [(k, out) for (k, _, _), out in zip(batch, outputs, strict=True)]

    def rows_for(self, room: int) -> int:
        """Rows one step may generate with completions of up to `room` tokens (`BATCH_ROWS`, `LOGITS_BUDGET`)."""
        per_row = 10 * max(room, 1) * self.model.config.get_text_config().vocab_size
        return min(self.batch_rows, LOGITS_BUDGET.get(self.device.type, 2 << 30) // per_row)

    def concurrency(self, n: int) -> int:
        return max(1, self.batch_rows // max(1, n))

    @property
    def pending(self) -> int:
        return len(self.queue)

    def abort_all(self) -> None:
        self.queue.clear()

    def abort(self, keys: Collection[Hashable]) -> int:
        keys = set(keys)
        kept = deque(item for item in self.queue if item[0] not in keys)
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        return dropped

    def _generate(
        self, prompts: list[list[int]], sampling: SamplingParamsWire, seeds: list[list[int]] | None
    ) -> list[list[Completion]]:
        """`sampling.n` completions of each prompt (all with the same room under max_model_len), in one batch."""
        from transformers import GenerationConfig, LogitsProcessorList

        room = self.room_for(prompts[0], sampling.max_tokens)
        stop_ids = sorted(set(self.eos_ids) | set(sampling.stop_token_ids))
        # Seeded: the processor leaves one finite logit per row, so greedy decoding takes the draw.
        greedy = sampling.temperature <= 0.0 or seeds is not None
        # A fresh config: the model's generation_config.json defaults (top_k=50,
        # repetition penalties, ...) must not leak in; vLLM ignores them too.
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=0 if sampling.top_k <= 0 or greedy else sampling.top_k,
            max_new_tokens=room,
            eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop_ids[0],
            stop_strings=list(sampling.stop) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        width = max(len(p) for p in prompts)  # left padding: every row's generated tokens line up
        rows = [p for p in prompts for _ in range(sampling.n)]
        pad = config.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], dtype=torch.long,
                            device=self.device)  # fmt: skip
        kwargs = {"tokenizer": self.tokenizer} if sampling.stop else {}
        if seeds is not None:
            draw = SeededDraw(sampling_rule(sampling), [s for ss in seeds for s in ss], width)
            kwargs["logits_processor"] = LogitsProcessorList([draw])
        if self.share_prefill and sampling.n > 1 and width > 1:  # n rows share a prompt's prefill (as in vLLM)
            kwargs["past_key_values"] = self._shared_prefill(input_ids[:: sampling.n], mask[:: sampling.n], sampling.n)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, **kwargs)
        new = out.sequences[:, width:].tolist()
        logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab), raw
        logprobs = torch.log_softmax(logits, dim=-1)
        completions = []
        for row, tokens in enumerate(new):
            length, finish = self._finished_length(tokens, set(stop_ids), sampling.stop, room)
            tokens = tokens[:length]
            lp = logprobs[row, torch.arange(length), torch.tensor(tokens, dtype=torch.long)]
            completions.append(Completion(token_ids=tokens, logprobs=lp.tolist(), finish_reason=finish))
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _shared_prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, n: int):
        """The KV cache of every prompt but its last token, computed once per prompt and repeated for its n
        rows; `generate` computes the last token's logits from it. Positions follow the mask (left padding)."""
        positions = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions,
                         use_cache=True)  # fmt: skip
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        return cache

    def _finished_length(
        self, tokens: list[int], stop_ids: set[int], stop_strings: list[str], room: int
    ) -> tuple[int, str]:
        """Where a row really ended (HF pads finished rows) and why; stop tokens are kept, like vLLM."""
        end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), None)
        if stop_strings:
            for k in range(1, (end or len(tokens)) + 1):
                text = self.tokenizer.decode(tokens[:k], skip_special_tokens=True)
                if any(s in text for s in stop_strings):
                    return k, "stop"
        if end is not None:
            return end, "stop"
        return min(len(tokens), room), "length"

    def load_weights(self, shards: list[Path]) -> None:
        from safetensors.torch import load_file

        start = time.perf_counter()
        state = {}
        for path in shards:
            state.update(load_file(str(path), device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.startswith("lm_head.")]
        if missing or unexpected:
            raise ValueError(
                f"{len(shards)} shard(s) from {Path(shards[0]).parent} do not fit the model: "
                f"missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        log.info("reloaded %d shard(s) in %.2f s", len(shards), time.perf_counter() - start)

    def apply_delta(self, deltas: list[bytes], hashes: ChangeHashes, verify: Verify = "changes") -> Applied:
        from rl.weights.inplace import apply_in_place

        if self.queue:
            raise RuntimeError(f"apply_delta() needs an idle engine; {len(self.queue)} prompt(s) queued")
        # state_dict(): checkpoint names -> tensors sharing the parameters' storage (tied ones once per name)
        applied = apply_in_place(self.model.state_dict(), deltas, hashes, verify)
        log.info("applied %d changed element(s) of %d tensor(s) in place in %.2f s (%.2f s hashing)",
                 applied.elements, applied.tensors, applied.seconds, applied.hash_seconds)  # fmt: skip
        return applied

    def close(self) -> None:
        self.model = None


class SeededDraw:
    """HF logits processor: row j keeps only `draw(logits, rule, uniform(seeds[j], position))` finite.

    `scores` are the raw logits (float32); `position` counts the tokens generated after the prompt.
    """

    def __init__(self, rule: SamplingRule, seeds: list[int], prompt_len: int) -> None:
        self.rule = rule
        self.seeds = seed_tensor(seeds)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = torch.full_like(self.seeds, input_ids.shape[1] - self.prompt_len)
        tokens = draws(scores, self.rule, uniforms(self.seeds, position)).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, tokens.unsqueeze(-1), 0.0)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise ValueError("the model has no eos token id (generation_config or tokenizer)")
    return ids
