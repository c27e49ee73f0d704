"""`rl init`: the starter config loads, passes `rl train --dry-run` as is, and never overwrites by accident."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from rl.cli.main import app
from rl.config import RunConfig, load_config

runner = CliRunner()


def test_starter_config_is_accepted_as_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["init", "exp/arith.yaml", "--model", "tiny-test"])
    assert res.exit_code == 0, res.output
    path = tmp_path / "exp" / "arith.yaml"
    cfg = load_config(path)
    assert (cfg.run_name, cfg.model.name) == ("arith", "tiny-test")
    dry = runner.invoke(app, ["train", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert yaml.safe_load(dry.stdout)["model"]["name"] == "tiny-test"


def test_starter_config_is_sparse_and_commented(tmp_path):
    path = tmp_path / "run.yaml"
    assert runner.invoke(app, ["init", str(path)]).exit_code == 0
    text = path.read_text()
    data = yaml.safe_load(text)
    assert set(data) == {"run_name", "model", "data", "rewards", "sampling", "rollout", "trainer"}
    assert set(data["trainer"]) == {"max_steps", "prompts_per_step", "lr"}
    assert data["model"]["name"] == RunConfig().model.name
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 10


def test_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: precious\n")
    res = runner.invoke(app, ["init", str(path)])
    assert res.exit_code == 2
    assert "already exists" in res.output and "--force" in res.output
    assert path.read_text() == "run_name: precious\n"
    assert runner.invoke(app, ["init", str(path), "--force"]).exit_code == 0
    assert load_config(path).run_name == "run"


def test_model_names_that_need_quoting(tmp_path):
    path = tmp_path / "run.yaml"
    for model in ("Qwen/Qwen2.5-0.5B-Instruct", "/models/my model: v2 #3", "1e-3"):
        assert runner.invoke(app, ["init", str(path), "--model", model, "--force"]).exit_code == 0
        assert load_config(path).model.name == model
