"""DeepSpeed behind one class: the trainer's only door to the model and optimizer.

`DeepSpeedStrategy` owns model loading, the DeepSpeed engine (ZeRO 0-3, CPU/gloo or
GPU/NCCL), per-token log-probs, backward, optimizer step, full-weight gathering for
publication, and checkpoints; the loop never imports `deepspeed` (OpenRLHF's shape).
Two contracts the loop relies on:

- Loss normalisation is the caller's: the losses passed to `backward()` on all micro-batches
  of all ranks sum to the batch loss; no gradient-accumulation scaling happens.
- Collectives are symmetric: every rank calls `backward()` (ZeRO-2/3) and `token_logprobs`
  with grad (ZeRO-3) as often as the others; `step`, `gather_state_dict`, `save_*`,
  `load_checkpoint`, `broadcast_object` and `barrier` are called by all ranks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rl.config import ModelConfig, TrainerConfig
from rl.deepspeed_config import build_deepspeed_config, offloads_optimizer, reference_config, warmup_then_constant
from rl.models import resolve_model
from rl.trainer.distributed import init_distributed, launched
from rl.trainer.grad_scale import plain_gradients, scaled_step, scales_by_loss_scale
from rl.trainer.lora import apply_lora
from rl.trainer.packing import (
    StatsRequest,
    pack,
    packed_logprobs,
    packed_stats_hook,
    padded_logprobs,
    padded_stats_hook,
)
from rl.trainer.packing import selected_logprobs as selected_logprobs  # re-exported: tests and the planner use it here
from rl.weights.lora import hf_name, is_adapter, merge_stream, merged_names
from rl.wire.waits import pending

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"
"""Subdirectory of a checkpoint directory that holds the DeepSpeed state."""
_CLIENT_KEY = "scatter_rl_client_state"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GATHER_BUDGET = 256 * 2**20
"""Bytes of full (ZeRO-3) parameters materialised at once while gathering."""


# --------------------------------------------------------------------------- the strategy


class DeepSpeedStrategy:
    """A policy (and optional frozen reference) model trained by a DeepSpeed engine.

    Attributes: `rank`, `world_size`, `is_main` (rank 0), `device`, `engine`
    (the DeepSpeed engine), `zero_stage`, `ds_config` (the resolved config).
    """

    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, *, with_reference: bool = False):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers import set_seed

        self.model_cfg = model_cfg
        self.trainer_cfg = trainer_cfg
        torch.set_num_threads(trainer_cfg.threads)
        self._launched = launched()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            # Before the process group: NCCL's barriers and communicators use the current device.
            accel.set_device(local_rank)
        init_distributed(trainer_cfg.collective_timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(accel.device_name(local_rank))
        set_seed(trainer_cfg.seed)

        self.ds_config = build_deepspeed_config(model_cfg, trainer_cfg, world_size=self.world_size)
        self.zero_stage: int = self.ds_config["zero_optimization"]["stage"]
        self.model_path = resolve_model(model_cfg.name)
        model = self._load_model()
        self.lora = trainer_cfg.lora
        if self.lora is not None:  # only the adapters train; the optimizer below sees only them
            model = apply_lora(model, self.lora)
            if trainer_cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
        if trainer_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref_model = self._load_model() if with_reference else None

        optimizer = self._make_optimizer(model)
        self._client_optimizer = optimizer
        if self.zero_stage == 0 and model_cfg.dtype == "float32":
            # DeepSpeed clips plain fp32 ZeRO-0 gradients but discards the norm:
            # clip here instead (gradients are all-reduced by then) and keep it.
            self.ds_config["gradient_clipping"] = 0.0
            optimizer.register_step_pre_hook(self._clip_before_step)
        # Built on the client optimizer: the ZeRO wrappers share its param_groups.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(trainer_cfg.warmup_steps))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.engine.train()
        self.ref_engine = None
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()
            if self.zero_stage == 3:
                self.ref_engine, *_ = deepspeed.initialize(model=ref_model, config=reference_config(self.ds_config))
                self.ref_engine.eval()
            else:
                self.ref_engine = ref_model.to(self.device)
        self.kept: dict[int, list[Tensor]] = {}
        """Version -> trainable weights kept for checks of older groups (`keep_version`)."""
        self._backward_calls = 0
        self._last_norm: float | None = None
        self.packing = True
        """Padding-free tree-packed forwards (rl/trainer/packing.py); False: the padded fallback."""
        if (problem := self.packing_problem()) is not None:
            log.warning("this model cannot be tree-packed (%s): padded forwards, no prompt sharing", problem)
            self.packing = False
        log.info(
            "DeepSpeed ZeRO-%d engine on %s: rank %d/%d, %s, model %s%s",
            self.zero_stage,
            self.device,
            self.rank,
            self.world_size,
            model_cfg.dtype,
            self.model_path,
            " + frozen reference" if ref_model is not None else "",
        )

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters: DeepSpeed's CPU Adam under optimizer offload, else torch's."""
        params = [p for p in model.parameters() if p.requires_grad]
        hyper = dict(lr=self.trainer_cfg.lr, betas=self.trainer_cfg.betas, weight_decay=self.trainer_cfg.weight_decay)
        if offloads_optimizer(self.ds_config):
            # ZeRO-Offload steps the fp32 master copy on the CPU and accepts only DeepSpeed's own CPU
            # Adam there (a C++ op, JIT-built into TORCH_EXTENSIONS_DIR on first use, ~1 min).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
        # One fused kernel over all parameters: ~2x faster than the per-tensor loop on CPU.
        return torch.optim.AdamW(params, fused=self.device.type in ("cpu", "cuda"), **hyper)

    def _load_model(self) -> torch.nn.Module:
        """HF causal LM in the configured dtype; under ZeRO-3 partitioned while loading (zero.Init)."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        # transformers consults a global weak reference: keep the object alive
        # only while loading, or every later from_pretrained in this process
        # would also be partitioned.
        hf_ds_config = HfDeepSpeedConfig(self.ds_config) if self.zero_stage == 3 else None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.model_path,
                dtype=_DTYPES[self.model_cfg.dtype],
                trust_remote_code=self.model_cfg.trust_remote_code,
            )
        finally:
            del hf_ds_config
        return model

    @property
    def module(self) -> torch.nn.Module:
        """The policy's HF module (partitioned parameters under ZeRO-3)."""
        return self.engine.module

    # ----------------------------------------------------------------------- forward

    def token_logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        prompt_lengths: Tensor | None = None,
        reference: bool = False,
        with_entropy: bool = False,
        temperature: float = 1.0,
        stats: StatsRequest | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """log p(input_ids[:, t] | input_ids[:, <t]) for right-padded [B, T] inputs -> fp32 [B, T].

        Position 0 and padding positions are 0. Logits are divided by
        `temperature` (use the sampling temperature). The entropy [B, T] is
        computed without grad (for logging). Rows are processed in chunks of
        `trainer.micro_batch_size`, each one padding-free forward (rl/trainer/packing.py:
        the chunk tree-packed into one row, the lm_head a chunk of positions at
        a time). `reference=True` uses the frozen reference model under no_grad.
        For training, call it once per micro-batch and `backward()` that
        micro-batch's loss (chunks share one graph).

        `prompt_lengths` [B] (each >= 1) turns on prompt sharing: the rows of a
        chunk that start with the same prompt (a GRPO group) carry that prompt
        once, so it costs ~1/group_size of the compute; log-probs are then
        returned for completion positions (t >= prompt_lengths) only, 0 at
        prompt positions. Same log-probs and gradients (to rounding;
        tests/trainer/test_packing.py).

        `stats` (a `StatsRequest`) also fills per-token statistics from the same logits, so a check
        needs no forward of its own (one forward per sequence per step).
        """
        if reference and self.ref_engine is None:
            raise RuntimeError("token_logprobs(reference=True) needs DeepSpeedStrategy(with_reference=True)")
        model = self.ref_engine if reference else self.engine
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        batch, length = input_ids.shape
        if prompt_lengths is None:
            prefix = torch.ones(batch, dtype=torch.long)
        else:
            prefix = prompt_lengths.cpu()
            if batch and int(prefix.min()) < 1:
                raise ValueError("prompt sharing needs prompts of at least 1 token")
        decoder, lm_head = self._head(model) if self.packing else (None, None)
        chunk = self.trainer_cfg.micro_batch_size
        n_chunks = self._agree_on_chunks(math.ceil(batch / chunk), no_grad=reference or not torch.is_grad_enabled())
        logps, ents = [], []
        with torch.no_grad() if reference else nullcontext():
            for i in range(n_chunks):
                rows = slice(i * chunk, (i + 1) * chunk)
                ids, mask = input_ids[rows], attention_mask[rows]
                if ids.shape[0] == 0:  # this rank ran out of rows: ZeRO-3 forwards to match its peers
                    self._dummy_forward(model)
                    continue
                if self.packing:
                    packed = pack(ids, mask, prefix[rows])
                    hook = None if stats is None else packed_stats_hook(stats, rows, packed)
                    logp, ent = packed_logprobs(model, packed, dtype=_DTYPES[self.model_cfg.dtype], decoder=decoder,
                                                lm_head=lm_head, temperature=temperature,
                                                with_entropy=with_entropy, on_logits=hook)  # fmt: skip
                    shape = (ids.shape[0], length)
                    logp, ent = packed.scatter(logp, shape), None if ent is None else packed.scatter(ent, shape)
                else:
                    hook = None if stats is None else padded_stats_hook(stats, rows, ids, mask)
                    logp, ent = padded_logprobs(model, ids, mask, length, temperature, with_entropy, hook)
                logps.append(logp)
                if ent is not None:
                    ents.append(ent)
        logp = torch.cat(logps) if logps else input_ids.new_zeros(batch, length, dtype=torch.float32)
        entropy = None
        if with_entropy:
            entropy = torch.cat(ents) if ents else torch.zeros_like(logp)
        return logp, entropy

    def _head(self, model: Any) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """The decoder and lm_head that chunked log-probs call apart (None, None: the head runs inside the
        forward). ZeRO-3 keeps the head inside: there every module call is a gather, collective over ranks."""
        if self.zero_stage == 3:
            return None, None
        module = getattr(model, "module", model)  # the engine's HF (or peft) model
        return module.get_decoder(), module.get_output_embeddings()

    def _dummy_forward(self, model: Any) -> None:
        dummy = torch.ones(1, 2, dtype=torch.long, device=self.device)
        model(input_ids=dummy, attention_mask=dummy, use_cache=False)

    def token_statistics(
        self, input_ids: Tensor, attention_mask: Tensor, fn, width: int, prompt_lengths: Tensor | None = None,
        u: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """No-grad forward of the policy with a `StatsRequest` of `fn` -> [B, T, width] (see `token_logprobs`).

        For checks that need more of the logits than the picked token's logprob, in a forward of their
        own (rows of older versions under `weights_of`, or `trust.shared_forward: false`).
        """
        out = torch.zeros(*input_ids.shape, width, dtype=torch.float32, device=self.device)
        request = StatsRequest(fn, out, None if u is None else u.to(self.device))
        with torch.no_grad():
            self.token_logprobs(input_ids, attention_mask, prompt_lengths=prompt_lengths, stats=request)
        return out

    def packing_problem(self) -> str | None:
        """Why this model cannot be tree-packed (None: it can), from a tiny probe run on every rank.

        Refused up front: sliding-window attention shorter than `model.max_model_len` (a custom
        4D mask replaces the window, which a short probe cannot show) and logit soft-capping or
        scaling (applied by the model's forward, not by its lm_head). Then packed and padded
        log-probs of two rows with one prompt are compared, so a model whose forward rejects a
        4D mask, position ids or `logits_to_keep` is found at start-up rather than mid-run.
        """
        config = self.module.config
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in layer_types if layer_types else window is not None
        if sliding and window is not None and window < self.model_cfg.max_model_len:
            return f"sliding-window attention ({window} tokens) shorter than model.max_model_len"
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                return f"config.{name} is set (the forward transforms the lm_head's logits)"
        vocab = int(config.vocab_size)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (6,), generator=g)
        ids = torch.stack([torch.cat([prompt, torch.randint(0, vocab, (3,), generator=g)]) for _ in range(2)])
        mask = torch.ones_like(ids)
        mask[1, -1] = 0
        lengths = torch.full((2,), 6)
        packing = self.packing
        try:
            with torch.no_grad():
                self.packing = False
                plain, _ = self.token_logprobs(ids, mask)
                self.packing = True
                packed, _ = self.token_logprobs(ids, mask, prompt_lengths=lengths)
        except Exception as e:  # noqa: BLE001 - any failure means: do not pack
            return f"{type(e).__name__}: {e}"
        finally:
            self.packing = packing
        gap = float((plain[:, 6:] - packed[:, 6:]).abs().mean())
        tolerance = 1e-3 if self.model_cfg.dtype == "float32" else 0.05
        return None if gap <= tolerance else f"packed log-probs differ from padded ones by {gap:.3g} on average"

    def _agree_on_chunks(self, n_chunks: int, no_grad: bool) -> int:
        """Under multi-rank ZeRO-3 every forward is a collective: run as many as the busiest rank."""
        if self.zero_stage != 3 or self.world_size == 1 or not no_grad:
            return n_chunks
        count = torch.tensor([n_chunks], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    # ----------------------------------------------------------------------- optimisation

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of `loss` (already normalised for the global batch; never rescaled).

        DeepSpeed's `managed_gradient_accumulation: false` makes `step()` the only accumulation
        boundary, so the number of micro-batches may change from step to step.
        """
        # DeepSpeed averages gradients over ranks; the caller's losses sum over ranks.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self._backward_calls += 1

    def keep_version(self, version: int, limit: int) -> None:
        """Keep a copy of the trainable weights as they are now as `version` (for `weights_of`), and only the
        last `limit` versions; nothing under ZeRO-3, whose parameters are partitioned across ranks."""
        if self.zero_stage != 3 and limit > 0:
            self.kept[version] = [p.detach().clone() for p in self._trainable()]
        while len(self.kept) > limit:
            del self.kept[min(self.kept)]

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    @contextmanager
    def weights_of(self, version: int) -> Iterator[None]:
        """Forwards inside run with the kept weights of `version`; the current ones are restored exactly after."""
        params, snapshot = self._trainable(), self.kept[version]
        current = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, old in zip(params, snapshot, strict=True):
                    p.copy_(old)
            yield
        finally:
            with torch.no_grad():
                for p, now in zip(params, current, strict=True):
                    p.copy_(now)

    @property
    def can_scale_gradients(self) -> bool:
        """Whether `step(grad_scale=...)` is supported: every engine but fp16's (a dynamic loss scale)."""
        return self._plain_gradients() is not None or scales_by_loss_scale(self.engine.optimizer, self.model_cfg.dtype)

    def _plain_gradients(self) -> list[Tensor] | None:
        return plain_gradients(self.engine.optimizer, self._client_optimizer, self.model_cfg.dtype, self._trainable)

    def step(self, grad_scale: float = 1.0) -> dict[str, float]:
        """Clip, apply AdamW and advance the LR schedule; returns the pre-clip grad norm and the LR used.

        `grad_scale` multiplies the gradients accumulated since the last step first (as if every loss passed
        to `backward` had been multiplied by it): the trainer learns a normaliser only after the backwards
        (rl/trainer/verify.py). Needs `can_scale_gradients` unless it is 1.
        """
        if self._backward_calls == 0:
            raise RuntimeError("step() without a backward() since the last step")
        lr = float(self.engine.get_lr()[0])
        opt = self.engine.optimizer
        gradients = self._plain_gradients() if grad_scale != 1.0 else None
        if grad_scale != 1.0 and gradients is None and not scales_by_loss_scale(opt, self.model_cfg.dtype):
            raise RuntimeError(f"this engine's optimizer ({type(opt).__name__}) cannot scale gradients")
        scaled_step(self.engine, gradients, grad_scale)
        self._backward_calls = 0
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # plain fp32 ZeRO-0: measured by _clip_before_step
            norm = self._last_norm
        return {"grad_norm": float(norm) if norm is not None else math.nan, "lr": lr}

    def _clip_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._last_norm = float(torch.nn.utils.clip_grad_norm_(params, self.trainer_cfg.grad_clip))

    # ----------------------------------------------------------------------- weights

    @contextmanager
    def _full_parameters(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def gather_state_dict(self) -> dict[str, Tensor] | None:
        """Full HF-named weights (CPU tensors, training dtype) on rank 0, None elsewhere; all ranks call.

        Keys are those `save_pretrained` writes: a tied parameter (lm_head tied to
        the embeddings) appears once, under its first name.
        """
        out = dict(self.iter_state_dict())
        if not self.is_main:
            return None
        return {name: out[name] for name in self._state_names()}

    @property
    def _lora_scaling(self) -> float:
        return self.lora.alpha / self.lora.r

    def gather_adapter_state(self) -> dict[str, Tensor] | None:
        """LoRA: what trains (`<module>.lora_A/B`, saved modules under their names; CPU fp32) on rank 0,
        None elsewhere; all ranks call."""
        if self.lora is None:
            raise RuntimeError("gather_adapter_state needs trainer.lora")
        trained = [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]
        out: dict[str, Tensor] = {}
        with self._full_parameters([p for _, p in trained]):
            if self.is_main:
                for name, p in trained:
                    plain = hf_name(name)
                    key = plain.removesuffix(".weight") if is_adapter(plain) else plain
                    out[key] = p.data.detach().to("cpu", torch.float32, copy=True)
        return out if self.is_main else None

    def _state_names(self) -> list[str]:
        """state_dict names, a tied parameter once (under its first name); with LoRA the merged model's."""
        names = self._raw_state_names()
        return merged_names(names) if self.lora is not None else names

    def _raw_state_names(self) -> list[str]:
        """The module's own state_dict names (adapters and wrapped originals under LoRA), tied ones once."""
        module = self.module
        params = dict(module.named_parameters())
        tied = {name for name, _ in module.named_parameters(remove_duplicate=False)} - set(params)
        return [name for name in module.state_dict(keep_vars=True) if name not in tied]

    def weight_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, full shape) of every tensor `iter_state_dict` yields, in its order; any rank, no collective."""
        params = dict(self.module.named_parameters())
        out = [(name, tuple(getattr(p, "ds_shape", None) or p.shape)) for name, p in params.items()]
        state = self.module.state_dict(keep_vars=True)
        if self.lora is not None:  # the merged model's tensors: adapters and frozen originals left out
            shapes = dict(out) | {n: tuple(state[n].shape) for n in self._raw_state_names() if n not in params}
            keep = set(merged_names(shapes))
            out = [(n, shapes[p]) for p in shapes if (n := hf_name(p.replace(".original_module.", "."))) in keep
                   and not is_adapter(hf_name(p)) and ".original_module." not in p]  # fmt: skip
            return list(dict(out).items())
        out += [(name, tuple(state[name].shape)) for name in self._state_names() if name not in params]
        return out

    def iter_state_dict(self, budget_bytes: int = _GATHER_BUDGET) -> Iterator[tuple[str, Tensor]]:
        """See `_iter_gathered`; with LoRA the adapters are merged in as the tensors stream by (rl/weights/lora.py)."""
        items = self._iter_gathered(budget_bytes)
        return merge_stream(items, self._lora_scaling) if self.lora is not None else items

    def _iter_gathered(self, budget_bytes: int = _GATHER_BUDGET) -> Iterator[tuple[str, Tensor]]:
        """Rank 0: (name, CPU copy in the training dtype) of every weight, in `weight_layout` order.

        Under ZeRO-3 the parameters are gathered about `budget_bytes` at a time and each group is
        released before the next, so a consumer that writes tensors as they come (rl/weights/files.py)
        holds about one group, not the model. Every rank must run the iterator to its end (the
        gathers are collectives); the other ranks get nothing from it.
        """
        params = dict(self.module.named_parameters())  # one name per shared parameter
        group: list[tuple[str, torch.nn.Parameter]] = []
        size = 0

        def flush() -> list[tuple[str, Tensor]]:
            with self._full_parameters([p for _, p in group]):
                copies = [(name, p.data.detach().to("cpu", copy=True)) for name, p in group] if self.is_main else []
            group.clear()
            return copies

        for name, p in params.items():
            group.append((name, p))
            size += p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.numel() * p.element_size()
            if size >= budget_bytes:
                yield from flush()
                size = 0
        if group:
            yield from flush()
        if self.is_main:
            state = self.module.state_dict(keep_vars=True)
            for name in self._raw_state_names():  # persistent buffers (never partitioned)
                if name not in params:
                    yield name, state[name].detach().to("cpu", copy=True)

    def save_hf(self, directory: Path, tokenizer: Any = None) -> None:
        """Write a plain HF directory (config, safetensors, tokenizer) on rank 0; all ranks call."""
        state = self.gather_state_dict()
        if self.is_main:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self._save_plain(directory, state)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        self.barrier()

    def _save_plain(self, directory: Path, state: dict[str, Tensor]) -> None:
        from transformers import AutoModelForCausalLM

        # A meta-device twin of the model: save_pretrained gives the HF layout
        # (sharding, tied-weight handling, generation config) without touching
        # the engine's partitioned parameters.
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(
                self.module.config, trust_remote_code=self.model_cfg.trust_remote_code
            )
        plain.generation_config = self.module.generation_config
        plain.save_pretrained(directory, state_dict=state, safe_serialization=True)

    # ----------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: Path, client_state: dict) -> None:
        """DeepSpeed state (model, optimizer, LR schedule) + `client_state` under directory/deepspeed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, client_state={_CLIENT_KEY: client_state}, save_latest=False
        )
        self.barrier()

    def load_checkpoint(self, directory: Path) -> dict:
        """Restore what `save_checkpoint` wrote; returns its `client_state`."""
        if not (Path(directory) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{CHECKPOINT_TAG}")
        path, client_state = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint under {directory}/{CHECKPOINT_TAG}")
        self._backward_calls = 0
        # DeepSpeed returns its own bookkeeping beside the client's keys.
        return (client_state or {}).get(_CLIENT_KEY, {})

    # ----------------------------------------------------------------------- communication

    def broadcast_object(self, obj: Any = None) -> Any:
        """`obj` from rank 0 on every rank (picklable; other ranks' argument is ignored)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        whom = "the other ranks to take a broadcast" if self.is_main else f"rank 0's broadcast (rank {self.rank})"
        with pending(whom, key="trainer collective"):  # bounded by trainer.collective_timeout_s
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Drop the engines; a launched rank also leaves its process group.

        The one-rank group made without a launcher is kept, so one process can
        build several strategies (tests, evaluation scripts).
        """
        self.engine = None
        self.ref_engine = None
        if self._launched and dist.is_initialized():
            dist.destroy_process_group()
