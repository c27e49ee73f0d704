"""The GRPO training loop: pull scored groups, compute advantages and loss, step, publish.

    publish the initial policy (version = optimizer steps applied)
    for each step:
        rank 0 pulls `prompts_per_step` scored groups from the hub and broadcasts them
        per update and micro-batch: log-probs -> policy_loss (rl/trainer/loss.py) -> backward,
            the first forward also giving the provenance checks' statistics: forged sequences are
            masked out of the loss and their group's baseline (rl/trainer/verify.py, provenance.py)
            before the advantages (rl/trainer/advantages.py) and the backward
        optimizer step; publish every `weights.publish_every` steps; log; checkpoint

DeepSpeed lives behind `DeepSpeedStrategy` (rl/trainer/strategy.py); the hub is reached only
from rank 0 through `HubAdmin` (rl/wire/admin.py). Stopping early (`StopRequest`) happens
between steps, after a checkpoint, at the same step on every rank.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rl.config import RunConfig
from rl.rundir import RunDir
from rl.trainer.advantages import group_advantages
from rl.trainer.batch import TrainBatch, build_batch, eval_metrics, rollout_metrics
from rl.trainer.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from rl.trainer.loss import LossNorm, policy_loss, reduce_metrics, scales_with_tokens
from rl.trainer.publisher import Publisher
from rl.trainer.receipts import Receipts
from rl.trainer.strategy import _GATHER_BUDGET  # bytes gathered at once into a background publication
from rl.trainer.tracking import Progress
from rl.trainer.verify import StepChecks, report_provenance
from rl.trainer.watchdog import hub_view
from rl.weights.files import TensorSpec
from rl.weights.lora import adapter_metadata
from rl.weights.store import PolicyWriter, version_dir, write_base, write_lora_version
from rl.wire.admin import HubAdmin
from rl.wire.protocol import EvalRequest
from rl.wire.waits import pending, stall_counts

log = logging.getLogger(__name__)


LORA_BASE_VERSION = 0
"""With `weights.format: lora` version 0 is published in full; later versions are adapters merged into it."""

EXIT_INTERRUPTED = 130
"""Exit code of a run stopped by SIGINT/SIGTERM (after its checkpoint)."""


_WAIT = "wait"
"""Rank 0 -> other ranks: still waiting on the hub, keep waiting (sent every `_TICK_S`, so no
collective outlives the process-group timeout however long rank 0 waits)."""
_TICK_S = 2.0
"""Longest a stop request or a rank-0 wait goes unnoticed (also the hub long-poll timeout)."""


class StopRequest:
    """Why the run should stop early; set from signal handlers and the launcher's watchdog thread.

    The loop reads it between steps and while it waits on the hub; nothing is interrupted midway:
    it stops after a checkpoint, so a batch the hub handed out is always trained and the
    checkpoint's ledger matches the trainer's step. All ranks agree on the step (`_stop_agreed`).
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code = 0

    def set(self, reason: str, exit_code: int) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code


class Trainer:
    def __init__(self, cfg: RunConfig, hub: HubAdmin | None, *, resume: bool = False, stop: StopRequest | None = None):
        from transformers import AutoTokenizer

        from rl.trainer.strategy import DeepSpeedStrategy

        self.cfg = cfg
        self.run_dir = cfg.resolved_run_dir
        self.paths = cfg.paths
        self.policy_dir = self.paths.policy
        self.strategy = DeepSpeedStrategy(cfg.model, cfg.trainer, with_reference=cfg.algorithm.beta > 0)
        self.share_prompt = cfg.trainer.share_prompt and self.strategy.packing
        self.is_main = self.strategy.is_main
        self.hub = hub if self.is_main else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.strategy.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.step = 0
        self.published_version = -1
        self._told_apart = False
        """Whether the warning that the checks cannot share the training forward was logged."""
        self.publisher: Publisher | None = None
        self.initial_eval: dict[str, float] = {}
        self.final_eval: dict[str, float] = {}
        self.stop = stop or StopRequest()
        self.tracker = None
        self.on_step: Callable[[int], None] = lambda step: None  # the step watchdog's (rl/trainer/watchdog.py)
        self.receipts = Receipts(self.paths, self.hub) if self.is_main else None  # signs each step's trained work
        self.codes: Tensor | None = None  # the last checks' code per sequence (0: passed), for the receipts
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise CheckpointError(f"--resume: no checkpoint under {RunDir(self.run_dir).checkpoints}")
            self.step = load_checkpoint(self.strategy, ckpt)["step"]
            log.info("resumed from %s at step %d", ckpt, self.step)
        self.last_checkpoint = self.step
        if self.is_main:
            from rl.trainer.tracking import Tracker

            self.tracker = Tracker(cfg, self.run_dir, resume=resume)
        accuracy_terms = [t.name for t in cfg.rewards.terms if t.name in ("math", "reasoning_gym", "code")]
        if cfg.data.source.type == "env":
            accuracy_terms = ["correct"]  # an environment's grade: success (where its components have it)
        self.accuracy_term = accuracy_terms[0] if accuracy_terms else None

    # ------------------------------------------------------------------ policy

    def publish(self) -> float:
        """All ranks: hand the current weights to the publisher as version `step` (rl/trainer/publisher.py);
        returns the seconds the loop was blocked (the whole publication unless `weights.background`)."""
        start = time.perf_counter()
        if self.cfg.weights.format == "lora" and self.step > 0:
            self._publish_adapters()
            return time.perf_counter() - start
        wcfg = self.cfg.weights
        shard_bytes = int(wcfg.shard_mb * 2**20)
        tensors = self.strategy.iter_state_dict(shard_bytes if not wcfg.background else _GATHER_BUDGET)
        if self.is_main:
            if self.publisher is None:
                self.publisher = self._make_publisher(shard_bytes)
            self.publisher.publish(self.step, tensors)
        else:
            for _ in tensors:  # the gather's collectives
                pass
        self.published_version = self.step
        self.strategy.barrier()
        return time.perf_counter() - start

    def _publish_adapters(self) -> None:
        """`weights.format: lora`: version `step` is the adapters alone, merged by workers into version 0."""
        adapters = self.strategy.gather_adapter_state()
        if self.is_main:
            self._published()  # the full base version (v0) may still be written in the background
            if not (version_dir(self.policy_dir, LORA_BASE_VERSION) / "manifest.json").is_file():
                raise RuntimeError(
                    f"weights.format lora: the full base version v{LORA_BASE_VERSION} is missing from "
                    f"{self.policy_dir}; workers cannot merge adapters without it"
                )
            metadata = adapter_metadata(self.cfg.trainer.lora, self.step)
            write_lora_version(self.policy_dir, self.step, adapters, metadata, LORA_BASE_VERSION)
            self.hub.publish(self.step)
        self.published_version = self.step
        self.strategy.barrier()

    def _make_publisher(self, shard_bytes: int) -> Publisher:
        if not (self.policy_dir / "base").is_dir():
            write_base(self.policy_dir, Path(self.strategy.model_path))
        dtype = getattr(torch, self.cfg.rollout.dtype or self.cfg.model.dtype)
        layout = [TensorSpec(name, shape, dtype) for name, shape in self.strategy.weight_layout()]
        wcfg = self.cfg.weights
        fmt = "full" if wcfg.format == "lora" else wcfg.format  # lora: only the full base goes through here
        writer = PolicyWriter(self.policy_dir, layout, shard_bytes=shard_bytes, fmt=fmt,
                              keyframe_every=wcfg.keyframe_every)  # fmt: skip
        return Publisher(writer, self.hub.publish, dtype, background=wcfg.background)

    def _published(self) -> None:
        """Rank 0: until the newest version is announced to the hub (before evaluating or checkpointing it)."""
        if self.publisher is not None:
            self.publisher.wait()

    # ------------------------------------------------------------------ data

    def pull(self) -> tuple[list, dict] | None:
        """All ranks: the next full batch from the hub (rank 0 pulls and broadcasts); None if asked to stop."""
        if not self.is_main:
            return self._await_rank0()
        waited, stale, skipped, start = 0, 0, 0, time.perf_counter()
        while True:
            if self.stop.reason is not None:
                return self.strategy.broadcast_object(None)
            batch = self.hub.pull(
                self.cfg.trainer.prompts_per_step,
                self.step,
                timeout_s=_TICK_S,
                skip_zero_variance=self.cfg.algorithm.dynamic_sampling,
            )
            stale += batch.stale_dropped
            skipped += batch.zero_variance_skipped
            if batch.complete:
                break
            self.strategy.broadcast_object(_WAIT)
            waited += 1
            if waited % 6 == 0 and (st := self._hub_status()) is not None:
                log.info("step %d: waiting for rollouts for %.0f s (%s)", self.step, time.perf_counter() - start,
                         hub_view(st))  # fmt: skip
        info = {"wait_s": time.perf_counter() - start, "stale_dropped": stale, "zero_variance_skipped": skipped}
        return self.strategy.broadcast_object((batch.groups, info))

    def _await_rank0(self) -> Any:
        """Ranks > 0: wait (in short collectives) for what rank 0 broadcasts after its `_WAIT`s."""
        while True:
            msg = self.strategy.broadcast_object(None)
            if not (isinstance(msg, str) and msg == _WAIT):
                return msg

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """All ranks: run `fn` on rank 0 in a thread, others wait; None elsewhere or if a stop abandons it."""
        if not self.is_main:
            self._await_rank0()
            return None
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except Exception as e:  # re-raised in the main thread
                box["error"] = e

        if self.stop.reason is None:
            thread = threading.Thread(target=target, name="rl-rank0-wait", daemon=True)
            thread.start()
            while thread.is_alive() and self.stop.reason is None:
                thread.join(_TICK_S)
                if thread.is_alive():
                    self.strategy.broadcast_object(_WAIT)
        self.strategy.broadcast_object("done")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _my_rows(self, batch: TrainBatch) -> TrainBatch:
        world, rank = self.strategy.world_size, self.strategy.rank
        return batch.rows(torch.arange(rank, batch.num_sequences, world))

    # ------------------------------------------------------------------ step

    def train_step(self, batch: TrainBatch, checks: StepChecks | None = None) -> dict[str, float]:
        """All ranks: advantages, loss and backward of every micro-batch, optimizer step.

        With `checks` (`trust.shared_forward`) a micro-batch's first forward also gives the provenance
        statistics of its unchecked rows, whose verdicts mask its rows and set its groups' advantages
        before its backward (rl/trainer/verify.py); without, `batch` comes already checked.
        """
        algo, mb = self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        rank, world, device = self.strategy.rank, self.strategy.world_size, self.strategy.device
        full = batch
        local = self._my_rows(batch).to(device)  # the loss meets the log-probs on the GPU
        if checks is None:
            advantages, adv_stats = group_advantages(batch.rewards, batch.group_size, algo.advantage,
                                                     algo.scale_rewards)  # fmt: skip
            local_adv = advantages[rank::world].to(device)
        else:
            local_adv = torch.zeros(local.num_sequences, device=device)
        max_tokens = algo.dr_grpo_max_tokens or self.cfg.sampling.max_tokens
        # Every rank must run the same number of forward/backward passes (ZeRO-2/3 collectives):
        # a rank with fewer rows runs zero-loss passes on a dummy row.
        per_rank = math.ceil(full.num_sequences / world)
        chunks = [slice(i, i + mb) for i in range(0, per_rank, mb)]
        need_old = algo.num_iterations > 1
        share = self._share_prompt(full)

        def logprobs(src: TrainBatch, rows: slice, **kw) -> tuple[Tensor, Tensor | None]:
            lengths = src.prompt_lengths[rows] if share else None
            return self.strategy.token_logprobs(src.input_ids[rows], src.attention_mask[rows],
                                                prompt_lengths=lengths, **kw)  # fmt: skip

        def settle(c: slice, request) -> None:  # the chunk's verdicts (all ranks) -> its masks and advantages
            rows = checks.settle(c, request)
            mask, adv = checks.masked(rows)
            own = torch.arange(c.start, min(c.stop, local.num_sequences))
            local.completion_mask[own] = mask[own * world + rank - rows.start].to(device)
            local_adv[own] = adv[own * world + rank - rows.start].to(device)

        old, ref = [], []
        with torch.no_grad():
            for c in chunks:
                src, rows = (full, slice(0, 1)) if c.start >= local.num_sequences else (local, c)
                if need_old:  # keep collectives matched on a dummy row; the result is unused
                    request = checks.request(c) if checks is not None else None
                    old.append(logprobs(src, rows, stats=request)[0])
                    if checks is not None:
                        settle(c, request)
                if algo.beta > 0:
                    ref.append(logprobs(src, rows, reference=True)[0])
        known = full.completion_mask if checks is None else checks.known_mask()
        norm = LossNorm.from_batch(known, micro_batch_size=mb * world, max_tokens=max_tokens)
        parts, step_stats, grad_scale = [], {}, 1.0
        for iteration in range(algo.num_iterations):
            for i, c in enumerate(chunks):
                first = checks is not None and not need_old and iteration == 0
                request = checks.request(c) if first else None
                if c.start >= local.num_sequences:
                    logp, _ = logprobs(full, slice(0, 1))
                    if first:
                        settle(c, request)
                    self.strategy.backward(logp.sum() * 0.0)
                    continue
                logp, entropy = logprobs(local, c, with_entropy=True, stats=request)
                if first:
                    settle(c, request)
                loss, metrics = policy_loss(
                    logp,
                    old[i] if need_old else None,
                    local_adv[c],
                    local.completion_mask[c],
                    algo,
                    behaviour_logprobs=local.behaviour_logprobs[c] if algo.is_mode != "none" else None,
                    ref_logprobs=ref[i] if algo.beta > 0 else None,
                    entropy=entropy,
                    loss_norm=norm,
                )
                self.strategy.backward(loss)
                parts.append(metrics)
            if self.cfg.trust.enabled:  # the weights about to be replaced: checks of this version's groups
                self.strategy.keep_version(self.step, self.cfg.trust.kept_versions)
            if checks is not None and scales_with_tokens(algo.loss):
                # The losses were divided by the tokens known before the verdicts; the batch's are fewer if any
                # sequence was rejected since (the same gradient as dividing by them: the loss is linear in it).
                tokens = float(checks.known_mask().sum())
                grad_scale = norm.total_tokens / tokens if tokens > 0 else 1.0
            step_stats = self.strategy.step(grad_scale)
        metrics = self._all_reduce(parts)
        for key in ("loss/policy", "loss/kl"):
            metrics[key] *= grad_scale
        if checks is not None:
            adv_stats = group_advantages(checks.masked_rewards(), batch.group_size, algo.advantage,
                                         algo.scale_rewards)[1]  # fmt: skip
        metrics.update({"grad_norm": step_stats["grad_norm"], "lr": step_stats["lr"]})
        metrics["advantage/zero_variance_groups"] = adv_stats["zero_variance_groups"]
        return metrics

    def check_and_train(self, batch: TrainBatch, groups: list) -> tuple[TrainBatch, dict[str, float]]:
        """All ranks: provenance checks and the training step of one batch -> (the batch as checked, metrics).

        `perf/provenance_s` is the checks' own forwards (all of them on the two-forward path, kept versions'
        groups only on the shared one, whose statistics are then part of `perf/train_s`).
        """
        start, self.codes = time.perf_counter(), None
        checks, trust_metrics = self.checks(batch), {}
        shared = checks is not None and StepChecks.can_share(self.cfg, self.strategy, batch.group_size)
        if checks is not None and self.cfg.trust.shared_forward and not shared and not self._told_apart:
            self._told_apart = True
            log.warning("trust.shared_forward: the checks run a forward of their own every step: %s",
                        StepChecks.why_apart(self.cfg, self.strategy, batch.group_size))  # fmt: skip
        if checks is not None:  # forwards of their own: kept versions' groups, and all rows unless shared
            checks.check_apart(shared)
            if not shared:
                batch, trust_metrics = self.verdicts(checks, groups)
        trained = time.perf_counter()
        metrics = self.train_step(batch, checks if shared else None)
        train_s = time.perf_counter() - trained
        if shared:
            batch, trust_metrics = self.verdicts(checks, groups)
        return batch, metrics | trust_metrics | {"perf/provenance_s": trained - start, "perf/train_s": train_s}

    def checks(self, batch: TrainBatch) -> StepChecks | None:
        """All ranks: this step's provenance checks (None when `trust.enabled` is off)."""
        if not self.cfg.trust.enabled:
            return None
        return StepChecks(self.cfg, self.strategy, self.tokenizer, batch, self.step, self._share_prompt(batch))

    def verify(self, batch: TrainBatch, groups: list) -> tuple[TrainBatch, dict[str, float]]:
        """All ranks: provenance checks of every sequence in forwards of their own, before training (the
        two-forward path; `_step` shares the training forward where it can). Returns the batch with
        rejected sequences masked out of the loss and their group's baseline, and the metrics."""
        checks = self.checks(batch)
        if checks is None:
            return batch, {}
        checks.check_apart(shared=False)
        return self.verdicts(checks, groups)

    def verdicts(self, checks: StepChecks, groups: list) -> tuple[TrainBatch, dict[str, float]]:
        """All ranks: the masked batch and the metrics of finished checks; rank 0 reports them to the hub,
        which keeps per-worker statistics and quarantines."""
        batch, metrics, table = checks.finish()
        self.codes = table[:, 0].round().long()
        if self.is_main:
            report_provenance(self.hub, self.step, groups, batch.group_size, table, metrics)
        return batch, metrics

    def _share_prompt(self, batch: TrainBatch) -> bool:
        """Prompt sharing for this batch (same answer on every rank: decided on the full batch)."""
        return self.share_prompt and int(batch.prompt_lengths.min()) >= 1

    def _all_reduce(self, parts: list[dict]) -> dict[str, float]:
        merged = reduce_metrics(parts) if self.strategy.world_size == 1 else None
        if merged is not None:
            return merged
        # Sum every key over ranks (max for /max keys), then reduce as one rank would.
        keys = sorted(parts[0])
        summed = {k: torch.stack([p[k].float() for p in parts]) for k in keys}
        local = {k: (v.max() if k.endswith("/max") else v.sum()) for k, v in summed.items()}
        with pending(f"the other ranks to sum step {self.step + 1}'s metrics", key="trainer collective"):
            for k, v in local.items():
                dist.all_reduce(v, op=dist.ReduceOp.MAX if k.endswith("/max") else dist.ReduceOp.SUM)
        return reduce_metrics([local])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """All ranks: held-out prompts through the workers with the current version; metrics on rank 0.

        Empty when evaluation is off, or when a stop is requested before or during it (abandoned).
        """
        ecfg = self.cfg.eval
        if ecfg.num_prompts == 0 or self.cfg.data.eval_size == 0:
            return {}
        passes = [("", 1, 0.0)] if ecfg.greedy else []
        if ecfg.samples:
            passes.append(("sampled_", ecfg.samples, self.cfg.sampling.temperature))
        if not passes:
            return {}
        start = time.perf_counter()

        def run_passes() -> list:
            self._published()
            requests = [EvalRequest(version=self.published_version, num_prompts=ecfg.num_prompts, n=n,
                                    temperature=temperature) for _, n, temperature in passes]  # fmt: skip
            return [(prefix, self.hub.evaluate(req)) for (prefix, _, _), req in zip(passes, requests, strict=True)]

        jobs = self._on_rank0(run_passes)
        if not self.is_main:
            return {}
        if jobs is None:
            log.warning("evaluation at version %d abandoned: %s", self.published_version, self.stop.reason)
            return {}
        out = eval_metrics(jobs, self.accuracy_term) | {"eval/seconds": time.perf_counter() - start}
        log.info(
            "eval at version %d: %s",
            self.published_version,
            "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in out.items() if k != "eval/seconds"),
        )
        return out

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        """Train until `trainer.max_steps` or a stop request; returns the exit code (0, or the stop's)."""
        exit_code = 1
        try:
            exit_code = self._loop()
            return exit_code
        except KeyboardInterrupt:  # a second signal: leave at once, no checkpoint
            exit_code = EXIT_INTERRUPTED
            raise
        finally:
            if self.publisher is not None:
                try:
                    self.publisher.wait()
                except RuntimeError as e:
                    log.error("%s", e)
            if self.tracker is not None:
                self.tracker.finish(exit_code)

    def _loop(self) -> int:
        cfg = self.cfg
        self.publish()
        if self.step == 0:
            self.initial_eval = self.evaluate()
            if self.initial_eval:
                self.tracker.log(0, self.initial_eval)
        progress = Progress(self.step, cfg.trainer.max_steps)
        while self.step < cfg.trainer.max_steps and not self._stop_agreed():
            t0 = time.perf_counter()
            pulled = self.pull()
            if pulled is None:  # rank 0 was asked to stop while it waited for rollouts
                self.stop.set("stopped by rank 0", EXIT_INTERRUPTED)
                break
            groups, info = pulled
            metrics = self._step(groups, info, t0)
            if self.is_main:
                metrics |= self._hub_metrics() | {f"stalls/{k}": float(n) for k, n in stall_counts().items()}
                self.tracker.log(self.step, metrics)
                self.tracker.log_batch(self.step, groups)
                log.info("%s", progress.line(self.step, metrics))
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.checkpoint()
            self.on_step(self.step)
        if self.last_checkpoint != self.step:
            self.checkpoint()
        if self.stop.reason is not None:
            saved = f"checkpoint {RunDir(self.run_dir).checkpoint(self.step)}" if self.step else "no checkpoint"
            log.warning("stopped at step %d: %s (%s)", self.step, self.stop.reason, saved)
            return self.stop.exit_code
        return 0

    def _step(self, groups: list, info: dict, t0: float) -> dict[str, float]:
        """Train on one pulled batch, publish (and evaluate) as configured; returns the step's metrics."""
        cfg = self.cfg
        batch, metrics = self.check_and_train(build_batch(groups, self.pad_id), groups)
        train_s = metrics["perf/train_s"]
        if self.receipts is not None:  # numbered as metrics.jsonl and batches.jsonl number this step
            metrics |= self.receipts.issue(self.step + 1, groups, batch.completion_mask, self.codes)
        step_for_data = self.step  # the version the trainer held while training this batch
        self.step += 1
        last = self.step == cfg.trainer.max_steps
        evaluate = (cfg.eval.every and self.step % cfg.eval.every == 0) or last
        if self.step % cfg.weights.publish_every == 0 or last or evaluate:
            metrics["weights/publish_blocking_s"] = self.publish()
        if self.publisher is not None:  # the newest version out (a background one: maybe the previous)
            if last:
                self.publisher.wait()  # the last record carries the last version
            metrics |= self.publisher.take_metrics()
        metrics |= rollout_metrics(groups, step_for_data, cfg.sampling.max_tokens, self.accuracy_term)
        metrics |= {
            "perf/trainer_tokens_per_s": float(batch.attention_mask.sum()) / max(train_s, 1e-9),
            "perf/step_s": time.perf_counter() - t0,
            "perf/wait_s": info["wait_s"],
            "stale_dropped": float(info["stale_dropped"]),
            "zero_variance_skipped": float(info["zero_variance_skipped"]),
            "policy_version": float(self.published_version),
        }
        if self.strategy.device.type == "cuda":  # this rank's high-water mark since start (allocated, not cached)
            metrics["perf/gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(self.strategy.device) / 2**30
        if evaluate:
            evals = self.evaluate()
            metrics |= evals
            if last:
                self.final_eval = evals
        return metrics

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (all ranks call this at the same point of every step)."""
        code = self.stop.exit_code if self.stop.reason is not None else 0
        if self.strategy.world_size > 1:
            flag = torch.tensor([code], dtype=torch.long, device=self.strategy.device)
            with pending("the other ranks to agree whether to stop", key="trainer collective"):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
            if code and self.stop.reason is None:
                self.stop.set("stopped by another rank", code)
        return code != 0

    def _hub_status(self):
        """The hub's status, or None (logged) when it cannot be read: hub metrics never stop training."""
        try:
            return self.hub.status()
        except Exception as e:  # a bad answer (HubError bad_response), an unreachable hub, anything
            log.warning("could not read the hub's status (metrics skipped this step): %s", e)
            return None

    def _hub_metrics(self) -> dict[str, float]:
        st = self._hub_status()
        if st is None:
            return {}
        self.tracker.hub_contributors = st.contributors  # the hub's side of the W&B contributions table
        return {
            "workers": float(st.worker_summary.total),
            "perf/worker_tokens_per_s": st.worker_summary.tokens_per_s,
            "hub/stale_dropped_total": float(st.stale_dropped),
            **_worker_weight_times(st.worker_summary),
            **st.verifier,
            **{f"hub/stalls/{k}": float(n) for k, n in st.stall_counts.items()},
            **{f"episodes/{k}": float(v) for k, v in (st.episodes or {}).items()},  # an environment run
        }

    def checkpoint(self) -> None:
        """All ranks: DeepSpeed state, RNG, trainer state, and (rank 0) the hub's ledger at this step."""
        self.last_checkpoint = self.step
        if self.is_main:
            self._published()
        ledger = self.hub.ledger() if self.is_main else None
        state = {"policy_version": self.published_version}
        save_checkpoint(self.strategy, self.run_dir, self.step, state, ledger, self.cfg.checkpoint.keep)

    def export_final(self) -> Path:
        """All ranks: the trained policy as a plain HF directory, `run_dir/final/` (rank 0 writes)."""
        out = self.paths.final
        self.strategy.save_hf(out, self.tokenizer)
        return out


def _worker_weight_times(summary) -> dict[str, float]:
    """Mean over workers of their last policy update's download and load seconds (heartbeats)."""
    if summary.fetch_s == 0 and summary.load_s == 0:
        return {}
    return {"weights/fetch_s": summary.fetch_s, "weights/load_s": summary.load_s}
