"""Reward functions for scatter-rl: math, code (sandboxed), format, procedural tasks; a process pool.

Not the unrelated PyPI project named `verifiers`; scatter-rl never depends on that one.

Entry points: `verifiers.pool.VerifierPool` (what the hub and `rl verify` use),
`verifiers.base.Reward` (the contract), `verifiers.terms.TABLE` (term names),
`verifiers.procedural.make_dataset` and `verifiers.humaneval.load_humaneval`
(offline prompt sources).
"""

from verifiers.base import Reward, VerifierError

__all__ = ["Reward", "VerifierError"]
