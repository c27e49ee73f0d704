"""A custom reward module that cannot be imported: the hub's check at start-up only finds it, so the run starts,
and every scoring attempt in the verifier processes fails (tests/e2e/test_faults.py)."""

raise RuntimeError("failing_reward cannot start (a fault the tests inject)")
