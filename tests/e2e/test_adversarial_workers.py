"""Malicious workers beside an honest vLLM worker: a real hub, real HTTP, the real trainer's checks.

The hub serves version 1, a sharpened copy of the tiny model (its final norm scaled, so the
policy has real preferences like a trained model; version 0 is the plain tiny model). An honest
vLLM worker generates with it; malicious clients, each an operator with its own worker token, try:

- forged logprobs (very negative: the largest importance weight), without running the model;
- an injected correct answer (`<answer>N</answer>` computed from the decoded prompt), with the
  true logprobs of that text (a white-box attacker);
- special tokens injected around the answer;
- samples of version 0 claimed as version 1 (a newer version than the weights used);
- cherry-picking: the best 4 of 64 honest samples per prompt (its own run, plain tiny model);
- acting for the honest worker's id, hoarding leases, flooding registrations, oversized and
  slow bodies, non-finite numbers.

Every pulled batch goes through `Trainer.verify` (the check before the optimizer step). Each
attack must be refused by the hub or masked before the optimizer (and its worker quarantined),
the honest worker's sequences must all pass, and no prompt may be lost (the ledger check).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict

import httpx
import pytest
import torch
from helpers.hub import (
    ADMIN,
    OPERATORS,
    WORKER,
    publish_initial_policy,
    start_hub,
    start_worker,
    stop_process,
    write_config,
)
from helpers.rollout import Run

from rl.config import load_config
from rl.hub.data import PromptSet, load_rows
from rl.trainer.batch import build_batch
from rl.wire.admin import HubAdmin
from rl.wire.protocol import Completion, HubError, RegisterRequest, SubmitRequest, TaskResult
from rollout_workers.client import HubClient

pytestmark = pytest.mark.slow

N, MAX_TOKENS, SHARPEN = 4, 16, 12.0
# Attackers send no heartbeats: a long interval keeps them registered (and in status) for the whole module.
HUB = {"lease_ttl_s": 20.0, "heartbeat_interval_s": 60.0, "buffer_size": 16, "max_workers_per_token": 10,
       "max_tasks_per_lease": 4, "max_leased_per_worker": 4, "body_timeout_s": 1.0}  # fmt: skip
TRUST = {"quarantine_min_sequences": 8, "reward_min_groups": 6, "reward_z": 4.0}
HUB_BODY_LIMIT = int(0.5 * 1024 * 1024)  # write_config's hub.max_body_mb


class Battery:
    """The run, the trainer whose `verify` judges every pulled group, and what it decided."""

    def __init__(self, run: Run, trainer, models: dict):
        self.run, self.trainer, self.models = run, trainer, models
        self.masked: dict[str, list[bool]] = defaultdict(list)  # worker id -> per sequence: masked?
        self.names: dict[str, str] = {}

    def pull_and_verify(self, seconds: float) -> None:
        """Pull (one group at a time) and verify for `seconds` (the trainer's side of the run)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.run.check_alive()
            for g in self.run.pull(num_groups=1, timeout_s=1.0):
                batch, _ = self.trainer.verify(build_batch([g], self.trainer.pad_id), [g])
                self.names[g.worker_id] = g.worker_name
                self.masked[g.worker_id] += [bool(batch.completion_mask[i].sum() == 0) for i in range(N)]

    def honest_id(self, timeout: float = 240.0) -> str:
        """The honest worker's id, pulling (and verifying) until some of its groups arrived."""
        deadline = time.monotonic() + timeout
        while "honest" not in self.names.values():
            assert time.monotonic() < deadline, f"no group from the honest worker\n{self.run.tails()}"
            self.pull_and_verify(1.0)
        return next(wid for wid, name in self.names.items() if name == "honest")

    def status(self):
        return {w.worker_id: w for w in self.run.admin.status().workers}


def sharpened(model_dir, out):
    """A copy of the tiny model with its final norm scaled: peaked next-token distributions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(SHARPEN)
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return model.eval()


@pytest.fixture(scope="module")
def battery(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.trainer.loop import Trainer

    run_dir = tmp_path_factory.mktemp("adversarial")
    v1_dir = run_dir / "v1-model"
    v1 = sharpened(tiny_model_dir, v1_dir)
    v0 = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = write_config(
        run_dir, v1_dir, hub=HUB, trust=TRUST, sampling={"n": N, "max_tokens": MAX_TOKENS},
        rewards={"terms": [{"name": "reasoning_gym"}, {"name": "length", "weight": 0.1,
                                                       "params": {"unit": "chars", "max_length": 64, "buffer": 64}}]},
        trainer={"prompts_per_step": 1, "micro_batch_size": 4, "threads": 1},
        **{"async": {"max_staleness": 1000}},
    )  # fmt: skip
    publish_initial_policy(run_dir, tiny_model_dir, version=0)
    publish_initial_policy(run_dir, v1_dir, version=1)  # the hub adopts the latest: version 1
    cfg = load_config(config, [])
    tokenizer = AutoTokenizer.from_pretrained(v1_dir)
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, tokenizer)
    hub = start_hub(config, run_dir / "hub.log")
    admin = HubAdmin(hub.url, ADMIN, patience_s=30.0)
    run = Run(hub, run_dir, v1_dir, cfg, admin, prompts, tokenizer, len(tokenizer))
    trainer = None
    try:
        log = run.logs["honest"] = run_dir / "honest.log"
        run.workers["honest"] = start_worker(hub.url, log, run_dir / "cache-honest", name="honest", engine="vllm",
                                             extra=["--prompts-per-lease", "2"])  # fmt: skip
        trainer = Trainer(cfg, hub=admin)
        trainer.step = 1  # it holds version 1's weights
        yield Battery(run, trainer, {"v0": v0, "v1": v1, "tokenizer": tokenizer})
    finally:
        for proc in run.workers.values():
            stop_process(proc)
        admin.close()
        hub.stop()


# --------------------------------------------------------------------------- attackers


def attacker(battery: Battery, name: str, token: str = WORKER) -> HubClient:
    client = HubClient(battery.run.hub.url, token, max_retry_s=10.0)
    client.register(RegisterRequest(name=name, engine="hf"))
    return client


def true_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt) - 1 :].tolist()


def sample(model, prompt: list[int], count: int) -> list[list[int]]:
    out = model.generate(torch.tensor([prompt]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=MAX_TOKENS, num_return_sequences=count, pad_token_id=0,
                         eos_token_id=2)  # fmt: skip
    seqs = []
    for row in out[:, len(prompt) :].tolist():
        seqs.append(row[: row.index(2) + 1] if 2 in row else row)  # up to and with eos (<|im_end|>, id 2)
    return seqs


def answer_of(run: Run, prompt: list[int]) -> str:
    """What a worker that never runs the model can do with a public dataset: look the question up."""
    return run.prompts.rows[run.prompts.prompt_ids.index(prompt)]["answer"]


def submit_one(client: HubClient, make, version: int) -> int:
    """Lease one task and submit `make(prompt)` for it (the window is open: no waiting)."""
    lease = client.lease(policy_version=version, max_tasks=1)
    assert lease.lease_id is not None, lease
    task = lease.tasks[0]
    result = TaskResult(task_id=task.task_id, completions=make(task.prompt_token_ids))
    client.submit(SubmitRequest(worker_id=client.worker_id, lease_id=lease.lease_id, policy_version=version,
                                results=[result]))  # fmt: skip
    return task.task_id


def lease_and_submit(battery: Battery, client: HubClient, make, groups: int, version: int = 1) -> list[int]:
    """Lease `groups` tasks one at a time and submit `make(prompt) -> completions` for each."""
    done = []
    for _ in range(groups):
        lease = None
        for _ in range(60):
            lease = client.lease(policy_version=version, max_tasks=1)
            if lease.lease_id is not None:
                break
            battery.pull_and_verify(0.5)  # the honest worker filled the window: the trainer drains it
        assert lease is not None and lease.lease_id is not None, lease
        task = lease.tasks[0]
        result = TaskResult(task_id=task.task_id, completions=make(task.prompt_token_ids))
        req = SubmitRequest(worker_id=client.worker_id, lease_id=lease.lease_id, policy_version=version,
                            results=[result])  # fmt: skip
        assert client.submit(req).accepted == [task.task_id]
        done.append(task.task_id)
    return done


def completion(tokens: list[int], logprobs: list[float]) -> Completion:
    return Completion(token_ids=tokens, logprobs=logprobs, finish_reason="stop" if tokens[-1] == 2 else "length")


# --------------------------------------------------------------------------- the battery


def test_sample_attacks_are_masked_and_quarantined(battery):
    tok, v0, v1 = battery.models["tokenizer"], battery.models["v0"], battery.models["v1"]
    torch.manual_seed(0)

    def forged(prompt):  # never runs the model: random text, logprobs made up (max importance weight)
        return [completion([int(t) for t in torch.randint(3, 400, (8,))], [-30.0] * 8) for _ in range(N)]

    def injected(prompt):  # the correct answer, with its true logprobs under the policy
        ids = tok(f"<answer>{answer_of(battery.run, prompt)}</answer>")["input_ids"] + [2]
        return [completion(ids, true_logprobs(v1, prompt, ids)) for _ in range(N)]

    def special(prompt):
        ids = tok(f"<|im_start|><|im_start|>{answer_of(battery.run, prompt)}<|im_start|><|im_end|>")["input_ids"]
        return [completion(ids, true_logprobs(v1, prompt, ids)) for _ in range(N)]

    def old_weights(prompt):  # version 0's samples and logprobs, claimed as version 1
        return [completion(s, true_logprobs(v0, prompt, s)) for s in sample(v0, prompt, N)]

    attacks = {"forged": forged, "injected": injected, "special": special, "old-weights": old_weights}
    clients = {name: attacker(battery, name, OPERATORS[i]) for i, name in enumerate(attacks)}
    for name, make in attacks.items():
        lease_and_submit(battery, clients[name], make, groups=3)
    battery.pull_and_verify(25.0)
    status = battery.status()
    for name, client in clients.items():
        wid = client.worker_id
        assert battery.masked[wid] and all(battery.masked[wid]), (name, battery.masked[wid])
        assert status[wid].quarantined.startswith("provenance"), (name, status[wid])
        with pytest.raises(HubError) as info:
            client.lease(policy_version=1, max_tasks=1)
        assert info.value.reason == "quarantined"
    honest = battery.honest_id()
    # The checks are statistical: honest false positives are rare (0.31% measured on the quickstart,
    # docs/security.md), not impossible; one in this battery is tolerated, quarantine never.
    masked = battery.masked[honest]
    assert masked and sum(masked) <= 1, f"{sum(masked)} of {len(masked)} honest sequences masked"
    assert battery.status()[honest].quarantined == ""


def test_injected_answers_are_atypical_on_every_prompt(tmp_path, tiny_model_dir):
    """The battery's injection on each of its 64 prompts, without the hub: the true answer with its true logprobs
    fails the typicality check at the default threshold, honest samples of the same policy pass it.

    The live test above sees the 3 prompts its attacker happens to lease; this one sees them all (measured:
    injected z 5.07 to 7.18, median 6.10; honest |z| at most 2.64: the old default 6.0 let 29 of 64 through).
    """
    from transformers import AutoTokenizer

    from rl.trainer.provenance import REASONS, RECOMPUTED, check_sequences, token_statistics

    v1 = sharpened(tiny_model_dir, tmp_path / "v1")
    cfg = load_config(write_config(tmp_path, tmp_path / "v1", sampling={"n": N, "max_tokens": MAX_TOKENS}), [])
    assert cfg.trust.typicality_z == 4.5  # the default
    tok = AutoTokenizer.from_pretrained(tmp_path / "v1")
    prompts = PromptSet.build(load_rows(cfg.data)[0], cfg.data, tok)
    torch.manual_seed(0)
    codes: dict[str, list[str]] = {"injected": [], "honest": []}
    for prompt, row in zip(prompts.prompt_ids, prompts.rows, strict=True):
        injected = tok(f"<answer>{row['answer']}</answer>")["input_ids"] + [2]
        for kind, seqs in (("injected", [injected]), ("honest", sample(v1, prompt, N))):
            for seq in seqs:
                ids = torch.tensor([prompt + seq])
                with torch.no_grad():
                    stats = token_statistics(v1(ids).logits[:, :-1], ids[:, 1:], cfg.sampling.temperature)
                mask = torch.zeros(ids[:, 1:].shape)
                mask[0, len(prompt) - 1 :] = 1.0
                code = int(check_sequences(stats, stats[..., RECOMPUTED], mask, cfg.trust).codes[0])
                codes[kind].append("ok" if code == 0 else REASONS[code - 1])
    assert Counter(codes["injected"]) == {"atypical_unlikely": len(prompts.rows)}
    assert Counter(codes["honest"]) == {"ok": N * len(prompts.rows)}


def test_cherry_picking_is_a_reward_outlier(tmp_path, tiny_model_dir):
    """Best-of-64 honest samples beside two honest clients: each sequence is a true sample of the policy
    (no per-sequence check can see it), but its rewards are far above the others'; the hub quarantines it.

    Its own small run: the plain tiny model spreads its samples widely (the sharpened one of the battery is
    nearly deterministic, so there is nothing to pick from), and the reward is the length term alone.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(
        tmp_path, tiny_model_dir, sampling={"n": N, "max_tokens": MAX_TOKENS},
        rewards={"terms": [{"name": "length", "params": {"unit": "chars", "max_length": 64, "buffer": 64}}]},
        trust={"reward_min_groups": 6, "reward_z": 4.0}, hub={"heartbeat_interval_s": 60.0},
        **{"async": {"max_staleness": 1000}},
    )  # fmt: skip
    publish_initial_policy(tmp_path, tiny_model_dir)
    hub = start_hub(config, tmp_path / "hub.log")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    try:
        clients = {}
        for name in ("honest-1", "honest-2", "picker"):
            clients[name] = HubClient(hub.url, OPERATORS[0] if name == "picker" else WORKER, max_retry_s=10.0)
            clients[name].register(RegisterRequest(name=name, engine="hf"))

        def honest(prompt):
            return [completion(s, true_logprobs(model, prompt, s)) for s in sample(model, prompt, N)]

        def best_of_64(prompt):  # the shortest answers score best on the length reward
            seqs = sorted(sample(model, prompt, 64), key=lambda s: len(tok.decode(s, skip_special_tokens=True)))
            return [completion(s, true_logprobs(model, prompt, s)) for s in seqs[:N]]

        with HubAdmin(hub.url, ADMIN) as admin:
            for _ in range(10):
                for name, client in clients.items():
                    if not admin.status().quarantined:
                        submit_one(client, best_of_64 if name == "picker" else honest, version=0)
            time.sleep(2.0)  # the last groups' scoring
            status = {w.name: w for w in admin.status().workers}
        assert status["picker"].quarantined.startswith("reward outlier"), status["picker"]
        assert status["honest-1"].quarantined == "" and status["honest-2"].quarantined == ""
        with pytest.raises(HubError) as info:
            submit_one(clients["picker"], honest, version=0)
        assert info.value.reason == "quarantined"
    finally:
        hub.stop()


def test_protocol_attacks_are_refused(battery):
    url = battery.run.hub.url
    honest_id = next(w.worker_id for w in battery.run.admin.status().workers if w.name == "honest")
    client = attacker(battery, "impostor")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {WORKER}",
                                             "X-Worker-Secret": client.registration.worker_secret}) as c:  # fmt: skip
        for method, path, body in (  # the honest worker's id, same token, the impostor's own secret
            ("POST", f"/v1/workers/{honest_id}/heartbeat", {"policy_version": 1}),
            ("POST", "/v1/leases", {"worker_id": honest_id, "policy_version": 1}),
            ("DELETE", f"/v1/workers/{honest_id}", None),
        ):
            r = c.request(method, path, json=body)
            assert r.status_code == 403 and r.json()["reason"] == "bad_worker_secret", path
        r = c.post(f"/v1/workers/{client.worker_id}/heartbeat", content=b'{"policy_version":1,"tokens_per_s":1e999}',
                   headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 422
        r = c.post("/v1/rollouts", content=b"x" * (HUB_BODY_LIMIT + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413

        def slow():
            yield b'{"worker_id": "'
            time.sleep(HUB["body_timeout_s"] + 1.0)
            yield b'x"}'

        r = c.post("/v1/leases", content=slow(), headers={"content-type": "application/json"})
        assert r.status_code == 408
    hoard = client.lease(policy_version=1, max_tasks=4096)
    assert len(hoard.tasks) <= HUB["max_tasks_per_lease"]
    flood, answer = [], None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {WORKER}"}) as c:
        for _ in range(HUB["max_workers_per_token"] + 1):
            answer = c.post("/v1/workers", json={"name": "flood"})
            if answer.status_code != 200:
                break
            flood.append(answer.json())
        assert answer.status_code == 429 and answer.json()["reason"] == "too_many_workers"
        for w in flood:
            c.delete(f"/v1/workers/{w['worker_id']}", headers={"X-Worker-Secret": w["worker_secret"]})
    assert client.leave()
    assert battery.status()[honest_id].quarantined == ""


def test_no_prompt_lost(battery):
    """Tasks of quarantined and departed attackers went back to the queue; the honest worker served them."""
    battery.pull_and_verify(10.0)
    battery.run.check_ledger()
    counts = Counter(battery.names[g.worker_id] for g in battery.run.pulled)
    assert counts["honest"] > 0, counts
