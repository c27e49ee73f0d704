"""Run configuration: one pydantic model per component, loaded from YAML.

A run file is sparse: it sets only what differs from the defaults (the sections in
rl/config/sections.py).
`load_config(path, overrides)` reads the YAML, applies dotted command-line
overrides (`trainer.lr=1e-6`), and validates everything at once; any error
names the file, the key path and the reason (`ConfigError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from rl.config.sections import (
    AlgorithmConfig,
    AsyncConfig,
    CheckpointConfig,
    DataConfig,
    DataSource,
    EnvSource,
    EvalConfig,
    FewShot,
    HFDatasetSource,
    HubConfig,
    HumanEvalSource,
    JsonlSource,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ReasoningGymSource,
    RewardsConfig,
    RewardTerm,
    RolloutConfig,
    SamplingConfig,
    Section,
    TrainerConfig,
    TrustConfig,
    WandbConfig,
    WatchdogConfig,
    WeightsConfig,
    WeightsFormat,
)
from rl.rundir import RunDir

__all__ = [  # the sections are part of this module's interface
    "AlgorithmConfig",
    "AsyncConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "EnvSource",
    "EvalConfig",
    "FewShot",
    "HFDatasetSource",
    "HubConfig",
    "HumanEvalSource",
    "JsonlSource",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "ReasoningGymSource",
    "RewardTerm",
    "RewardsConfig",
    "RolloutConfig",
    "RunConfig",
    "SHIPPED_CONFIGS",
    "SamplingConfig",
    "Section",
    "TrainerConfig",
    "TrustConfig",
    "WandbConfig",
    "WatchdogConfig",
    "WeightsConfig",
    "WeightsFormat",
    "dump_config",
    "find_config_file",
    "load_config",
    "parse_override",
    "shipped_names",
]


class RunConfig(Section):
    """A whole run: what `rl train CONFIG` reads."""

    run_name: str = "run"
    """Name of the run (the run directory defaults to runs/<run_name>)."""
    run_dir: Path | None = None
    """Where checkpoints, policy versions, metrics and logs go (default: runs/<run_name>)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Prompt source and templating."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling of training rollouts."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout workers."""
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    """Reward terms and the verifier pool."""
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    """GRPO-family loss and advantages."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Optimisation and DeepSpeed."""
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    """Asynchrony between generation and training."""
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    """Policy publication to workers."""
    hub: HubConfig = Field(default_factory=HubConfig)
    """Control-plane server."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Logging and W&B."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation."""
    trust: TrustConfig = Field(default_factory=TrustConfig)
    """Untrusted workers: provenance checks and quarantine."""
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    """Stalled steps: stack dumps, then the end of the run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        if self.trainer.micro_batch_size > self.trainer.prompts_per_step * self.sampling.n:
            raise ValueError(
                f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) exceeds the batch "
                f"(trainer.prompts_per_step * sampling.n = {self.trainer.prompts_per_step * self.sampling.n})"
            )
        if self.data.max_prompt_tokens + self.sampling.max_tokens > self.model.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens + sampling.max_tokens ({self.data.max_prompt_tokens} + "
                f"{self.sampling.max_tokens}) exceeds model.max_model_len ({self.model.max_model_len})"
            )
        if self.weights.format == "lora" and self.trainer.lora is None:
            raise ValueError("weights.format 'lora' ships adapters only: it needs trainer.lora (the adapters to train)")
        if self.async_.max_staleness < self.weights.publish_every - 1:
            raise ValueError(
                f"async.max_staleness ({self.async_.max_staleness}) must be at least weights.publish_every - 1 "
                f"({self.weights.publish_every - 1}): otherwise no worker can ever produce a fresh enough group"
            )
        return self

    @property
    def resolved_run_dir(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.run_name

    @property
    def paths(self) -> RunDir:
        """The named places of this run's directory (rl/rundir.py)."""
        return RunDir(self.resolved_run_dir)


_SCIENTIFIC = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key path and the reason."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (e.g. trainer.lr=1e-6)")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {text!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    # YAML 1.1 reads `1e-6` as a string; users mean a number.
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)
    return path, value


def _apply_override(data: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after")) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown type {e.get('input', {}).get('type')!r}; expected one of {e['ctx']['expected_tags']}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
"""The configs shipped as package data; in a checkout rl/configs links to the top-level configs/."""


def find_config_file(path: str | Path, folder: str = "", suffix: str = ".yaml") -> Path | None:
    """The file `path` names: itself if it exists (relative to the cwd), else the shipped file it names, else None.

    A shipped file is named as in a checkout (`configs/deepspeed/zero3.json`) or by its name in
    configs/<folder>, with or without the suffix (`quickstart`, `zero3.json`).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_absolute() or not p.parts:
        return None
    if p.parts[0] == "configs":
        shipped = SHIPPED_CONFIGS.joinpath(*p.parts[1:])
    elif len(p.parts) == 1:
        shipped = SHIPPED_CONFIGS / folder / (p.name if p.name.endswith(suffix) else p.name + suffix)
    else:
        return None
    return shipped if shipped.is_file() else None


def shipped_names(folder: str = "", suffix: str = ".yaml") -> list[str]:
    """Names of the shipped files in configs/<folder> (without the suffix), for error messages and help."""
    return sorted(f.name.removesuffix(suffix) for f in (SHIPPED_CONFIGS / folder).glob(f"*{suffix}"))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run file (or defaults when `path` is None), apply overrides, validate.

    `path` is a file, or the name of a shipped config (`quickstart`, see `find_config_file`).
    """
    origin = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = find_config_file(path)
        if p is None:
            names = ", ".join(shipped_names())
            raise ConfigError(f"config file {origin} does not exist, nor is it a shipped config ({names})")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {origin} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {origin}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, f"override {text!r}")
    if overrides:
        origin += " with overrides " + " ".join(overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (round-trips through `load_config`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
