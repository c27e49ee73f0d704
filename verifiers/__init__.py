"""Reward functions for scatter-rl: math, code (sandboxed), format, procedural tasks; a process pool.

Not the unrelated PyPI project named `verifiers`; scatter-rl never depends on that one.
"""
