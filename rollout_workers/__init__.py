"""scatter-rl worker side: hub client, generation engines (vLLM, HF), weight sync."""
