"""Config paths from any directory: a file, or a shipped config's name; DeepSpeed JSONs the same way.

An installed `rl` has no checkout around it: `rl train quickstart` and a config's
`trainer.deepspeed: configs/deepspeed/zero3.json` must still find the shipped files.
Every test here runs in an empty directory outside the checkout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rl.cli.main import app
from rl.config import SHIPPED_CONFIGS, ConfigError, load_config
from rl.deepspeed_config import load_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_shipped_configs_are_the_checkouts():
    """In a checkout rl/configs is the top-level configs/ folder, not a copy that could drift."""
    assert SHIPPED_CONFIGS.resolve() == (ROOT / "configs").resolve()


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml", "qwen2.5-7b"])
def test_shipped_config_by_name(name):
    expected = "qwen2.5-7b" if name.startswith("qwen") else "quickstart"
    assert load_config(name).run_name == expected


def test_a_file_here_wins_over_the_shipped_one(elsewhere):
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "quickstart.yaml").write_text("run_name: mine\n")
    assert load_config("configs/quickstart.yaml").run_name == "mine"
    assert load_config("quickstart").run_name == "quickstart"


def test_unknown_config_names_the_file_and_the_shipped_ones():
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config("configs/nope.yaml")
    assert "configs/nope.yaml" in str(e.value)
    assert "quickstart" in str(e.value) and "tiny-test" in str(e.value)


@pytest.mark.parametrize("source", ["configs/deepspeed/zero3.json", "zero3", "zero3.json"])
def test_shipped_deepspeed_json(source):
    assert load_deepspeed_config(source)["zero_optimization"]["stage"] == 3


def test_a_deepspeed_json_here_wins(elsewhere):
    (elsewhere / "configs" / "deepspeed").mkdir(parents=True)
    (elsewhere / "configs" / "deepspeed" / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_deepspeed_config("configs/deepspeed/zero3.json")["zero_optimization"]["stage"] == 1


def test_missing_deepspeed_json_names_it_and_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="trainer.deepspeed") as e:
        load_deepspeed_config("configs/deepspeed/zero9.json")
    assert "zero9.json" in str(e.value) and "configs/deepspeed/zero3.json" in str(e.value)


def test_train_dry_run_by_name():
    res = runner.invoke(app, ["train", "tiny-test", "--dry-run", "trainer.max_steps=3"])
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.stdout)
    assert resolved["model"]["name"] == "tiny-test" and resolved["trainer"]["max_steps"] == 3


def test_plan_resolves_a_shipped_config_and_its_deepspeed_json():
    """qwen2.5-7b names configs/deepspeed/zero3.json; the plan reads it from the shipped configs."""
    res = runner.invoke(app, ["plan", "qwen2.5-7b", "--gpus", "8", "--gpu-mem", "80", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["trainer_setup"]["zero_stage"] == 3


def test_plan_reports_a_missing_deepspeed_json():
    res = runner.invoke(app, ["plan", "qwen2.5-7b", "trainer.deepspeed=configs/deepspeed/zero9.json"])
    assert res.exit_code == 2
    assert "zero9.json" in res.output and "configs/deepspeed/zero3.json" in res.output
