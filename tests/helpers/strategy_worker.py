"""One rank of the multi-rank DeepSpeedStrategy test, and the training schedule it shares with it.

Launched by tests/trainer/test_strategy_multirank.py as
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/strategy_worker.py
--stage 3 --model DIR --out DIR`. Rank 0 builds the batch and broadcasts it; every rank
trains on its half with a per-step micro-batch count that changes between steps; then
the ranks gather, publish a policy version in streamed shards, export, checkpoint, step
once more, reload and repeat that step.
Rank 0 writes everything the test compares to OUT/result.pt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from rl.config import ModelConfig, TrainerConfig
from rl.trainer.strategy import DeepSpeedStrategy

SEQUENCES = 8
LENGTH = 14
MICRO_BATCHES = [2, 1, 3]
"""Micro-batches per rank in each training step (varies on purpose)."""


def make_batch(seed: int = 0, vocab: int = 400) -> dict[str, torch.Tensor]:
    """Right-padded token ids, mask and a signed per-sequence weight (an advantage stand-in)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (SEQUENCES, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (SEQUENCES,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    weight = torch.linspace(-1.0, 1.0, SEQUENCES)
    return {"input_ids": ids, "attention_mask": mask, "weight": weight}


def batch_loss_terms(strategy: DeepSpeedStrategy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over sequences of weight * sum of log-probs (unnormalised)."""
    logp, _ = strategy.token_logprobs(batch["input_ids"], batch["attention_mask"])
    return -(logp.sum(-1) * batch["weight"].to(logp.device)).sum()


def train_step(
    strategy: DeepSpeedStrategy, batch: dict[str, torch.Tensor], micro_batches: int, normaliser: float
) -> dict[str, float]:
    """One optimizer step over `batch` (this rank's rows) split into `micro_batches` parts."""
    rows = batch["input_ids"].shape[0]
    for part in torch.arange(rows).tensor_split(micro_batches):
        micro = {k: v[part] for k, v in batch.items()}
        strategy.backward(batch_loss_terms(strategy, micro) / normaliser)
    return strategy.step()


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    return {k: v.tensor_split(world_size)[rank] for k, v in batch.items()}


def trainer_config(stage: int) -> TrainerConfig:
    return TrainerConfig(
        zero_stage=stage, lr=1e-3, warmup_steps=2, grad_clip=1e6, micro_batch_size=2, threads=1, seed=0
    )


def run_schedule(strategy: DeepSpeedStrategy, batch: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """The shared schedule: len(MICRO_BATCHES) steps, loss normalised by the global token count."""
    normaliser = float(batch["attention_mask"].sum())
    mine = shard(batch, strategy.rank, strategy.world_size)
    return [train_step(strategy, mine, k, normaliser) for k in MICRO_BATCHES]


def full_parameters_on_every_rank(strategy: DeepSpeedStrategy) -> list[float]:
    """Per-parameter sums of the full weights, computed on each rank (ZeRO-3: gathered)."""
    import deepspeed

    sums = []
    for p in strategy.module.parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=strategy.zero_stage == 3):
            sums.append(float(p.data.double().sum()))
    return sums


def uneven_logprobs_agree(strategy: DeepSpeedStrategy, batch: dict[str, torch.Tensor]) -> bool:
    """No-grad log-probs of unequal shards match the full rows (ZeRO-3: forwards are collectives).

    Shards of 3 and 1 rows (2 and 1 micro-batches), then 4 and 0 rows.
    """
    ids, mask = batch["input_ids"][:4], batch["attention_mask"][:4]
    checks = []
    with torch.no_grad():
        full, _ = strategy.token_logprobs(ids, mask)
        for split in (3, 4):
            rows = slice(0, split) if strategy.rank == 0 else slice(split, 4)
            mine, _ = strategy.token_logprobs(ids[rows], mask[rows])
            checks.append(mine.shape == full[rows].shape and bool(torch.allclose(mine, full[rows], atol=1e-5)))
    ok = [None] * strategy.world_size
    dist.all_gather_object(ok, all(checks))
    return all(ok)


def publish_streamed(strategy: DeepSpeedStrategy, policy_dir: Path) -> dict | None:
    """Stream the weights into >= 3 shards, gathering a quarter of the model at a time (rank 0 writes)."""
    from rl.weights.files import TensorSpec
    from rl.weights.store import PolicyWriter

    layout = [TensorSpec(name, shape, torch.float32) for name, shape in strategy.weight_layout()]
    shard_bytes = sum(t.nbytes for t in layout) // 4
    tensors = strategy.iter_state_dict(budget_bytes=shard_bytes)
    if not strategy.is_main:
        for _ in tensors:  # the gathers are collectives
            pass
        return None
    writer = PolicyWriter(policy_dir, layout, shard_bytes=shard_bytes, fmt="full")
    return writer.write(0, tensors).manifest.model_dump()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    strategy = DeepSpeedStrategy(ModelConfig(name=args.model), trainer_config(args.stage))
    assert strategy.world_size == 2, strategy.world_size
    batch = strategy.broadcast_object(make_batch() if strategy.is_main else None)
    metrics = run_schedule(strategy, batch)
    uneven_ok = uneven_logprobs_agree(strategy, batch)
    state = strategy.gather_state_dict()
    published = publish_streamed(strategy, args.out / "policy")

    sums = full_parameters_on_every_rank(strategy)
    all_sums: list = [None] * strategy.world_size
    dist.all_gather_object(all_sums, sums)

    strategy.save_hf(args.out / "hf")
    strategy.save_checkpoint(args.out / "ckpt", {"step": len(MICRO_BATCHES)})
    normaliser = float(batch["attention_mask"].sum())
    mine = shard(batch, strategy.rank, strategy.world_size)
    next_metrics = train_step(strategy, mine, 2, normaliser)
    after = strategy.gather_state_dict()
    client_state = strategy.load_checkpoint(args.out / "ckpt")
    resumed_metrics = train_step(strategy, mine, 2, normaliser)
    resumed = strategy.gather_state_dict()

    if strategy.is_main:
        result = {
            "metrics": metrics,
            "state": state,
            "published": published,
            "ranks_agree": all(s == all_sums[0] for s in all_sums),
            "uneven_ok": uneven_ok,
            "next_metrics": next_metrics,
            "after": after,
            "client_state": client_state,
            "resumed_metrics": resumed_metrics,
            "resumed": resumed,
        }
        torch.save(result, args.out / "result.pt")
    strategy.barrier()
    strategy.close()


if __name__ == "__main__":
    main()
