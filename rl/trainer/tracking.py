"""Run tracking: W&B (online/offline/disabled), `metrics.jsonl`, `batches.jsonl`, a curve PNG, the progress line.

Metric names are the same everywhere (`reward/mean`, `loss/policy`, `eval/accuracy`, ...), so a
person without W&B reads the same numbers from `metrics.jsonl` (one record per step; step 0
holds the evaluation before training). `batches.jsonl` says which prompts each step trained
on (task ids, dataset row indices, the policy version and worker of each group): the data
provenance of a run, and what the resume tests compare. Rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path

from rl.config import RunConfig
from rl.rundir import RunDir

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.paths = RunDir(self.run_dir)
        self.path = self.paths.metrics
        self.batches_path = self.paths.batches
        self.history: list[dict] = []
        if resume and self.path.is_file():
            self.history = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.wandb = None
        wcfg = cfg.logging.wandb
        if wcfg.mode != "disabled":
            import wandb

            run_key = self.paths.run_key_pub  # receipts verify against it (docs/contributions.md)
            meta = {"run_key": run_key.read_text().strip()} if run_key.is_file() else {}

            self.wandb = wandb.init(
                project=wcfg.project,
                entity=wcfg.entity,
                name=wcfg.run_name or cfg.run_name,
                mode=wcfg.mode,
                dir=str(self.run_dir),
                config=cfg.model_dump(mode="json", by_alias=True) | meta,
                resume="allow" if resume else None,
                id=self._run_id(resume),
            )

    def _run_id(self, resume: bool) -> str | None:
        id_file = self.paths.wandb_run_id
        if resume and id_file.is_file():
            return id_file.read_text().strip()
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id)
        return run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, **clean}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_batch(self, step: int, groups: list) -> None:
        """Which groups (`ScoredGroup`s) optimizer step `step` trained on."""
        record = {
            "step": step,
            "task_ids": [g.task_id for g in groups],
            "row_indices": [g.row_index for g in groups],
            "versions": [g.policy_version for g in groups],
            "workers": [g.worker_name for g in groups],
            "contributors": [g.contributor or f"worker:{g.worker_id}" for g in groups],
        }
        with open(self.batches_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None and (step == 1 or step % EPISODE_TABLE_STEPS == 0):
            self.log_episodes(step, groups)

    def log_episodes(self, step: int, groups: list) -> None:
        """W&B table `episodes/table` of an environment run: up to `EPISODE_TABLE_ROWS` of the step's episodes,
        with their turns, tool calls, tool errors and seconds, observation tokens and grade."""
        import wandb

        cols = ["turns", "tool_calls", "tool_errors", "tool_s", "observation_tokens"]
        data = [[step, g.task_id, j, *(c.components.get(k, 0.0) for k in cols), c.reward, g.worker_name]
                for g in groups for j, c in enumerate(g.completions) if c.turns][:EPISODE_TABLE_ROWS]  # fmt: skip
        if data:
            table = wandb.Table(columns=["step", "task", "episode", *cols, "grade", "worker"], data=data)
            self.wandb.log({"episodes/table": table}, step=step)

    def plot(self) -> Path | None:
        """`curves.png` in the run dir (None without matplotlib, e.g. a bare GPU image): training reward and
        accuracy per step, raw (faint) and smoothed (a trailing mean over `SMOOTH_STEPS`), and every eval."""
        try:
            import matplotlib
        except ImportError:
            log.info("matplotlib is not installed: no curves.png (metrics.jsonl has every step)")
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> tuple[list[int], list[float]]:
            pts = [(r["step"], r[key]) for r in self.history if r.get(key) is not None]
            return [p[0] for p in pts], [p[1] for p in pts]

        train = [(k, series(k)) for k in ("reward/mean", "accuracy") if series(k)[0]]
        evals = [(k, series(k)) for k in ("eval/accuracy", "eval/reward") if series(k)[0]]
        if not train and not evals:
            return None
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (key, (steps, values)) in enumerate(train):
            color = f"C{i}"
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, trailing_mean(values, SMOOTH_STEPS), color=color, linewidth=2.2,
                    label=f"{key} (train, mean of last {SMOOTH_STEPS} steps)")  # fmt: skip
        for i, (key, (steps, values)) in enumerate(evals, start=len(train)):
            ax.plot(steps, values, color=f"C{i}", marker="o", linewidth=2, label=f"{key} (held-out, greedy)")
            for x, y in zip(steps, values, strict=True):
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(f"{self.paths.root.name}: faint lines are per-step values")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        out = self.paths.curves
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self, exit_code: int = 0) -> None:
        """Draw curves.png and close the W&B run (also after an interruption or a failure)."""
        try:
            self.plot()
        except Exception:  # a plot must never fail a finished run
            log.exception("could not draw curves.png")
        if self.wandb is not None:
            try:
                self.log_contributions()
            except Exception:  # a table must never fail a finished run
                log.exception("could not log the contributions table to W&B")
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None

    def log_contributions(self) -> None:
        """W&B table `contributions/table`: per contributor, the groups, samples and tokens the run's receipts
        (receipts.jsonl) signed, and the share of tokens; `rl contributions RUN_DIR` has the full report."""
        import wandb

        totals: dict[str, list[int]] = {}
        lines = self.paths.receipts.read_text().splitlines() if self.paths.receipts.is_file() else []
        for line in lines:
            for e in json.loads(line)["entries"]:
                row = totals.setdefault(e["contributor"], [0, 0, 0])
                row[0], row[1], row[2] = row[0] + 1, row[1] + e["samples"], row[2] + e["tokens"]
        if totals:
            total = sum(t for _, _, t in totals.values())
            data = [[c, g, s, t, t / total] for c, (g, s, t) in sorted(totals.items(), key=lambda kv: -kv[1][2])]
            table = wandb.Table(columns=["contributor", "groups", "samples", "tokens", "share"], data=data)
            self.wandb.log({"contributions/table": table})


SMOOTH_STEPS = 5
"""Steps averaged by the smoothed curves of curves.png."""
EPISODE_TABLE_STEPS = 10
"""An environment run logs a W&B table of sample episodes at step 1 and every this many steps."""
EPISODE_TABLE_ROWS = 16


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


class Progress:
    """The console line of each step; its ETA leaves out the first step (it includes worker start-up)."""

    def __init__(self, first_step: int, max_steps: int):
        self.first_step, self.max_steps = first_step, max_steps
        self.started = 0.0

    def line(self, step: int, m: dict[str, float]) -> str:
        done = step - self.first_step
        eta = ""
        if done == 1:
            self.started = time.perf_counter()
        elif done > 1 and step < self.max_steps:
            eta_s = (time.perf_counter() - self.started) / (done - 1) * (self.max_steps - step)
            eta = f" | ETA {_duration(eta_s)}"
        acc = f" acc {m['accuracy']:.3f}" if m.get("accuracy") is not None else ""
        loss = m.get("loss/policy")
        loss = math.nan if loss is None else loss
        return (
            f"step {step}/{self.max_steps} | reward {m['reward/mean']:.3f}{acc} | loss {loss:.4f}"
            f" | len {m['response_length/mean']:.0f} | stale {m['staleness/mean']:.1f} (max {m['staleness/max']:.0f})"
            f" | {m['perf/step_s']:.1f}s, waited {m['perf/wait_s']:.1f}s | {int(m.get('workers', 0))} workers{eta}"
        )


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"
