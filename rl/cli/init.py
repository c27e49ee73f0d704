"""`rl init`: a commented starter run config that `rl train` accepts as is.

The file is sparse like every run config: only the fields a new user changes (model, data,
rewards, group size, batch, learning rate, local workers, steps); the rest keep the defaults
of rl/config/, which `rl train FILE --dry-run` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

STARTER = """\
# A scatter-rl run config, written by `rl init`. It sets only what you are likely to change;
# every other field keeps its default (`rl train {path} --dry-run` prints them all, and
# docs/configuration.md explains each). Start the run with `rl train {path}`.
run_name: {run_name}  # outputs go to runs/<run_name> (or `rl train ... --run-dir DIR`)

model:
  # A local Hugging Face directory, a Hugging Face id (e.g. Qwen/Qwen2.5-0.5B-Instruct), or an
  # alias prepared offline by `rl models prepare` (smollm2-135m-instruct, tiny-test).
  name: {model}

data:
  # Where the prompts come from. reasoning_gym generates them offline; your own data instead:
  #   source: {{type: jsonl, path: data/train.jsonl, prompt_field: prompt, answer_field: answer}}
  #   source: {{type: hf, path: DATASET_ID, split: train, prompt_field: question, answer_field: answer}}
  source:
    type: reasoning_gym
    dataset: basic_arithmetic
    size: 2000
  system_prompt: >-
    Think briefly, then give the final answer inside <answer></answer> tags,
    for example <answer>7</answer>.

rewards:
  # The reward is the weighted sum of these terms: math, format, code, reasoning_gym (the scorer of
  # the reasoning_gym dataset), length, or your own `module:function`.
  terms:
    - {{name: reasoning_gym, weight: 1.0}}
    - {{name: format, weight: 0.1, params: {{tags: [answer]}}}}

sampling:
  n: 8                    # completions per prompt (the GRPO group)
  max_tokens: 128         # longest completion, in tokens

rollout:
  local_workers: 1        # rollout workers `rl train` starts here (0: only remote `rl rollout` workers)

trainer:
  max_steps: 50           # optimizer steps of the run
  prompts_per_step: 8     # groups per step (a batch is prompts_per_step * sampling.n sequences)
  lr: 1.0e-6              # peak AdamW learning rate (configs/quickstart.yaml trains a 135M model at 3e-5)
"""


def _scalar(text: str) -> str:
    """`text` as a YAML scalar: as is when YAML reads it back unchanged, else quoted."""
    try:
        plain = yaml.safe_load(text) == text and "#" not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def starter_config(path: Path, model: str) -> str:
    """The starter config's text for a file at `path` (its stem names the run) training `model`."""
    return STARTER.format(path=path, run_name=_scalar(path.stem or "run"), model=_scalar(model))


def write_starter_config(path: Path, model: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_config(path, model))
