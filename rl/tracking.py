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

            self.wandb = wandb.init(
                project=wcfg.project,
                entity=wcfg.entity,
                name=wcfg.run_name or cfg.run_name,
                mode=wcfg.mode,
                dir=str(self.run_dir),
                config=cfg.model_dump(mode="json", by_alias=True),
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
        }
        with open(self.batches_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        """reward/accuracy curves as `curves.png` in the run dir (None without matplotlib, e.g. a bare GPU image)."""
        try:
            import matplotlib
        except ImportError:
            log.info("matplotlib is not installed: no curves.png (metrics.jsonl has every step)")
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in ("reward/mean", "accuracy", "eval/accuracy", "eval/accuracy_greedy") if any(
            k in r and r[k] is not None for r in self.history)]  # fmt: skip
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            pts = [(r["step"], r[k]) for r in self.history if r.get(k) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if k.startswith("eval") else None, label=k)
        ax.set_xlabel("step")
        ax.legend()
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
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


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
