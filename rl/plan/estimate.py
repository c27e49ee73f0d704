"""`rl plan`: will a run config fit the hardware, and what will weight sync cost? Answered before launch.

Three estimates, each from the model's architecture (rl/plan/specs.py: the real model built
on the meta device, so parameter counts are exact) and the run config:

- Trainer, per GPU: model states by ZeRO stage as DeepSpeed lays them out with our AdamW
  (rl/plan/ds_estimate.py has DeepSpeed's own estimator beside it), what ZeRO-3 gathers,
  buckets, activations, the loss's logits, a reference model, a CUDA allowance.
- Rollout worker, per GPU: vLLM's memory budget minus weights and overheads, as KV cache.
- Weight sync per version: full versions and sparse deltas to W workers, and through caches.

Where a config does not fit, the plan is recomputed with one knob changed at a time and names
the ones that make it fit. What each row counts, and how close it is: docs/operations.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rl.config import RunConfig
from rl.plan.ds_estimate import deepspeed_estimate
from rl.plan.inputs import Hardware, PlanError, TrainerSetup, WorkerSetup
from rl.plan.specs import Architecture, resolve_architecture

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_OVERHEAD = 2 * GIB
"""Trainer: CUDA context, NCCL buffers and allocator fragmentation (not in any formula)."""
VLLM_NON_TORCH = 1 * GIB
"""vLLM worker: CUDA context and NCCL (counted inside gpu_memory_utilization)."""
VLLM_CUDA_GRAPHS = 1 * GIB
"""vLLM worker: captured CUDA graphs when `rollout.enforce_eager` is off."""
VLLM_BATCHED_TOKENS = 8192
"""vLLM's default max_num_batched_tokens: the profiling forward that sizes the activation peak."""
VLLM_MAX_SEQS = 256
"""vLLM's default max_num_seqs: rows of fp32 logits in the sampler."""
OFFLOAD_JSON = "configs/deepspeed/zero3_offload.json"
OFFLOAD_PARAMS_JSON = "configs/deepspeed/zero3_offload_params.json"


# --------------------------------------------------------------------------- trainer


@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class TrainerPlan:
    ranks: int
    gpu_rows: list[Row]
    cpu_rows_per_rank: list[Row]
    gpu_total: int
    gpu_capacity: int
    cpu_per_node: int
    model_states: int
    """Our params + grads + optimizer states + one gathered layer: the part DeepSpeed's estimator covers."""
    deepspeed_gpu: int | None
    deepspeed_cpu_per_node: int | None
    deepspeed_note: str
    fits: bool
    cpu_fits: bool | None
    suggestions: list[str] = field(default_factory=list)


def activation_bytes_per_token_layer(arch: Architecture, dtype_bytes: int) -> int:
    """Tensors one decoder layer keeps for backward, per token (SDPA/flash attention: no [T, T] scores).

    Two RMSNorms with fp32 upcasts (3h each), the projections' shared input (h),
    RoPE'd q and k, SDPA's q, k, v and output, the o_proj input copy, the MLP input
    (h) and four [intermediate] tensors of SwiGLU (gate, up, silu(gate), product).
    """
    h, q = arch.hidden_size, arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    return dtype_bytes * (8 * h + 4 * q + 3 * kv + 4 * arch.intermediate_size)


def trainer_plan(arch: Architecture, setup: TrainerSetup, hw: Hardware) -> TrainerPlan:
    n, p, w, stage = hw.trainer_gpus, arch.params, DTYPE_BYTES[setup.dtype], setup.zero_stage
    mixed = w < 4
    off_opt = setup.offload_optimizer and stage >= 1
    off_param = setup.offload_param and stage == 3
    shard = (lambda x: x / n) if stage >= 1 else (lambda x: x)
    gpu: list[Row] = []
    cpu: list[Row] = []

    def put(name: str, nbytes: float, on_cpu: bool, note: str) -> None:
        (cpu if on_cpu else gpu).append(Row(name, int(nbytes), note))

    put(
        "weights",
        w * p / n if stage == 3 else w * p,
        off_param,
        f"{setup.dtype}" + (", 1/N (ZeRO-3)" if stage == 3 else ""),
    )
    grads = w * p / n if stage >= 2 else w * p
    if off_opt and stage >= 2:
        gpu.append(Row("gradients", 0, "reduced straight into the CPU fp32 gradients (offload)"))
    else:
        put("gradients", grads, False, setup.dtype + (", 1/N (ZeRO-2/3)" if stage >= 2 else ""))
    if stage >= 1 or mixed:
        put("fp32 master weights", shard(4 * p), off_opt, "1/N" if stage >= 1 else "ZeRO-0 mixed precision")
    put("Adam moments (fp32 m, v)", shard(8 * p), off_opt, "1/N (ZeRO >= 1)" if stage >= 1 else "")
    if stage >= 1 or mixed:
        put("fp32 gradients at the step", shard(4 * p), off_opt, "1/N" if stage >= 1 else "")
    model_states = sum(r.bytes for r in gpu)  # what DeepSpeed's estimator covers, with the gathered layer below
    if stage == 3:
        model_states += 2 * w * arch.largest_layer_params
        gathered = 2 * w * arch.largest_layer_params + w * setup.prefetch_bucket
        gpu.append(Row("gathered by ZeRO-3", int(gathered), "largest layer's weights + its full gradient + prefetch"))
    buckets = 0
    if stage >= 1 or n > 1:
        buckets = setup.reduce_bucket * w * (2 if setup.overlap_comm and stage >= 2 else 1)
        if stage in (1, 2):
            buckets += setup.allgather_bucket * w
    if buckets:
        gpu.append(Row("DeepSpeed buckets", int(buckets), "reduce (+ allgather) buckets"))
    # A rank's micro-batch is never more than its share of the step's sequences.
    tokens = min(setup.micro_batch, math.ceil(setup.sequences_per_step / n)) * setup.seq_len
    per_layer = activation_bytes_per_token_layer(arch, w)
    if setup.gradient_checkpointing:
        act = tokens * (arch.num_layers * arch.hidden_size * w + per_layer)
        act_note = f"{tokens} tokens, checkpointed: one input per layer + one layer's recompute"
    else:
        act = tokens * arch.num_layers * per_layer
        act_note = f"{tokens} tokens x {arch.num_layers} layers x {per_layer / 1024:.0f} KiB"
    gpu.append(Row("activations", int(act), act_note))
    gpu.append(
        Row(
            "logits and log-softmax",
            int(tokens * arch.vocab_size * (2 * w + 4)),
            "tokens x vocab: logits, their gradient, fp32 log-softmax",
        )
    )
    if setup.reference:
        gpu.append(Row("reference model", int(w * p / n if stage == 3 else w * p), "algorithm.beta > 0"))
    gpu.append(Row("CUDA context, NCCL, fragmentation", RUNTIME_OVERHEAD, "allowance"))

    per_node = min(hw.gpus_per_node, n)
    cpu_per_node = sum(r.bytes for r in cpu) * per_node
    ds_gpu, ds_cpu, ds_note = deepspeed_estimate(arch, setup, n, per_node)
    total = sum(r.bytes for r in gpu)
    capacity = int(hw.gpu_mem_gib * GIB)
    cpu_fits = None if hw.cpu_mem_gib is None or not cpu else cpu_per_node <= hw.cpu_mem_gib * GIB
    return TrainerPlan(
        ranks=n,
        gpu_rows=gpu,
        cpu_rows_per_rank=cpu,
        gpu_total=total,
        gpu_capacity=capacity,
        cpu_per_node=cpu_per_node,
        model_states=model_states,
        deepspeed_gpu=ds_gpu,
        deepspeed_cpu_per_node=ds_cpu,
        deepspeed_note=ds_note,
        fits=total <= capacity,
        cpu_fits=cpu_fits,
    )


# --------------------------------------------------------------------------- rollout worker


@dataclass
class WorkerPlan:
    tensor_parallel: int
    rows: list[Row]
    capacity: int
    budget: int
    kv_cache: int
    kv_bytes_per_token: int
    kv_tokens: int
    sequences_at_max_len: float
    sequences_at_rollout_len: float
    fits: bool
    problem: str = ""
    suggestions: list[str] = field(default_factory=list)


def worker_plan(arch: Architecture, setup: WorkerSetup, gpu_mem_gib: float) -> WorkerPlan:
    tp, w = setup.tensor_parallel, DTYPE_BYTES[setup.dtype]
    problem = ""
    if arch.num_heads % tp:
        problem = f"vLLM needs num_attention_heads ({arch.num_heads}) divisible by tensor_parallel ({tp})"
    elif arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        problem = f"num_key_value_heads ({arch.num_kv_heads}) and tensor_parallel ({tp}) must divide one another"
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    rows = [
        Row("weights (one TP shard)", int(arch.params * w / tp), f"{setup.dtype}, 1/{tp}"),
        Row(
            "profiling peak (activations, sampler)",
            int(
                VLLM_BATCHED_TOKENS * (4 * arch.hidden_size + (q + 2 * kv + 4 * arch.intermediate_size) / tp) * w
                + VLLM_MAX_SEQS * arch.vocab_size * 4 * 2
            ),
            f"{VLLM_BATCHED_TOKENS} batched tokens, {VLLM_MAX_SEQS} sequences' fp32 logits",
        ),
        Row("CUDA context, NCCL", VLLM_NON_TORCH, "allowance"),
    ]
    if not setup.enforce_eager:
        rows.append(Row("CUDA graphs", VLLM_CUDA_GRAPHS, "rollout.enforce_eager: false"))
    capacity = int(gpu_mem_gib * GIB)
    budget = int(capacity * setup.gpu_memory_utilization)
    kv_cache = budget - sum(r.bytes for r in rows)
    kv_per_token = 2 * arch.num_layers * math.ceil(arch.num_kv_heads / tp) * arch.head_dim * w
    kv_tokens = max(0, kv_cache) // kv_per_token
    if not problem and kv_tokens < setup.max_model_len:
        problem = (
            f"KV cache holds {kv_tokens} tokens, less than one sequence of model.max_model_len ({setup.max_model_len})"
            if kv_cache > 0
            else f"weights and overheads exceed gpu_memory_utilization x memory by {(-kv_cache) / GIB:.1f} GiB"
        )
    return WorkerPlan(
        tensor_parallel=tp,
        rows=rows,
        capacity=capacity,
        budget=budget,
        kv_cache=max(0, kv_cache),
        kv_bytes_per_token=kv_per_token,
        kv_tokens=kv_tokens,
        sequences_at_max_len=kv_tokens / setup.max_model_len,
        sequences_at_rollout_len=kv_tokens / setup.rollout_len,
        fits=not problem,
        problem=problem,
    )


# --------------------------------------------------------------------------- weight sync


@dataclass
class SyncPlan:
    workers: int
    sites: int
    dtype: str
    full_bytes: int
    delta_bytes: int
    change_density: float
    full_s_from_hub: float
    delta_s_from_hub: float
    full_s_via_caches: float
    delta_s_via_caches: float
    note: str


def sync_plan(arch: Architecture, dtype: str, hw: Hardware) -> SyncPlan:
    w = DTYPE_BYTES[dtype]
    full = arch.params * w
    delta = int(arch.params * hw.change_density * (hw.index_bytes + w))

    def from_hub(nbytes: float) -> float:
        return hw.workers * nbytes * 8 / (hw.bandwidth_gbit * 1e9)

    def via_caches(nbytes: float) -> float:
        # The hub sends one copy per site; each cache then serves its share of the workers.
        per_site = math.ceil(hw.workers / hw.sites)
        return nbytes * 8 * (hw.sites / (hw.bandwidth_gbit * 1e9) + per_site / (hw.site_bandwidth_gbit * 1e9))

    return SyncPlan(
        workers=hw.workers,
        sites=hw.sites,
        dtype=dtype,
        full_bytes=full,
        delta_bytes=delta,
        change_density=hw.change_density,
        full_s_from_hub=from_hub(full),
        delta_s_from_hub=from_hub(delta),
        full_s_via_caches=via_caches(full),
        delta_s_via_caches=via_caches(delta),
        note=(
            f"delta = params x {hw.change_density:g} changed x ({hw.index_bytes} B index + {w} B value), before "
            "zstd and without the periodic full keyframe"
        ),
    )


# --------------------------------------------------------------------------- knobs


def _trainer_suggestions(arch: Architecture, setup: TrainerSetup, hw: Hardware) -> list[str]:
    """One knob at a time that makes the trainer fit; else the combination of all; else how many GPUs."""

    def fits(s: TrainerSetup, h: Hardware = hw) -> bool:
        return trainer_plan(arch, s, h).fits

    out = []
    if setup.zero_stage < 3 and fits(replace(setup, zero_stage=3)):
        out.append("raise the ZeRO stage: trainer.zero_stage=3 (or trainer.deepspeed=configs/deepspeed/zero3.json)")
    opt = replace(setup, zero_stage=3, offload_optimizer=True)

    def host(s: TrainerSetup) -> str:
        return f" (needs {trainer_plan(arch, s, hw).cpu_per_node / GIB:,.0f} GiB of host memory per node)"

    if not setup.offload_optimizer and fits(opt):
        out.append(f"offload the optimizer to CPU memory: trainer.deepspeed={OFFLOAD_JSON}" + host(opt))
    both = replace(opt, offload_param=True)
    if not setup.offload_param and not fits(opt) and fits(both):
        out.append(f"offload optimizer and weights to CPU memory: trainer.deepspeed={OFFLOAD_PARAMS_JSON}" + host(both))
    if not setup.gradient_checkpointing and fits(replace(setup, gradient_checkpointing=True)):
        out.append("turn on gradient checkpointing: trainer.gradient_checkpointing=true")
    mb = setup.micro_batch // 2
    while mb >= 1 and not fits(replace(setup, micro_batch=mb)):
        mb //= 2
    if mb >= 1:
        out.append(f"lower the micro-batch: trainer.micro_batch_size={mb}")
    more = _gpus_needed(lambda h: fits(setup, h), hw)
    if more:
        out.append(f"more GPUs: --gpus {more} (trainer ranks) at {hw.gpu_mem_gib:g} GiB")
    if not out:
        everything = replace(both, gradient_checkpointing=True, micro_batch=1)
        if fits(everything):
            out.append(
                f"no single knob is enough; all together fit: trainer.deepspeed={OFFLOAD_PARAMS_JSON} "
                "trainer.gradient_checkpointing=true trainer.micro_batch_size=1"
            )
        else:
            more = _gpus_needed(lambda h: fits(everything, h), hw)
            out.append(
                "does not fit even with ZeRO-3, optimizer and weight offload, checkpointing and micro-batch 1"
                + (f"; with all of those it needs --gpus {more}" if more else "; use GPUs with more memory")
                + " (or a shorter sequence: data.max_prompt_tokens + sampling.max_tokens)"
            )
    return out


def _gpus_needed(fits_on, hw: Hardware, limit: int = 4096) -> int | None:
    """Fewest trainer GPUs (whole nodes beyond one node) at which `fits_on(hardware)` holds."""
    n = hw.trainer_gpus + 1
    while n <= limit:
        if n > hw.gpus_per_node:
            n = math.ceil(n / hw.gpus_per_node) * hw.gpus_per_node
        if fits_on(replace(hw, gpus=max(hw.gpus, n), trainer_gpus=n)):
            return n
        n += 1
    return None


def _worker_suggestions(arch: Architecture, setup: WorkerSetup, gpu_mem_gib: float) -> list[str]:
    out = []
    for tp in (1, 2, 4, 8, 16):
        if tp > setup.tensor_parallel and worker_plan(arch, replace(setup, tensor_parallel=tp), gpu_mem_gib).fits:
            out.append(f"more tensor parallelism: rollout.tensor_parallel={tp} (`rl rollout --tp {tp}`)")
            break
    if (
        setup.gpu_memory_utilization < 0.95
        and worker_plan(arch, replace(setup, gpu_memory_utilization=0.95), gpu_mem_gib).fits
    ):
        out.append("raise rollout.gpu_memory_utilization=0.95")
    length = setup.max_model_len // 2
    while length >= setup.rollout_len and not worker_plan(arch, replace(setup, max_model_len=length), gpu_mem_gib).fits:
        length //= 2
    if length >= setup.rollout_len:
        out.append(f"a shorter context: model.max_model_len={length}")
    if not out:
        out.append("use GPUs with more memory for the workers, or more of them per worker (--tp)")
    return out


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    model: Architecture
    hardware: Hardware
    trainer_setup: TrainerSetup
    worker_setup: WorkerSetup
    trainer: TrainerPlan
    worker: WorkerPlan
    sync: SyncPlan
    local_worker_gpus: int

    @property
    def fits(self) -> bool:
        return self.trainer.fits and self.worker.fits and self.trainer.cpu_fits is not False

    def to_json(self) -> dict[str, Any]:
        return {"fits": self.fits, **asdict(self)}


def make_plan(cfg: RunConfig, hw: Hardware, tp: int | None = None) -> Plan:
    """The whole plan for a run config on the given hardware (no GPU, no network)."""
    hw.check()
    if tp is not None and tp < 1:
        raise PlanError(f"--tp must be at least 1 (got {tp})")
    from rl.plan.specs import ArchitectureError

    try:
        arch = resolve_architecture(cfg.model.name, cfg.model.trust_remote_code)
    except ArchitectureError as e:
        raise PlanError(str(e)) from None
    tsetup = TrainerSetup.from_config(cfg)
    wsetup = WorkerSetup.from_config(cfg, tp)
    trainer = trainer_plan(arch, tsetup, hw)
    if not trainer.fits:
        trainer.suggestions = _trainer_suggestions(arch, tsetup, hw)
    if trainer.cpu_fits is False:
        trainer.suggestions.append(
            f"host memory: offload needs {trainer.cpu_per_node / GIB:.0f} GiB per node; spread it over more nodes "
            "(--gpus-per-node lower) or offload only the optimizer"
        )
    worker_mem = hw.worker_gpu_mem_gib or hw.gpu_mem_gib
    worker = worker_plan(arch, wsetup, worker_mem)
    if not worker.fits:
        worker.suggestions = _worker_suggestions(arch, wsetup, worker_mem)
    return Plan(
        model=arch,
        hardware=hw,
        trainer_setup=tsetup,
        worker_setup=wsetup,
        trainer=trainer,
        worker=worker,
        sync=sync_plan(arch, wsetup.dtype, hw),
        local_worker_gpus=hw.gpus - hw.trainer_gpus,
    )
