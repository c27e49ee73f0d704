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
        self.hub_contributors: list = []
        """The hub's `ContributorStatus` rows as last read (rank 0's status call each step), for the table."""
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
        except OSError as e:  # e.g. a full disk: already reported by what failed first
            log.warning("could not draw %s: %s", self.paths.curves, e)
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
        """W&B table `contributions/table` (`contribution_table`), logged on the last step's row."""
        import wandb

        lines = self.paths.receipts.read_text().splitlines() if self.paths.receipts.is_file() else []
        rows = contribution_table([json.loads(line) for line in lines if line.strip()], self.hub_contributors)
        if rows:
            table = wandb.Table(columns=TABLE_COLUMNS, data=[[r[c] for c in TABLE_COLUMNS] for r in rows])
            self.wandb.log({"contributions/table": table})


TABLE_COLUMNS = ["contributor", "trained_groups", "trained_samples", "trained_tokens", "share", "masked_samples",
                 "masked_tokens", "masked_rate", "submitted_groups", "rejected_groups", "rejected_rate",
                 "quarantined_s", "first_step", "last_step", "versions", "first_seen", "last_seen"]  # fmt: skip


def contribution_table(records: list[dict], hub: list = ()) -> list[dict]:
    """Per contributor, from receipts.jsonl's records: what the receipts signed (trained groups, samples, tokens,
    share of tokens), what was masked (samples, tokens, rate of the checked samples), the first and last step
    with trained work, and the policy versions it was generated with ("low-high"); from the hub's status rows
    (`hub`, `ContributorStatus`): submitted and rejected groups, the rejected rate, quarantined seconds, and
    first and last seen (UTC). The columns of `rl contributions RUN_DIR`'s table."""
    rows: dict[str, dict] = {}

    def row(contributor: str) -> dict:
        return rows.setdefault(contributor, {"contributor": contributor, "trained_groups": 0, "trained_samples": 0,
                                             "trained_tokens": 0, "masked_samples": 0, "masked_tokens": 0,
                                             "submitted_groups": 0, "rejected_groups": 0, "quarantined_s": 0.0,
                                             "first_seen": "", "last_seen": "", "steps": [],
                                             "version_list": []})  # fmt: skip

    for h in hub:
        c = h.counts
        row(h.contributor).update(submitted_groups=int(c.get("submitted_groups", 0)),
                                  rejected_groups=int(c.get("rejected_groups", 0)),
                                  quarantined_s=c.get("quarantined_s", 0.0), first_seen=_utc(c.get("first_seen")),
                                  last_seen=_utc(c.get("last_seen")))  # fmt: skip

    for record in records:
        for e in record["entries"]:
            r = row(e["contributor"])
            r["trained_groups"] += 1
            r["trained_samples"] += e["samples"]
            r["trained_tokens"] += e["tokens"]
            r["steps"].append(record["step"])
            r["version_list"].append(e["policy_version"])
        for m in record.get("masked", []):
            r = row(m["contributor"])
            r["masked_samples"] += sum(m["reasons"].values())
            r["masked_tokens"] += sum(m.get("tokens", {}).values())
    total = sum(r["trained_tokens"] for r in rows.values())
    for r in rows.values():
        checked = r["trained_samples"] + r["masked_samples"]
        offered = r["submitted_groups"] + r["rejected_groups"]
        r["rejected_rate"] = r["rejected_groups"] / offered if offered else 0.0
        steps, versions = r.pop("steps"), r.pop("version_list")
        r.update(share=r["trained_tokens"] / total if total else 0.0,
                 masked_rate=r["masked_samples"] / checked if checked else 0.0,
                 first_step=min(steps, default=0), last_step=max(steps, default=0),
                 versions=f"{min(versions)}-{max(versions)}" if versions else "")  # fmt: skip
    return sorted(rows.values(), key=lambda r: (-r["trained_tokens"], r["contributor"]))


def _utc(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


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
