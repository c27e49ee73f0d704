"""The hub: control plane between the trainer and rollout workers (its own process)."""
