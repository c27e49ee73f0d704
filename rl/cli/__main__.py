"""`python -m rl.cli ...` is the `rl` command (launchers such as torchrun run it this way)."""

from rl.cli.main import app

app()
