"""scatter-rl worker side: hub client, generation engines (vLLM, HF), weight sync.

- `worker.run_worker`: the `rl rollout` loop (register, lease, generate, submit, update).
- `client.HubClient`: HTTP client of the hub's worker routes (retries, re-registration).
- `weight_sync.WeightSync`: verified, resumable download of policy versions into a local cache.
- `engines.make_engine`: the vLLM or HF engine behind one `Engine` interface.
"""
