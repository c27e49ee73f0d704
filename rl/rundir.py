"""Names for the places of a run directory: one object instead of path literals spread over modules.

runs/<run_name>/
  config.yaml        the fully resolved config the run was started with
  policy/            published weights: base/ and v<N>/ (rl/weights/store.py)
  worker_cache/      local workers' verified copies of policy versions
  checkpoints/       step_<N>/ (rl/trainer/checkpoint.py)
  final/             the trained policy as a plain HF directory
  logs/              hub.log, worker-<i>.log, stall-<time>/ (stacks of a stalled step)
  hub.sqlite         the hub's ledger (survives a hub crash)
  metrics.jsonl      one record per step (the same names as in W&B)
  batches.jsonl      which prompts each step trained on
  receipts.jsonl     the signed receipt of each trained step (rl/wire/receipts.py)
  run_key.pem(.pub)  the run's Ed25519 signing key (private: 0600) and its public key
  curves.png         reward and accuracy curves
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def worker_cache(self) -> Path:
        return self.root / "worker_cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint written after step `step`."""
        return self.checkpoints / f"step_{step}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def hub_log(self) -> Path:
        return self.logs / "hub.log"

    def stall(self, stamp: str) -> Path:
        """Where the step watchdog writes every process's stacks when a step stalls (`stamp`: UTC time)."""
        return self.logs / f"stall-{stamp}"

    def worker_log(self, index: int) -> Path:
        """The log of `rl train`'s local rollout worker `index`."""
        return self.logs / f"worker-{index}.log"

    @property
    def hub_db(self) -> Path:
        return self.root / "hub.sqlite"

    def remove_hub_db(self) -> None:
        """Delete the hub's database with its WAL and shared-memory files (a WAL must not outlive its db)."""
        db = self.hub_db
        for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            p.unlink(missing_ok=True)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def batches(self) -> Path:
        return self.root / "batches.jsonl"

    @property
    def receipts(self) -> Path:
        return self.root / "receipts.jsonl"

    @property
    def run_key(self) -> Path:
        """The run's private signing key (receipts); the public key is beside it in `run_key_pub`."""
        return self.root / "run_key.pem"

    @property
    def run_key_pub(self) -> Path:
        return self.root / "run_key.pem.pub"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def step_logs(self) -> tuple[Path, ...]:
        """Logs with one JSON record per step (`{"step": N, ...}`), cut back on resume."""
        return (self.metrics, self.batches, self.receipts)

    @property
    def versioned(self) -> tuple[Path, ...]:
        """Directories holding `v<N>/` policy versions."""
        return (self.policy, self.worker_cache)
