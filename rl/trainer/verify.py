"""The provenance checks of one training step: every sequence's verdict, then masks, metrics and the hub's report.

The checks themselves are pure functions (rl/trainer/provenance.py); this file decides which forward gives
them their statistics. Groups of a version the trainer kept (`strategy.weights_of`) get a no-grad forward
under those weights. The current version's rows either get one too (`trust.shared_forward: false`, the
reference path), or share the training forward (the default, one forward per sequence per step): the
trainer asks `StepChecks.request` for a statistics request before a micro-batch's first forward, then
`settle`s the micro-batch, whose rows on all ranks are whole groups, so the micro-batch's masks and its
groups' advantages are known before its backward. A batch-level normaliser learnt only after the last
backward is applied as a gradient scale at the optimizer step (`grad_scale`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.distributed as dist
from torch import Tensor

from rl.config import RunConfig
from rl.trainer.advantages import group_advantages
from rl.trainer.batch import TrainBatch
from rl.trainer.loss import scales_with_tokens
from rl.trainer.packing import StatsRequest
from rl.trainer.provenance import (
    NUM_STATS,
    REASONS,
    check_sequences,
    draw_tolerance,
    mask_rejected,
    special_token_rows,
    token_statistics,
)
from rl.wire.protocol import ProvenanceReport, WorkerVerdicts

log = logging.getLogger(__name__)

CODE, ABS_DIFF_SUM, TOKENS, Z, DRAW_MAX = range(5)
"""Columns of a step's verdict table, one row per sequence of the batch."""


class StepChecks:
    """One step's provenance checks on every rank: the verdict table filled pass by pass, then `finish`.

    Rank r holds the rows r, r + world, ... of the batch (`local`); `table` [B, 4] has this rank's rows
    until a collective sums it over ranks (each row is filled by exactly one rank).
    """

    def __init__(self, cfg: RunConfig, strategy, tokenizer, batch: TrainBatch, step: int, share_prompt: bool):
        trust, sampling = cfg.trust, cfg.sampling
        worker_dtype = cfg.rollout.dtype or cfg.model.dtype
        tolerance, once = draw_tolerance(trust, worker_dtype, cfg.model.dtype)
        self.trust = trust.model_copy(update={"draw_tolerance": tolerance, "draw_tolerance_once": once})
        self.algo, self.strategy, self.batch, self.step = cfg.algorithm, strategy, batch, step
        self.share_prompt = share_prompt
        self.rank, self.world = strategy.rank, strategy.world_size
        self.mine = torch.arange(self.rank, batch.num_sequences, self.world)
        self.local = batch.rows(self.mine)
        self.fn = functools.partial(token_statistics, temperature=sampling.temperature, top_p=sampling.top_p,
                                    top_k=sampling.top_k)  # fmt: skip
        self.table = torch.zeros(batch.num_sequences, 5)
        self.pending = torch.ones(self.local.num_sequences, dtype=torch.bool)
        """Local rows without a verdict yet."""
        self.reduced = torch.zeros(batch.num_sequences, dtype=torch.bool)
        """Rows of `table` already summed over ranks."""
        self.kept = list(strategy.kept)
        """Versions whose weights check their groups (before the step keeps the current one)."""
        drawn = None
        if self.trust.verify_draws:  # rows checked under the weights that drew them: their seeded tokens
            drawn = ~self.local.draw_uniforms(batch.rows_of_version(step, *self.kept)[self.mine]).isnan()
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.special = special_token_rows(self.local.input_ids, self.local.completion_mask,
                                          tokenizer.all_special_ids, stop_ids, drawn)  # fmt: skip

    # ------------------------------------------------------------------ separate forwards

    def check_apart(self, shared: bool) -> None:
        """The no-grad forwards of this step: groups of kept versions under their weights, and the current
        version's rows too unless `shared` (then they wait for the training forward)."""
        mine, kept = self.mine, self.kept
        passes = [] if shared else [(torch.ones(self.local.num_sequences, dtype=torch.bool), self.step)]
        if kept:  # ZeRO <= 2 (nothing is kept under ZeRO-3): no collectives in a forward, a rank may skip a pass
            by_version = {v: self.batch.rows_of_version(v)[mine] for v in kept}
            passes = [(rows, v) for v, rows in by_version.items() if rows.any()]
            rest = ~torch.stack(list(by_version.values())).any(0)
            passes += [(rest, self.step)] if rest.any() and not shared else []
        for rows, version in passes:
            part = self.local.rows(rows)  # draws only where `version` made the sequence (rows() keeps groups whole)
            drawn = self.batch.rows_of_version(version)[mine][rows]
            u = part.draw_uniforms(drawn).to(self.strategy.device) if self.trust.verify_draws else None
            lengths = part.prompt_lengths if self.share_prompt else None
            context = self.strategy.weights_of(version) if version != self.step else contextlib.nullcontext()
            with context:
                stats = self.strategy.token_statistics(part.input_ids, part.attention_mask, self.fn, NUM_STATS,
                                                       lengths, u).cpu()  # fmt: skip
            self._judge(rows.nonzero().squeeze(-1), stats)

    def _judge(self, local_rows: Tensor, stats: Tensor) -> None:
        """Verdicts of `local_rows` from their statistics [n, L, NUM_STATS] into this rank's rows of the table."""
        part = self.local.rows(local_rows)
        v = check_sequences(stats, part.behaviour_logprobs, part.completion_mask, self.trust, self.special[local_rows])
        self.table[self.mine[local_rows]] = torch.stack([v.codes.float(), v.abs_diff_sum, v.tokens, v.z,
                                                         v.draw_max], dim=1)  # fmt: skip
        self.pending[local_rows] = False

    # ------------------------------------------------------------------ the shared forward

    @staticmethod
    def can_share(cfg: RunConfig, strategy, group_size: int) -> bool:
        """Whether the training forward can give the checks their statistics (same answer on every rank)."""
        trust = cfg.trust
        return trust.enabled and trust.shared_forward and StepChecks.why_apart(cfg, strategy, group_size) is None

    @staticmethod
    def why_apart(cfg: RunConfig, strategy, group_size: int) -> str | None:
        """Why this run's checks need a forward of their own although `trust.shared_forward` asks to share
        the training one (None: they can share it).

        A micro-batch's rows over all ranks must be whole groups (its groups' baselines need all their
        verdicts); batch-scaled advantages need every verdict; a loss normalised by the batch's tokens
        needs an engine that can scale the accumulated gradients at the step.
        """
        algo, rows = cfg.algorithm, cfg.trainer.micro_batch_size * strategy.world_size
        if rows % group_size:
            return f"a micro-batch over all ranks ({rows} rows) is not whole groups of {group_size}"
        if algo.scale_rewards == "batch" and algo.advantage != "dr_grpo":
            return "algorithm.scale_rewards is 'batch' (advantages need every verdict of the batch)"
        if not strategy.can_scale_gradients and scales_with_tokens(algo.loss):
            optimizer = type(strategy.engine.optimizer).__name__
            return f"the {algo.loss} loss is normalised by the batch's tokens and {optimizer} cannot scale gradients"
        return None

    def request(self, chunk: slice) -> StatsRequest | None:
        """Statistics wanted from the forward of local rows `chunk` (None: all of them have verdicts)."""
        pending = self.pending[chunk]
        if not bool(pending.any()):
            return None
        part = self.local.rows(chunk)
        out = torch.zeros(*part.input_ids.shape, NUM_STATS, dtype=torch.float32, device=self.strategy.device)
        drawn = self.batch.rows_of_version(self.step)[self.mine][chunk] & pending
        u = part.draw_uniforms(drawn).to(self.strategy.device) if self.trust.verify_draws else None
        return StatsRequest(self.fn, out, u, pending.to(self.strategy.device))

    def settle(self, chunk: slice, request: StatsRequest | None) -> slice:
        """All ranks, after the forward of local rows `chunk`: their verdicts, summed over ranks for the
        global rows of the chunk (whole groups); returns those global rows."""
        if request is not None:
            rows = torch.arange(chunk.start, min(chunk.stop, self.local.num_sequences))[self.pending[chunk]]
            self._judge(rows, request.out[rows - chunk.start].cpu())
        rows = slice(chunk.start * self.world, min(chunk.stop * self.world, self.batch.num_sequences))
        if self.world > 1:
            part = self.table[rows].to(self.strategy.device)
            dist.all_reduce(part)
            self.table[rows] = part.cpu()
        self.reduced[rows] = True
        return rows

    def masked(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(completion mask [n, L], advantages [n]) of settled global `rows` (whole groups): rejected
        sequences masked out of the loss and of their group's baseline."""
        accepted = self.table[rows, CODE].round() == 0
        mask, rewards = mask_rejected(self.batch.completion_mask[rows], self.batch.rewards[rows], accepted,
                                      self.batch.group_size)  # fmt: skip
        algo = self.algo
        advantages, _ = group_advantages(rewards, self.batch.group_size, algo.advantage, algo.scale_rewards)
        return mask, advantages

    def masked_rewards(self) -> Tensor:
        """[B] the rewards with each rejected sequence's replaced by its group's accepted mean (all settled)."""
        accepted = self.table[:, CODE].round() == 0
        return mask_rejected(self.batch.completion_mask, self.batch.rewards, accepted, self.batch.group_size)[1]

    def known_mask(self) -> Tensor:
        """[B, L] the batch's completion mask with the rejections known so far (all ranks' settled rows)."""
        rejected = (self.table[:, CODE].round() != 0) & self.reduced
        return self.batch.completion_mask * (~rejected).float().unsqueeze(1)

    # ------------------------------------------------------------------ the verdicts

    def finish(self) -> tuple[TrainBatch, dict[str, float], Tensor]:
        """All ranks: (batch with rejected sequences masked out of the loss and their group's baseline,
        metrics, the verdict table summed over ranks)."""
        if self.pending.any():
            raise RuntimeError(f"{int(self.pending.sum())} sequences of this rank were never checked")
        if not self.reduced.all():
            table = self.table.to(self.strategy.device)
            if self.world > 1:
                dist.all_reduce(table)  # every row is filled by exactly one rank
            self.table, self.reduced[:] = table.cpu(), True
        table, batch = self.table, self.batch
        codes = table[:, CODE].round().long()
        mask, rewards = mask_rejected(batch.completion_mask, batch.rewards, codes == 0, batch.group_size)
        batch = dataclasses.replace(batch, completion_mask=mask, rewards=rewards)
        rejected = int((codes != 0).sum())
        checked = batch.rows_of_version(self.step, *self.kept).float().mean()
        seeded = self.trust.verify_draws and batch.seeds is not None and bool((batch.seeds >= 0).all())
        metrics = {
            "trust/masked_sequences": float(rejected),
            "trust/masked_fraction": rejected / batch.num_sequences,
            "trust/mean_abs_logprob_diff": float(table[:, ABS_DIFF_SUM].sum() / table[:, TOKENS].sum().clamp(min=1.0)),
            "trust/typicality_z_max_abs": float(table[:, Z].abs().max()),
            "trust/draws_checked_fraction": float(checked) if seeded else 0.0,
            "trust/draw_distance_max": float(table[:, DRAW_MAX].max()),
        }
        for i, reason in enumerate(REASONS):
            metrics[f"trust/rejected/{reason}"] = float((codes == i + 1).sum())
        return batch, metrics, table


def report_provenance(hub, step: int, groups: list, group_size: int, table: Tensor, metrics: dict) -> None:
    """Rank 0: per-worker verdicts into `metrics` and to the hub (best effort: a failed report is logged)."""
    codes = table[:, CODE].round().long()
    per_worker: dict[str, WorkerVerdicts] = {}
    for g, group in enumerate(groups):
        v = per_worker.setdefault(group.worker_id, WorkerVerdicts(worker_id=group.worker_id, sequences=0))
        for r in range(g * group_size, (g + 1) * group_size):
            v.sequences += 1
            v.abs_logprob_diff_sum += float(table[r, ABS_DIFF_SUM])
            v.tokens += int(table[r, TOKENS])
            if codes[r] != 0:
                reason = REASONS[int(codes[r]) - 1]
                v.rejected[reason] = v.rejected.get(reason, 0) + 1
    for v in per_worker.values():
        name = next(g.worker_name for g in groups if g.worker_id == v.worker_id)
        if v.rejected:
            metrics[f"trust/worker/{name}-{v.worker_id}/masked"] = float(sum(v.rejected.values()))
            log.warning("step %d: masked %d/%d sequences of worker %s (%s): %s", step,
                        sum(v.rejected.values()), v.sequences, v.worker_id, name, v.rejected)  # fmt: skip
    if hub is None:  # a trainer without a hub (tests)
        return
    try:
        hub.report_provenance(ProvenanceReport(step=step, workers=list(per_worker.values())))
    except Exception as e:
        log.warning("could not send provenance verdicts to the hub: %s", e)
