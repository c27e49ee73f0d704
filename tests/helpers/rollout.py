"""Helpers for tests/e2e/test_rollout_e2e.py: the run under test and HF reference logprobs.

`Run` bundles one real hub process, its worker processes and a stand-in trainer
(`rl.wire.admin.HubAdmin` pulling batches with the admin token, as rank 0 does).
Every pulled group is kept, so a test can check the hub's ledger against what
the trainer really received.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers.hub import HubProcess
from rl.config import RunConfig
from rl.hub.data import PromptSet
from rl.weights.store import WEIGHTS_FILE, version_dir
from rl.wire.admin import HubAdmin
from rl.wire.protocol import HubStatus, ScoredGroup


@dataclass
class Run:
    hub: HubProcess
    run_dir: Path
    model_dir: Path
    cfg: RunConfig
    admin: HubAdmin
    prompts: PromptSet
    tokenizer: object
    vocab_size: int
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    pulled: list[ScoredGroup] = field(default_factory=list)
    """Every group the stand-in trainer received, in order."""
    step: int = 0
    """The step batches are pulled for (= the latest version published)."""
    references: dict[int, torch.nn.Module] = field(default_factory=dict)

    # ------------------------------------------------------------------ trainer side

    def pull(self, num_groups: int = 2, timeout_s: float = 2.0) -> list[ScoredGroup]:
        batch = self.admin.pull(num_groups, self.step, timeout_s=timeout_s)
        self.pulled.extend(batch.groups)
        return batch.groups

    def pull_until(self, done: Callable[[list[ScoredGroup]], bool], timeout: float, what: str) -> list[ScoredGroup]:
        """Pull batches until `done(groups pulled by this call)`; returns those groups."""
        groups: list[ScoredGroup] = []
        deadline = time.monotonic() + timeout
        while not done(groups):
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")
            groups += self.pull()
        return groups

    @contextlib.contextmanager
    def pulling(self) -> Iterator[None]:
        """Keep pulling batches in a background thread (a trainer that never stops)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.pull(timeout_s=0.5)

        thread = threading.Thread(target=loop, name="trainer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    # ------------------------------------------------------------------ observing

    def status(self) -> HubStatus:
        return self.admin.status()

    def by_name(self) -> dict[str, object]:
        return {w.name: w for w in self.status().workers}

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.workers.items() if p.poll() is not None}
        if self.hub.proc.poll() is not None or dead:
            raise AssertionError(f"a process died (hub rc={self.hub.proc.poll()}, workers {dead})\n{self.tails()}")

    def tails(self, chars: int = 2500) -> str:
        parts = [("hub", self.hub.log), *self.logs.items()]
        return "\n".join(f"--- {name} log ---\n{path.read_text(errors='replace')[-chars:]}" for name, path in parts)

    def check_ledger(self) -> None:
        """Every task id handed out is consumed exactly once or still pending: none lost, none twice."""
        ledger = self.admin.ledger()
        ids = [g.task_id for g in self.pulled]
        twice = sorted(k for k, v in Counter(ids).items() if v > 1)
        assert not twice, f"task ids pulled twice: {twice}"
        assert ledger.consumed == len(ids)
        pending = set(ledger.pending)
        assert not pending & set(ids), "a consumed task is still pending"
        assert pending | set(ids) == set(range(ledger.position)), "handed-out tasks went missing"

    # ------------------------------------------------------------------ references

    def reference(self, version: int) -> torch.nn.Module:
        """fp32 HF model with the published weights of `version` (loaded once)."""
        from transformers import AutoModelForCausalLM

        if version in self.references:
            return self.references[version]
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        state = load_file(str(version_dir(self.run_dir / "policy", version) / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("lm_head.") for k in missing)
        self.references[version] = model
        return model

    @torch.no_grad()
    def reference_logprobs(self, version: int, prompt: list[int], tokens: list[int]) -> list[float]:
        logits = self.reference(version)(torch.tensor([prompt + tokens])).logits[0].float()
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()

    def logprob_error(self, group: ScoredGroup, version: int) -> float:
        """Largest |worker logprob - HF fp32 logprob of `version`| over the group's tokens."""
        return max(
            abs(a - b)
            for c in group.completions
            for a, b in zip(
                c.logprobs, self.reference_logprobs(version, group.prompt_token_ids, c.token_ids), strict=True
            )
        )
