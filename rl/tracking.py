"""Run tracking: W&B (online/offline/disabled), `metrics.jsonl`, and a reward curve PNG in the run dir.

Metric names are the same everywhere (`reward/mean`, `loss/policy`, `eval/accuracy`, ...), so a
person without W&B reads the same numbers from `metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path

from rl.config import RunConfig

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
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
        id_file = self.run_dir / "wandb_run_id"
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

    def plot(self) -> Path | None:
        """reward/accuracy curves as `curves.png` in the run dir."""
        import matplotlib

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
        out = self.run_dir / "curves.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def finish(self) -> None:
        try:
            self.plot()
        except Exception:  # a plot must never fail a finished run
            log.exception("could not draw curves.png")
        if self.wandb is not None:
            self.wandb.finish()
