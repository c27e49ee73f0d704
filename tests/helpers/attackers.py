"""Attacking operators beside a real `rl train` run (tests/e2e/test_adversarial_operators.py).

Each attacker is a thread of the test process and one operator: one worker token, any number of
registrations, all through the real worker client (`rollout_workers.client.HubClient`).
- `Hoarder`: several registrations lease all the hub grants and never submit; they heartbeat, so the
  hub keeps them (only fair shares and backup leases can save the run, not the heartbeat timeout).
- `Picker`: for each leased task, samples candidates with the current policy (fetched like a worker
  does; or an older one it may still claim, `behind`) under seeds of its own choosing, submits the
  `n` shortest (the length reward's favourites) with their true logprobs, and registers afresh every
  `rotate_every` tasks.
Both record what the hub answered; neither raises: a test reads `errors` and the counters.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path

import httpx
import torch

from helpers.hub import ADMIN, WORKER_TOKENS
from helpers.net import free_port
from rl.sampling import SamplingRule, draws, seed_tensor, uniforms
from rl.wire.client import HubHTTP
from rl.wire.protocol import Completion, HeartbeatRequest, HubError, RegisterRequest, SubmitRequest, TaskResult
from rollout_workers.client import HubClient, HubUnavailable


def known_hub() -> tuple[dict, str]:
    """A run's `hub:` section with the tests' tokens and a fixed port, and the URL it will serve at."""
    port = free_port()
    section = {"port": port, "admin_token": ADMIN, "worker_tokens": WORKER_TOKENS}
    return section, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, stop: threading.Event, timeout: float = 240.0) -> bool:
    deadline = time.monotonic() + timeout
    with HubHTTP(url, ADMIN) as probe:
        while not probe.healthy():
            if stop.wait(0.2) or time.monotonic() > deadline:
                return False
    return True


class Attacker(threading.Thread):
    """One operator (`token`) against the hub at `url`, until `stop()`."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True, name=type(self).__name__)
        self.url, self.token = url, token
        self.halt = threading.Event()
        self.errors: list[str] = []
        """Answers that were not what the attacker wanted (reason, or exception text)."""
        self.details: dict[str, str] = {}
        """The last detail the hub gave with each reason in `errors`."""
        self.opened: list[HubClient] = []

    def client(self, name: str) -> HubClient:
        c = HubClient(self.url, self.token, max_retry_s=3.0, stop_event=self.halt, timeout_s=10.0)
        self.opened.append(c)
        c.register(RegisterRequest(name=name, engine="hf"))
        return c

    def run(self) -> None:
        if not wait_healthy(self.url, self.halt):
            self.errors.append("hub never became healthy")
            return
        while not self.halt.is_set():
            try:
                self.attack()
            except Exception as e:  # noqa: BLE001 - an attacker never dies of an answer; the test reads them
                reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                self.errors.append(reason)
                self.details[reason] = getattr(e, "detail", None) or str(e)
                self.halt.wait(0.3)

    def attack(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        for c in self.opened:
            c.close()


class Hoarder(Attacker):
    def __init__(self, url: str, token: str, registrations: int = 4) -> None:
        super().__init__(url, token)
        self.registrations = registrations
        self.clients: list[HubClient] = []
        self.version = -1
        self.leased_tasks = 0
        """Tasks granted to it over the run (it never returns a result for any)."""

    def attack(self) -> None:
        while len(self.clients) < self.registrations:
            self.clients.append(self.client(f"hoarder-{len(self.clients)}"))
        for c in self.clients:
            self.version = c.heartbeat(HeartbeatRequest(policy_version=self.version)).policy_version
            if self.version >= 0:
                self.leased_tasks += len(c.lease(policy_version=self.version, max_tasks=4096).tasks)
        self.halt.wait(0.25)


class Picker(Attacker):
    def __init__(self, url: str, token: str, policy_dir: Path, cache_dir: Path, candidates: int = 6,
                 rotate_every: int = 2, behind: int = 0) -> None:  # fmt: skip
        """`behind`: samples with (and claims) the version this many before the hub's newest (none before that)."""
        super().__init__(url, token)
        self.policy_dir, self.cache_dir = policy_dir, cache_dir
        self.candidates, self.rotate_every, self.behind = candidates, rotate_every, behind
        self.names: list[str] = []
        """Every registration's name (`picker-<i>`), in order."""
        self.submitted = 0
        """Tasks whose picks the hub accepted."""
        self.refused: list[str] = []
        """Reasons of refused registrations (`quarantined` once the operator is)."""
        self.model, self.tokenizer, self.version = None, None, -1
        self.rng = random.Random(0)
        self.current: HubClient | None = None
        """The live registration (None between two): the heartbeat thread's, never one that left (its client
        would register again on the hub's 404)."""
        self.lock = threading.Lock()
        self.beat = threading.Thread(target=self._heartbeat, daemon=True)

    def attack(self) -> None:
        from rollout_workers.weight_sync import WeightSync

        name = f"picker-{len(self.names)}"
        try:
            c = self.client(name)
        except HubError as e:
            self.refused.append(e.reason)
            self.halt.wait(1.0)
            return
        self.names.append(name)
        with self.lock:
            self.current = c
        if not self.beat.is_alive():
            self.beat.start()
        sync = WeightSync(c, self.cache_dir, hub_policy_dir=self.policy_dir)
        done = 0
        try:
            while done < self.rotate_every and not self.halt.is_set():
                if not self._load(c, sync):
                    self.halt.wait(0.5)
                    continue
                lease = c.lease(policy_version=self.version, max_tasks=1, wait_s=1.0)
                if lease.lease_id is None:
                    continue
                task = lease.tasks[0]
                result = TaskResult(task_id=task.task_id, completions=self.pick(task.prompt_token_ids, lease.sampling))
                req = SubmitRequest(worker_id=c.worker_id, lease_id=lease.lease_id, policy_version=self.version,
                                    results=[result])  # fmt: skip
                self.submitted += len(c.submit(req).accepted)
                done += 1
        finally:
            with self.lock:
                self.current = None
                c.leave(timeout_s=2.0)

    def _heartbeat(self) -> None:
        while not self.halt.wait(0.5):
            with self.lock:
                if self.current is None:
                    continue
                with contextlib.suppress(HubError, HubUnavailable, httpx.HTTPError):  # the main loop sees it
                    self.current.heartbeat(HeartbeatRequest(policy_version=self.version))

    def _load(self, client: HubClient, sync) -> bool:
        """The hub's newest version less `behind`, as a worker gets it (verified files), into a transformers model;
        False while there is no such version yet."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        manifest = client.policy()
        want = manifest.version - self.behind
        if want < 0:
            return False
        if want != self.version:
            local = sync.fetch(manifest if want == manifest.version else client.policy(want))
            self.model = AutoModelForCausalLM.from_pretrained(local.model_dir, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(local.model_dir)
            self.version = local.version
        return True

    @torch.no_grad()
    def pick(self, prompt: list[int], sampling) -> list[Completion]:
        """`self.candidates` seeded draws under seeds it chose; the `n` shortest, with their true logprobs."""
        rule = SamplingRule(sampling.temperature, sampling.top_k, sampling.top_p)
        eos = self.tokenizer.eos_token_id
        seeds = seed_tensor([self.rng.getrandbits(63) for _ in range(self.candidates)])
        ids = torch.tensor([prompt] * self.candidates)
        logprobs = []
        for position in range(sampling.max_tokens):  # rows go on past their eos; cut below
            logits = self.model(ids).logits[:, -1]
            token = draws(logits, rule, uniforms(seeds, torch.full_like(seeds, position)))
            logprobs.append(logits.log_softmax(-1).gather(-1, token[:, None])[:, 0])
            ids = torch.cat([ids, token[:, None]], dim=1)
        found = []
        for row, lp in zip(ids[:, len(prompt) :].tolist(), torch.stack(logprobs, dim=1).tolist(), strict=True):
            end = row.index(eos) + 1 if eos in row else len(row)
            found.append(Completion(token_ids=row[:end], logprobs=lp[:end],
                                    finish_reason="stop" if eos in row else "length"))  # fmt: skip

        # What the hub scores: the text up to a final eos, special tokens included (rl/hub/service.py).
        def text(c: Completion) -> str:
            return self.tokenizer.decode(c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids)

        return sorted(found, key=lambda c: len(text(c)))[: sampling.n]
