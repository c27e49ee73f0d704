"""What crosses the wire between the hub, rollout workers and the trainer (HTTP/JSON, API v1).

One pydantic model per request and answer of every route, and `HubError`: raised by the hub, rebuilt by every
client (rl/wire/client.py). The hub tokenizes prompts and sends token ids; workers return token ids and the
per-token logprobs of the policy version they generated with; rewards are computed only on the hub. Every request
carries `Authorization: Bearer <token>` (worker tokens reach the worker routes, the admin token everything); worker
routes that name a worker id also need `X-Worker-Secret` (one secret per registration, so a worker cannot act for
another with the same token). Non-finite numbers (NaN, inf, 1e999) are rejected everywhere, and every list has a
length bound. docs/protocol.md: the routes with their models, and a worker's session.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rl.config import WeightsFormat
from rl.wire.base import (  # the bounds and base types live there; imported from here as before
    IDENTITY_CHALLENGE_HEADER,  # noqa: F401 (re-exported)
    IDENTITY_SIGNATURE_HEADER,  # noqa: F401 (re-exported)
    MAX_COUNT,
    MAX_GROUP,
    MAX_ID,
    MAX_PACKED_CHARS,
    MAX_SECONDS,
    MAX_SEQUENCE_TOKENS,
    MAX_TASKS,
    MAX_TOKENS_PER_S,
    PRINTABLE,
    PUBLIC_KEY,
    SAFE_NAME,
    SIGNATURE,
    WORKER_SECRET_HEADER,  # noqa: F401 (re-exported)
    Ack,  # noqa: F401 (re-exported)
    ErrorBody,  # noqa: F401 (re-exported)
    HubError,  # noqa: F401 (re-exported)
    Wire,
)
from rl.wire.packed import PackedIds, PackedLogprobs, pack_ids, pack_logprobs

# --------------------------------------------------------------------------- workers


class IdentityChallenge(Wire):
    """A one-time string to sign with a contributor key (`POST /v1/challenges`), good for `expires_in_s`."""

    challenge: str
    expires_in_s: float


class IdentityProof(Wire):
    """A contributor key's signature of a hub challenge (`POST /v1/challenges`; rl/wire/identity.py)."""

    public_key: str = Field(pattern=PUBLIC_KEY)
    challenge: str = Field(min_length=1, max_length=MAX_ID)
    signature: str = Field(pattern=SIGNATURE)


class RegisterRequest(Wire):
    name: str = Field("worker", pattern=SAFE_NAME)
    """Shown in logs, `rl status`, batches.jsonl and W&B keys: letters, digits and `._:@+-`, 1 to 64 of them."""
    engine: Literal["vllm", "hf"] = "vllm"
    tensor_parallel: int = Field(1, ge=1, le=1024)
    host: str = Field("", max_length=256, pattern=PRINTABLE)
    """Free-form description of where the worker runs (shown in status); printable ASCII only."""
    identity: IdentityProof | None = None
    """Register for a contributor identity (`rl rollout --identity KEY`); without one the work is the token's."""
    wire: list[Literal["packed", "json"]] | None = Field(None, max_length=8)
    """Encodings of token ids and log-probs the worker can send, preferred first; absent: JSON lists only."""


class SamplingParamsWire(Wire):
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: list[str] = Field(default_factory=list, max_length=64)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=4096)

    @classmethod
    def of(cls, sampling) -> SamplingParamsWire:
        """What a run's `sampling` config section (rl/config/sections.py) puts on every lease."""
        s = sampling
        return cls(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                   stop=s.stop)  # fmt: skip


class RegisterResponse(Wire):
    worker_id: str
    worker_secret: str
    """Send it as `X-Worker-Secret` on every later call for this worker id (heartbeat, leases, rollouts, leave)."""
    heartbeat_interval_s: float
    policy_version: int
    """Latest published policy version; the worker loads it before leasing."""
    max_model_len: int
    dtype: str
    sampling: SamplingParamsWire
    weights_url: str | None = None
    """An HTTP cache or mirror of `/v1/blobs/` to download policy files from first (`hub.weights_url`)."""
    wire: Literal["packed", "json"] | None = None
    """The encoding to submit with, one the worker offered; absent when it offered none (an older worker)."""


class WaitingFor(Wire):
    """A wait in flight past its expected time: what for (printable ASCII), for how many seconds."""

    what: str = Field(max_length=300, pattern=PRINTABLE)
    since_s: float = Field(ge=0.0, le=MAX_SECONDS)


class HeartbeatRequest(Wire):
    policy_version: int = Field(ge=-1, le=MAX_COUNT)
    """Version currently loaded by the worker (-1: none yet)."""
    tokens_per_s: float = Field(0.0, ge=0.0, le=MAX_TOKENS_PER_S)
    busy: bool = False
    fetch_s: float = Field(0.0, ge=0.0, le=MAX_SECONDS)
    """Seconds the last policy update spent downloading (and rebuilding) the version."""
    load_s: float = Field(0.0, ge=0.0, le=MAX_SECONDS)
    """Seconds the last policy update spent loading it into the engine."""
    stalls: dict[Annotated[str, Field(max_length=MAX_ID)], Annotated[int, Field(ge=0, le=MAX_COUNT)]] = Field(
        default_factory=dict, max_length=32)  # fmt: skip
    """The worker's waits reported so far, by what it waited for (rl/wire/waits.py `stall_counts`)."""
    waiting: list[WaitingFor] = Field(default_factory=list, max_length=8)
    """The worker's waits in flight past their expected time (rl/wire/waits.py `open_waits`): `rl status` lists them."""
    leases: list[Annotated[str, Field(max_length=MAX_ID)]] = Field(default_factory=list, max_length=MAX_TASKS)
    """Leases whose prompts the worker is generating: the hub answers which of them it no longer holds (`gone`)."""


class HeartbeatResponse(Wire):
    policy_version: int
    """Latest published version: the worker should move to it between generation batches."""
    lease_ttl_s: float
    gone: list[str] = []
    """Of the request's `leases`, those the hub no longer holds for this worker (expired and re-queued, or every
    task finished by a backup lease): their results would be refused, so the worker stops generating them."""


# --------------------------------------------------------------------------- leases and rollouts


class LeaseRequest(Wire):
    worker_id: str = Field(max_length=MAX_ID)
    policy_version: int = Field(ge=0, le=MAX_COUNT)
    """Version the worker has loaded; a lease needs at least `min_policy_version`."""
    max_tasks: int = Field(8, ge=1, le=MAX_TASKS)
    """Most tasks wanted; the hub grants at most `hub.max_tasks_per_lease` (and `hub.max_leased_per_worker` in all)."""
    wait_s: float = Field(0.0, ge=0.0, le=30.0)
    """Long poll: with no work now, the hub holds the request up to this long and answers as soon as there is."""


class LeasedTask(Wire):
    task_id: int
    prompt_token_ids: list[int]
    seeds: list[int] = Field(default_factory=list, max_length=MAX_GROUP)
    """One per completion: completion j must be the seeded draw of `seeds[j]` (rl/sampling.py)."""


class Lease(Wire):
    lease_id: str | None
    """None when there is no work right now (see `retry_after_s`) or the worker must update first."""
    expires_in_s: float = 0.0
    min_policy_version: int = 0
    sampling: SamplingParamsWire | None = None
    tasks: list[LeasedTask] = Field(default_factory=list)
    retry_after_s: float = 0.0
    reason: str = ""


TokenList = Annotated[list[int], Field(max_length=MAX_SEQUENCE_TOKENS)]
FloatList = Annotated[list[float], Field(max_length=MAX_SEQUENCE_TOKENS)]
PackedText = Annotated[str, Field(max_length=MAX_PACKED_CHARS)]


class Completion(Wire):
    token_ids: TokenList | PackedText = Field(union_mode="left_to_right")
    """The sampled token ids: a JSON list, or packed (base64 of little-endian int32, rl/wire/packed.py)."""
    logprobs: FloatList | PackedText = Field(union_mode="left_to_right")
    """Per-token logprob of each sampled token under the behaviour policy: a list, or packed (float32)."""
    finish_reason: Literal["stop", "length"] = "stop"

    def packed(self) -> Completion:
        """The same completion with packed token ids and log-probs."""
        ids, logprobs = self.token_ids, self.logprobs
        return Completion.model_construct(
            token_ids=ids if isinstance(ids, str) else pack_ids(ids),
            logprobs=logprobs if isinstance(logprobs, str) else pack_logprobs(logprobs),
            finish_reason=self.finish_reason,
        )


class TaskResult(Wire):
    task_id: int
    completions: list[Completion] = Field(max_length=MAX_GROUP)
    cached_prompt_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    """Prompt tokens the worker's engine found in its prefix cache for this task (its requests summed).
    The worker's own word: the hub reports it (an episode's later turns, `rl status`) and trusts nothing by it."""


class SubmitRequest(Wire):
    worker_id: str = Field(max_length=MAX_ID)
    lease_id: str = Field(max_length=MAX_ID)
    policy_version: int = Field(ge=0, le=MAX_COUNT)
    """Version the completions were generated with."""
    results: list[TaskResult] = Field(min_length=1, max_length=MAX_TASKS)
    gen_seconds: float = Field(0.0, ge=0.0, le=MAX_SECONDS)
    """Wall time spent generating these results (for tokens/s)."""

    def packed(self) -> SubmitRequest:
        """The same submission with every completion packed (what a worker sends when the hub chose `packed`)."""
        results = [r.model_copy(update={"completions": [c.packed() for c in r.completions]}) for r in self.results]
        return self.model_copy(update={"results": results})


class SubmitResponse(Wire):
    accepted: list[int] = Field(default_factory=list)
    duplicates: list[int] = Field(default_factory=list)
    """Task ids already accepted earlier (idempotent re-submit; not counted again)."""


# --------------------------------------------------------------------------- policy


class PolicyFile(Wire):
    name: str
    size: int
    sha256: str


class PolicyManifest(Wire):
    """One policy version. Workers verify every file they download, and every shard they rebuild.

    `full`: `files` are the safetensors shards (+ `model.safetensors.index.json` when there are
    several). `delta`: `files` are one `<shard>.delta.zst` per changed shard, or the shard itself
    where the delta would not be much smaller (+ the index); a worker holding `base_version` applies
    them and must get exactly `shards` (sha256), or the per-tensor hashes when it applies them to its
    engine in place; else it rebuilds from `keyframe_version` and the deltas after it (rl/weights/).
    """

    version: int
    format: WeightsFormat = "full"
    files: list[PolicyFile]
    """What a worker downloads for this version (`GET /v1/policy/{version}/files/{name}`)."""
    base_files: list[PolicyFile] = Field(default_factory=list)
    """Version-independent files (config, tokenizer) under `GET /v1/policy/base/files/{name}`."""
    lora_base_version: int | None = None
    """`lora` versions: the full version whose weights the adapters in `files` are merged into."""
    shards: list[PolicyFile] = Field(default_factory=list)
    """The full safetensors shards this version is (or rebuilds to), in order; empty: the `.safetensors` of `files`."""
    deltas: list[PolicyFile] = Field(default_factory=list)
    """A keyframe (full) of a delta run: the deltas from `base_version` as well (+ the index), what a
    worker holding `base_version` downloads instead of `files`."""
    base_version: int | None = None
    """The version its deltas apply to."""
    keyframe_version: int | None = None
    """The latest full version at or before this one: where a worker without `base_version` starts."""
    bytes_full: int = 0
    """Size of the full version in the rollout dtype (sum of `shards`)."""
    tensor_sha256: dict[str, str] = Field(default_factory=dict)
    """Per tensor its deltas change: sha256 of its bytes; `changes_sha256`: of its changed elements' new bits."""
    changes_sha256: dict[str, str] = Field(default_factory=dict)

    def full_shards(self) -> list[PolicyFile]:
        return self.shards or [f for f in self.files if f.name.endswith(".safetensors")]


class ShardLayout(Wire):
    """One safetensors shard's tensors in file order: `[name, shape, dtype code]` ("BF16", "F32", ...)."""

    name: str
    tensors: list[tuple[str, list[int], str]]


class BaseWeights(Wire):
    """The weights as first published (version 0), kept after that version is collected.

    A worker that has the base model on disk writes these shards itself (rl/weights/files.py
    writes the same bytes for the same tensors) and uses each one whose sha256 matches
    instead of downloading it (`rl rollout --base-model`).
    """

    version: int
    shards: list[PolicyFile]
    layout: list[ShardLayout]
    """The tensors of each of `shards`, same order."""


class PublishRequest(Wire):
    version: int = Field(ge=0, le=MAX_COUNT)


# --------------------------------------------------------------------------- trainer


class BatchRequest(Wire):
    num_groups: int = Field(ge=1, le=65536)
    step: int = Field(ge=0, le=MAX_COUNT)
    """The optimizer step the batch will train (= policy version the trainer holds)."""
    timeout_s: float = Field(30.0, ge=0.0, le=600.0)
    skip_zero_variance: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (counted, not re-queued)."""
    pull_id: str | None = Field(None, min_length=1, max_length=64)
    """Idempotency key: a pull re-sent with the same id (its answer was lost, the hub restarted) gets the same batch."""


class ScoredCompletion(Wire):
    token_ids: PackedIds
    """Packed on the wire (the worker's own text when it sent packed); a list in Python."""
    logprobs: PackedLogprobs
    finish_reason: Literal["stop", "length"]
    reward: float
    components: dict[str, float]
    turns: list[list[int]] = []  # copied per model; a default_factory costs model_construct ~1 ms
    """An episode's model turns as [start, end, seed, policy version] within `token_ids`; the tokens between
    them are observations the hub rendered (never trained on). Empty: all of `token_ids` is one turn."""


class ScoredGroup(Wire):
    task_id: int
    row_index: int
    prompt_token_ids: list[int]
    policy_version: int
    worker_id: str
    worker_name: str
    completions: list[ScoredCompletion]
    seeds: list[int] = []  # not a default_factory: as `turns` above
    """The seed of each completion, in order (the trainer checks the draws)."""
    gen_s: float = 0.0
    """Seconds of the worker's generate call that made this group (one call per lease: shared by its tasks)."""
    score_s: float = 0.0
    """Seconds from the hub accepting this group to its last reward (waiting for a verifier process included)."""
    contributor: str = ""
    """Who generated it: an identity's public key, or `token:<token id>` (rl/hub/contributions.py)."""


class Batch(Wire):
    groups: list[ScoredGroup]
    complete: bool
    """False when the timeout passed first: then `groups` is empty and nothing was consumed; ask again."""
    stale_dropped: int = 0
    zero_variance_skipped: int = 0


class Ledger(Wire):
    """The hub's data position: enough to resume with no prompt lost or used twice."""

    seed: int
    num_rows: int
    position: int
    """Task ids below this were handed out at least once."""
    pending: list[int]
    """Task ids below `position` not yet consumed by the trainer (re-queued on restore)."""
    consumed: int
    batches: int


class WorkerTrust(Wire):
    """Per-worker provenance statistics: what the trainer's checks and the reward comparison found."""

    sequences_checked: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    """Sequences masked out of the loss, by reason (rl/trainer/provenance.py)."""
    mean_abs_logprob_diff: float = 0.0
    """Mean |claimed - recomputed| logprob per token over the checked sequences."""
    groups: int = 0
    """Scored groups from this worker."""
    reward_z: float = 0.0
    """How far its operator's mean group reward lies above the other operators' (standard errors)."""
    scoring_timeouts: int = 0
    """Completions the verifier killed at `rewards.timeout_s` (scored 0)."""


class WorkerStatus(Wire):
    worker_id: str
    name: str
    engine: str
    policy_version: int
    tokens_per_s: float
    last_seen_s: float
    leased_tasks: int
    completed_tasks: int
    fetch_s: float = 0.0
    """Last policy update: download (+ rebuild) seconds, as the worker reported."""
    load_s: float = 0.0
    """Last policy update: engine load seconds, as the worker reported."""

    quarantined: str = ""
    """Why this worker is quarantined (no leases, its groups dropped); empty when it is not."""
    trust: WorkerTrust | None = None
    """Provenance statistics (rl/hub/trust.py); None until the trainer checked any of its sequences."""
    operator: str = ""
    """The token id it registered with."""
    contributor: str = ""
    """The contributor its work is credited to: its identity's public key, or `token:<operator>`."""


class OperatorStatus(Wire):
    """One operator: the worker token its registrations came with (trust is kept per operator)."""

    operator: str
    """The token's id (a hash prefix, not the token)."""
    workers: int
    """Registrations alive now."""
    leased_tasks: int
    completed_tasks: int
    """Tasks accepted from its registrations alive now."""
    quarantined: str = ""
    trust: WorkerTrust | None = None
    """Its evidence over every registration it ever had."""


class ContributorStatus(Wire):
    """One contributor's trained work so far (rl/hub/contributions.py); only trained work counts."""

    contributor: str
    workers: int = 0
    """Registrations alive now."""
    trained_samples: int = 0
    trained_tokens: int = 0
    share: float = 0.0
    """Its fraction of every contributor's trained tokens."""
    counts: dict[str, float] = Field(default_factory=dict)
    """masked_samples, submitted_groups, rejected_groups, quarantined_s, first_seen, last_seen (unix time)."""


class WeightsServed(Wire):
    files: int = 0
    """Responses with a policy file's bytes (blobs and named files; 304s not counted)."""
    bytes: int = 0
    """Body bytes of those responses."""


class WorkersSummary(Wire):
    """Every registered worker at a glance (the `workers` list of a status is one page of them)."""

    total: int = 0
    by_version: dict[str, int] = Field(default_factory=dict)
    """Workers per loaded policy version ("-1": none loaded yet)."""
    tokens_per_s: float = 0.0
    """Sum of the workers' reported generation speeds."""
    fetch_s: float = 0.0
    """Mean over workers that updated of their last policy download's seconds."""
    load_s: float = 0.0
    """Mean over workers that updated of their last policy load's seconds."""


class Stall(Wire):
    """A part of the run that stopped making progress, as `rl status` lists it (docs/operations.md, "When a run is
    stuck"). Sent by the trainer's step watchdog (`POST /v1/stalls`, admin)."""

    component: str = Field(max_length=64)
    """Who is stuck, e.g. "trainer"."""
    what: str = Field("", max_length=4000)
    """What it waits for, and the likely cause."""
    since_s: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """Seconds without progress: when sent; in `/v1/status`, until the answer."""
    report: str | None = Field(None, max_length=1000)
    """Where every process's stacks went (a directory on the trainer's machine)."""
    active: bool = True
    """False: the stall ended (a step completed) and the hub forgets it."""


class HubStatus(Wire):
    policy_version: int
    workers: list[WorkerStatus]
    """One page of the workers (`GET /v1/status?offset=&limit=`, registration order); a worker token sees
    only the workers registered with it. See `worker_summary`."""
    worker_summary: WorkersSummary = Field(default_factory=WorkersSummary)
    workers_total: int = 0
    """Registered workers (all tokens)."""
    quarantined: int = 0
    """Workers in quarantine (all tokens)."""
    operators: list[OperatorStatus] = Field(default_factory=list)
    """Operators with live registrations (a worker token sees only its own)."""
    operators_quarantined: int = 0
    contributors: list[ContributorStatus] = Field(default_factory=list)
    """Contributors with trained work or live registrations (a worker token sees only its own)."""
    queued: int
    leased: int
    scoring: int
    buffered: int
    consumed: int
    batches: int
    rejections: dict[str, int]
    staleness_histogram: dict[str, int]
    """Staleness (trainer step - generation version) of groups handed to the trainer."""
    stale_dropped: int
    zero_variance_skipped: int
    submissions: int
    tokens_generated: int
    verifier: dict[str, float] = Field(default_factory=dict)
    uptime_s: float
    scoring_failures: int = 0
    """Scoring attempts that raised (e.g. verifier processes that cannot start); each is retried with backoff."""
    scoring_dropped: int = 0
    """Tasks given up after failing scoring `MAX_SCORING_ATTEMPTS` times (training tasks leave the ledger)."""
    last_scoring_error: str | None = None
    """The last scoring failure, e.g. "task 12 (attempt 2/3): RuntimeError: ..."."""
    weights_served: WeightsServed = Field(default_factory=WeightsServed)
    """Policy files the hub itself sent since it started (an HTTP cache in front keeps this low)."""
    stalls: list[Stall] = Field(default_factory=list)
    """Current stalls (admin view only)."""
    stall_counts: dict[str, int] = Field(default_factory=dict)
    """Stalls since the hub started: `trainer_step`, `hub_<wait>`, `worker_<wait>` (summed) (admin view only)."""
    episodes: dict[str, float] = Field(default_factory=dict)
    """An environment run (docs/environments.md): episodes in flight, turns queued and done, observation tokens,
    and the hub's milliseconds per turn (tools excluded); empty otherwise."""


# --------------------------------------------------------------------------- trust (admin)


class WorkerVerdicts(Wire):
    """What the trainer's provenance checks found in one step's sequences of one worker."""

    worker_id: str = Field(max_length=MAX_ID)
    sequences: int = Field(ge=0)
    rejected: dict[str, int] = Field(default_factory=dict, max_length=32)
    """Sequences masked out of the loss, by reason."""
    abs_logprob_diff_sum: float = Field(0.0, ge=0.0)
    tokens: int = Field(0, ge=0)


class ProvenanceReport(Wire):
    step: int = Field(ge=0)
    workers: list[WorkerVerdicts] = Field(max_length=MAX_TASKS)


class QuarantineRequest(Wire):
    reason: str = Field("quarantined by an operator", max_length=512)


class RevokeTokenRequest(Wire):
    token: str = Field(min_length=1, max_length=512)
    """The worker token to revoke (or its id as shown by the hub's log); its workers are removed."""


# --------------------------------------------------------------------------- evaluation


class EvalRequest(Wire):
    """Evaluate published version `version` on the first `num_prompts` held-out prompts."""

    version: int = Field(ge=0)
    num_prompts: int = Field(ge=1, le=100_000)
    n: int = Field(1, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    """0: greedy."""


class EvalCompletion(Wire):
    reward: float
    components: dict[str, float]
    length: int
    finish_reason: Literal["stop", "length"]


class EvalTaskResult(Wire):
    task_id: int
    row_index: int
    completions: list[EvalCompletion]


class EvalJob(Wire):
    job_id: str
    version: int
    total: int
    done: int
    """Tasks finished: scored, or given up after repeated scoring failures (`failed`)."""
    failed: int = 0
    """Tasks whose scoring kept failing (see `HubStatus.scoring_dropped`); they have no result."""
    results: list[EvalTaskResult] = Field(default_factory=list)
    """Filled when `done == total`."""
