"""The GRPO training loop: pull scored groups, compute advantages and loss, step, publish.

Reads like the algorithm:

    publish the initial policy (version = optimizer steps applied)
    for each step:
        rank 0 pulls `prompts_per_step` scored groups from the hub (within max_staleness),
        broadcasts them; every rank takes its share of the sequences
        advantages from the group rewards (rl/advantages.py)
        old log-probs once (when several updates per batch), then per update and micro-batch:
            log-probs -> policy_loss (rl/loss.py) -> backward
        optimizer step; publish the new version every `weights.publish_every` steps
        log metrics, checkpoint every `checkpoint.every` steps

DeepSpeed lives behind `DeepSpeedStrategy` (rl/strategy.py); the hub is reached
only from rank 0 through `HubAdmin` (rl/hub/admin.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rl.advantages import group_advantages
from rl.batch import TrainBatch, build_batch, rollout_metrics
from rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rl.config import RunConfig
from rl.hub.admin import HubAdmin
from rl.hub.protocol import EvalRequest
from rl.loss import LossNorm, policy_loss, reduce_metrics
from rl.weights import write_base, write_version

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised inside the loop to stop early and cleanly (checkpoint first)."""


class Trainer:
    def __init__(self, cfg: RunConfig, hub: HubAdmin | None, *, resume: bool = False):
        from transformers import AutoTokenizer

        from rl.strategy import DeepSpeedStrategy

        self.cfg = cfg
        self.run_dir = cfg.resolved_run_dir
        self.policy_dir = self.run_dir / "policy"
        self.strategy = DeepSpeedStrategy(cfg.model, cfg.trainer, with_reference=cfg.algorithm.beta > 0)
        self.is_main = self.strategy.is_main
        self.hub = hub if self.is_main else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.strategy.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.step = 0
        self.published_version = -1
        self.initial_eval: dict[str, float] = {}
        self.final_eval: dict[str, float] = {}
        self.last_checkpoint = -1
        self.health_check = lambda: None  # the launcher installs a check of its child processes
        self.tracker = None
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir}/checkpoints")
            self.step = load_checkpoint(self.strategy, ckpt)["step"]
            log.info("resumed from %s at step %d", ckpt, self.step)
        if self.is_main:
            from rl.tracking import Tracker

            self.tracker = Tracker(cfg, self.run_dir, resume=resume)
        accuracy_terms = [t.name for t in cfg.rewards.terms if t.name in ("math", "reasoning_gym", "code")]
        self.accuracy_term = accuracy_terms[0] if accuracy_terms else None

    # ------------------------------------------------------------------ policy

    def publish(self) -> float:
        """Write the current weights as version `step` and announce it; returns seconds taken."""
        start = time.perf_counter()
        state = self.strategy.gather_state_dict()
        if self.is_main:
            if not (self.policy_dir / "base").is_dir():
                write_base(self.policy_dir, Path(self.strategy.model_path))
            write_version(self.policy_dir, self.step, state, self.cfg.model.dtype)
            self.hub.publish(self.step)
        self.published_version = self.step
        self.strategy.barrier()
        return time.perf_counter() - start

    # ------------------------------------------------------------------ data

    def pull(self) -> tuple[list, dict]:
        """Rank 0 long-polls the hub for a full batch; shows that it waits."""
        waited, stale, skipped, start = 0, 0, 0, time.perf_counter()
        while True:
            batch = self.hub.pull(
                self.cfg.trainer.prompts_per_step,
                self.step,
                timeout_s=10.0,
                skip_zero_variance=self.cfg.algorithm.dynamic_sampling,
            )
            stale += batch.stale_dropped
            skipped += batch.zero_variance_skipped
            if batch.complete:
                break
            waited += 1
            self.health_check()
            if waited % 3 == 0:
                st = self.hub.status()
                log.info(
                    "step %d: waiting for rollouts (%d buffered, %d leased, %d workers)",
                    self.step,
                    st.buffered,
                    st.leased,
                    len(st.workers),
                )
        info = {"wait_s": time.perf_counter() - start, "stale_dropped": stale, "zero_variance_skipped": skipped}
        return batch.groups, info

    def _my_rows(self, batch: TrainBatch) -> TrainBatch:
        world, rank = self.strategy.world_size, self.strategy.rank
        return batch.rows(torch.arange(rank, batch.num_sequences, world))

    # ------------------------------------------------------------------ step

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        algo, mb = self.cfg.algorithm, self.cfg.trainer.micro_batch_size
        advantages, adv_stats = group_advantages(batch.rewards, batch.group_size, algo.advantage, algo.scale_rewards)
        full = batch
        local = self._my_rows(batch)
        local_adv = advantages[self.strategy.rank :: self.strategy.world_size]
        max_tokens = algo.dr_grpo_max_tokens or self.cfg.sampling.max_tokens
        norm = LossNorm.from_batch(full.completion_mask, micro_batch_size=mb * self.strategy.world_size,
                                   max_tokens=max_tokens)  # fmt: skip
        # Every rank must run the same number of forward/backward passes (ZeRO-2/3 collectives):
        # a rank with fewer rows runs zero-loss passes on a dummy row.
        per_rank = math.ceil(full.num_sequences / self.strategy.world_size)
        chunks = [slice(i, i + mb) for i in range(0, per_rank, mb)]
        need_old = algo.num_iterations > 1
        old, ref = [], []
        with torch.no_grad():
            for c in chunks:
                src = local
                if c.start >= local.num_sequences:  # keep collectives matched; the result is unused
                    src, c = full, slice(0, 1)
                if need_old:
                    old.append(self.strategy.token_logprobs(src.input_ids[c], src.attention_mask[c])[0])
                if algo.beta > 0:
                    ref.append(self.strategy.token_logprobs(src.input_ids[c], src.attention_mask[c], reference=True)[0])
        parts, step_stats = [], {}
        for _ in range(algo.num_iterations):
            for i, c in enumerate(chunks):
                if c.start >= local.num_sequences:
                    logp, _ = self.strategy.token_logprobs(full.input_ids[:1], full.attention_mask[:1])
                    self.strategy.backward(logp.sum() * 0.0)
                    continue
                logp, entropy = self.strategy.token_logprobs(
                    local.input_ids[c], local.attention_mask[c], with_entropy=True
                )
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
            step_stats = self.strategy.step()
        metrics = self._all_reduce(parts)
        metrics.update({"grad_norm": step_stats["grad_norm"], "lr": step_stats["lr"]})
        metrics["advantage/zero_variance_groups"] = adv_stats["zero_variance_groups"]
        return metrics

    def _all_reduce(self, parts: list[dict]) -> dict[str, float]:
        merged = reduce_metrics(parts) if self.strategy.world_size == 1 else None
        if merged is not None:
            return merged
        # Sum every key over ranks (max for /max keys), then reduce as one rank would.
        keys = sorted(parts[0])
        summed = {k: torch.stack([p[k].float() for p in parts]) for k in keys}
        local = {k: (v.max() if k.endswith("/max") else v.sum()) for k, v in summed.items()}
        for k, v in local.items():
            dist.all_reduce(v, op=dist.ReduceOp.MAX if k.endswith("/max") else dist.ReduceOp.SUM)
        return reduce_metrics([local])

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Held-out prompts through the workers with the current version (rank 0; blocks until done)."""
        ecfg = self.cfg.eval
        if not self.is_main or ecfg.num_prompts == 0 or self.cfg.data.eval_size == 0:
            return {}
        passes = [("", 1, 0.0)] if ecfg.greedy else []
        if ecfg.samples:
            passes.append(("sampled_", ecfg.samples, self.cfg.sampling.temperature))
        out: dict[str, float] = {}
        start = time.perf_counter()
        for prefix, n, temperature in passes:
            job = self.hub.evaluate(
                EvalRequest(version=self.published_version, num_prompts=ecfg.num_prompts, n=n, temperature=temperature)
            )
            comps = [c for r in job.results for c in r.completions]
            out[f"eval/{prefix}reward"] = sum(c.reward for c in comps) / len(comps)
            out[f"eval/{prefix}response_length"] = sum(c.length for c in comps) / len(comps)
            if self.accuracy_term is not None:
                ok = [
                    [c.components.get(self.accuracy_term, 0.0) >= 1.0 - 1e-6 for c in r.completions]
                    for r in job.results
                ]
                out[f"eval/{prefix}accuracy"] = sum(map(sum, ok)) / len(comps)
                if n > 1:
                    out[f"eval/pass@{n}"] = sum(any(x) for x in ok) / len(ok)
        out["eval/seconds"] = time.perf_counter() - start
        log.info(
            "eval at version %d: %s",
            self.published_version,
            "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in out.items() if k != "eval/seconds"),
        )
        return out

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        cfg = self.cfg
        publish_s = self.publish()
        log.info("published policy version %d (%.1fs)", self.step, publish_s)
        every = cfg.eval.every
        if self.is_main and self.step == 0:
            self.initial_eval = self.evaluate()
            if self.initial_eval:
                self.tracker.log(0, self.initial_eval)
        try:
            while self.step < cfg.trainer.max_steps:
                t0 = time.perf_counter()
                groups, info = self.pull() if self.is_main else (None, None)
                groups, info = self.strategy.broadcast_object((groups, info))
                batch = build_batch(groups, self.pad_id)
                t1 = time.perf_counter()
                metrics = self.train_step(batch)
                train_s = time.perf_counter() - t1
                step_for_data = self.step
                self.step += 1
                if self.step % cfg.weights.publish_every == 0 or self.step == cfg.trainer.max_steps:
                    publish_s = self.publish()
                    metrics["weights/publish_s"] = publish_s
                tokens = float(batch.attention_mask.sum())
                metrics |= rollout_metrics(groups, step_for_data, cfg.sampling.max_tokens, self.accuracy_term)
                metrics |= {
                    "perf/trainer_tokens_per_s": tokens / max(train_s, 1e-9),
                    "perf/step_s": time.perf_counter() - t0,
                    "perf/wait_s": info["wait_s"],
                    "stale_dropped": float(info["stale_dropped"]),
                    "zero_variance_skipped": float(info["zero_variance_skipped"]),
                    "policy_version": float(self.published_version),
                }
                last = self.step == cfg.trainer.max_steps
                if (every and self.step % every == 0) or last:
                    if self.step % cfg.weights.publish_every != 0 and not last:
                        metrics["weights/publish_s"] = self.publish()
                    evals = self.evaluate()
                    metrics |= evals
                    if last:
                        self.final_eval = evals
                if self.is_main:
                    metrics |= self._hub_metrics()
                    self.tracker.log(self.step, metrics)
                    self._print_progress(metrics)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.checkpoint()
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a checkpoint before leaving", self.step)
            self.checkpoint()
            raise
        if self.last_checkpoint != self.step:
            self.checkpoint()
        if self.is_main:
            self.tracker.finish()
        return 0

    def _hub_metrics(self) -> dict[str, float]:
        st = self.hub.status()
        out = {
            "workers": float(len(st.workers)),
            "perf/worker_tokens_per_s": sum(w.tokens_per_s for w in st.workers),
            "hub/stale_dropped_total": float(st.stale_dropped),
        }
        for k, v in st.verifier.items():
            out[k] = v
        return out

    def _print_progress(self, m: dict) -> None:
        acc = m.get("accuracy")
        log.info(
            "step %d/%d  reward %.3f  %sloss %.4f  len %.0f  stale %.1f  trainer %.0f tok/s  workers %d"
            "  (%.1fs, waited %.1fs)",
            self.step,
            self.cfg.trainer.max_steps,
            m["reward/mean"],
            f"acc {acc:.3f} " if acc is not None else "",
            m.get("loss/policy", math.nan),
            m["response_length/mean"],
            m["staleness/mean"],
            m["perf/trainer_tokens_per_s"],
            int(m.get("workers", 0)),
            m["perf/step_s"],
            m["perf/wait_s"],
        )

    def checkpoint(self) -> None:
        self.last_checkpoint = self.step
        ledger = self.hub.ledger() if self.is_main else None
        save_checkpoint(
            self.strategy,
            self.run_dir,
            self.step,
            {"policy_version": self.step},
            ledger,
            self.cfg.checkpoint.keep,
        )

    def export_final(self) -> Path:
        out = self.run_dir / "final"
        self.strategy.save_hf(out, self.tokenizer)
        return out
