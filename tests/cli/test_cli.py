"""The `rl` CLI as a user runs it: help, dry-run, validation errors, honest not-yet-built exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RL = [sys.executable, "-m", "rl.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    res = run("--help")
    assert res.returncode == 0
    for sub in ("train", "hub", "rollout", "status", "verify", "models"):
        assert sub in res.stdout


def test_each_subcommand_has_help():
    for sub in ("train", "hub", "rollout", "status", "verify", "models"):
        res = run(sub, "--help")
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout


def test_dry_run_prints_resolved_config():
    res = run("train", "configs/quickstart.yaml", "--dry-run", "trainer.max_steps=7")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["trainer"]["max_steps"] == 7
    assert resolved["model"]["name"] == "smollm2-135m-instruct"
    assert resolved["async"]["max_staleness"] == 1


def test_bad_override_exits_2_with_message():
    res = run("train", "configs/quickstart.yaml", "--dry-run", "trainer.lr=-5")
    assert res.returncode == 2
    assert "configs/quickstart.yaml" in res.stderr
    assert "trainer.lr" in res.stderr and "greater than 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_config_exits_2():
    res = run("train", "configs/nope.yaml", "--dry-run")
    assert res.returncode == 2
    assert "does not exist" in res.stderr


def test_unknown_model_alias_is_an_error():
    res = run("models", "prepare", "gpt-17")
    assert res.returncode == 2
    assert "unknown model alias" in res.stderr


def test_log_lines_are_plain_unless_stderr_is_a_terminal(monkeypatch):
    """A hub or trainer logging to a file or a launcher's pipe writes plain lines: rich renders each record as
    a table (about 1.5 ms of the event loop a line, which thousands of registrations cannot spare)."""
    import io
    import logging

    from rich.logging import RichHandler

    from rl.cli import main

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test, as is the level
    monkeypatch.setattr(root, "level", root.level)
    for stream, rich in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        main._setup_logging("INFO")
        (handler,) = root.handlers
        assert isinstance(handler, RichHandler) is rich
        if not rich:
            logging.getLogger("rl.hub.service").info("worker %s registered", "w-1")
            assert stream.getvalue().rstrip().endswith("INFO     worker w-1 registered")
