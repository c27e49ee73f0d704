"""scatter-rl trainer side: config, CLI, data, hub, GRPO math, DeepSpeed strategy, trainer, weights."""

__version__ = "0.1.0"
