"""Test helpers (no tests here; pytest collects tests/<role>/test_*.py).

- `net`: `free_port`, `serve` (an ASGI app on loopback in a thread).
- `hub`: the real hub, as a process (`start_hub`) or in this process behind a fault proxy
  (`LiveHub`), plus run-config writers and a published initial policy.
- `faults`: `FaultProxy`, an ASGI proxy that answers 5xx, cuts or corrupts downloads.
- `policy`: policy stores with several versions (single files, or bf16 shards as full or delta versions),
  HF reference logprobs.
- `mirror`: a real nginx caching weights in front of a hub, and mirrors that damage what they relay.
- `rollout`: `Run`, a hub process + worker processes + a stand-in trainer (tests/e2e/test_rollout_e2e.py).
- `train`: `rl train` run configs and process helpers (tests/e2e/test_train_e2e*.py).
- `sandbox`: the `sandbox_required` fixture; `strategy_worker`: one rank of the 2-rank strategy test.
"""
