"""Every shipped run config validates (`rl train CONFIG --dry-run`), and says truthfully what it fits.

A config whose header has a `# Check:  rl plan ...` line (the GPU configs) must fit the
hardware that line names, by `rl plan` itself; its DeepSpeed JSON must exist and parse.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rl.cli.main import app
from rl.config import load_config
from rl.deepspeed_config import load_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
runner = CliRunner()


def check_command(config: Path) -> list[str] | None:
    """The `rl plan ...` arguments of a config's `# Check:` header line, or None."""
    for line in config.read_text().splitlines():
        if line.startswith("# Check:"):
            words = shlex.split(line.removeprefix("# Check:"))
            assert words[:2] == ["rl", "plan"], line
            return words[1:]
    return None


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"quickstart.yaml", "qwen2.5-0.5b.yaml", "qwen2.5-7b.yaml", "qwen2.5-32b.yaml", "qwen2.5-72b.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_dry_runs(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["train", str(config.relative_to(ROOT)), "--dry-run"])
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.stdout)
    assert resolved["model"]["name"] == load_config(config).model.name
    cfg = load_config(config)
    if isinstance(cfg.trainer.deepspeed, str):
        assert "zero_optimization" in load_deepspeed_config(cfg.trainer.deepspeed)


@pytest.mark.parametrize("config", [c for c in CONFIGS if check_command(c)], ids=lambda p: p.name)
def test_gpu_config_fits_the_hardware_its_header_names(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(config)
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.local_workers == 0
    res = runner.invoke(app, [*check_command(config), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["fits"], (plan["trainer"]["suggestions"], plan["worker"]["problem"])
    assert plan["worker"]["tensor_parallel"] == cfg.rollout.tensor_parallel
