"""Third-party environments, unchanged, on the trusted side: Prime Intellect's `verifiers` and TextArena games.

Their code runs in a child process (rl/envs/third_party_child.py) with its own interpreter and
virtual environment (`.venv-envs`, made by scripts/setup.sh): Prime Intellect's package is also
imported as `verifiers`, which is this project's verifiers package in the hub's interpreter. The
child runs in the bubblewrap sandbox (no network, no host files but its venv, its Python and the
configured `paths`, a tmpfs home, an address-space limit), and every call is bounded in time: a
child that does not answer is killed, the task that asked is dropped, and the next call starts a
fresh child. The hub keeps an episode's state as the data row and the model's turns (JSON, in its
ledger); the child replays the episode from them on each step, so nothing of the child's needs to
outlive a call. The grade is the environment's own rubric (or the game's reward), computed in the
child from the episode it replayed, never from what a worker sent beyond its tokens.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rl.envs.base import Grade, State, Step
from verifiers.sandbox import SandboxSpec, bwrap_argv, require_sandbox

CHILD = Path(__file__).with_name("third_party_child.py")
VENV_ENV = "SCATTER_RL_ENVS_VENV"
"""Environment variable naming the environments' venv; default `.venv-envs` at the repository root."""
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-envs"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class EnvironmentProcessError(RuntimeError):
    """The environment's process failed, refused a request, or did not answer in time."""


class _Child:
    """One child process and its line protocol; requests are serialised (the hub steps from threads)."""

    def __init__(self, argv: list[str], memory_mb: int, start_timeout_s: float):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the child's stderr, read when it fails
        limit = memory_mb << 20
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )  # fmt: skip
        self.lock = threading.Lock()
        atexit.register(self.close)
        self._read(start_timeout_s)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = f"no answer in {timeout_s:g} s" if not ready else f"exited ({self.proc.poll()})"
            self.close()
            self.log.seek(0)
            tail = self.log.read()[-2000:].decode(errors="replace")
            raise EnvironmentProcessError(f"environment process: {why}; its stderr ends:\n{tail}")
        out = json.loads(line)
        if "error" in out:
            raise EnvironmentProcessError(out["error"])
        return out

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return self._read(timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class ThirdParty:
    """An environment of a third-party library, run in its own process. State: the row and the turns."""

    kind: ClassVar[str] = ""
    environment: str = ""
    """Which environment: see the subclasses."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (`load_environment(**args)`, `textarena.make`)."""
    max_turns: int = 4
    """Model turns after which the hub ends an episode (an unfinished episode is graded 0)."""
    paths: tuple[str, ...] = ()
    """Directories the child may read and imports from (an environment module of your own)."""
    venv: str = ""
    """The environments' virtual environment; default `$SCATTER_RL_ENVS_VENV`, else `.venv-envs`."""
    sandbox: bool = True
    """Run the child in the bubblewrap sandbox (no network, no host files beyond its venv and `paths`)."""
    call_timeout_s: float = 60.0
    start_timeout_s: float = 300.0
    memory_mb: int = 4096
    _child: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.environment:
            raise TypeError(f"{self.kind} environment: `environment` is required")
        object.__setattr__(self, "paths", tuple(str(Path(p).resolve()) for p in self.paths))

    def argv(self) -> list[str]:
        """The child's command line: the venv's interpreter, sandboxed unless `sandbox` is off."""
        venv = Path(self.venv or os.environ.get(VENV_ENV) or DEFAULT_VENV)
        python = venv / "bin" / "python"
        if not python.exists():
            raise EnvironmentProcessError(f"no environments' venv at {venv}: run scripts/setup.sh (it makes "
                                          f".venv-envs) or set {VENV_ENV}")  # fmt: skip
        tail = [self.kind, self.environment, json.dumps(self.args), *self.paths]
        if not self.sandbox:
            return [str(python), "-I", str(CHILD), *tail]
        require_sandbox()
        base = Path(os.path.realpath(python)).parents[1]  # the installation the venv's interpreter links to
        spec = SandboxSpec(ro_paths=(str(venv.resolve()), str(base), *self.paths),
                           ro_files=((str(CHILD), "/opt/scatter-rl/" + CHILD.name),), tmpfs_mb=256,
                           env=OFFLINE)  # fmt: skip
        return bwrap_argv(spec, [str(venv / "bin" / "python"), "-I", "/opt/scatter-rl/" + CHILD.name, *tail])

    def _ask(self, request: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        if not self._child or not self._child[0].alive:
            self._child[:] = [_Child(self.argv(), self.memory_mb, self.start_timeout_s)]
        child = self._child[0]
        try:
            return child.ask(request, timeout_s or self.call_timeout_s)
        except EnvironmentProcessError:
            if not child.alive:
                self._child.clear()
            raise

    def close(self) -> None:
        for child in self._child:
            child.close()
        self._child.clear()

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        """The environment's own data rows (its dataset, or seeded games), each with `question`."""
        try:
            return self._ask({"op": "rows", "size": size, "seed": seed}, self.start_timeout_s)["rows"]
        finally:
            self.close()  # the data is read once, before the run: no idle child

    def reset(self, row: dict[str, Any]) -> State:
        return {"row": row, "turns": []}

    def step(self, state: State, turn: str) -> tuple[State, Step]:
        turns = [*state["turns"], turn]
        out = self._ask({"op": "step", "row": state["row"], "turns": turns})
        state = {**state, "turns": turns}
        if out["done"]:
            return {**state, "reward": out["reward"], "components": out["components"]}, Step(done=True)
        return state, Step(messages=[{"role": m["role"], "content": m["content"]} for m in out["messages"]])

    def grade(self, state: State) -> Grade:
        finished = "reward" in state
        return Grade(float(state.get("reward", 0.0)), {**state.get("components", {}), "finished": float(finished)})


@dataclass(frozen=True)
class VerifiersEnv(ThirdParty):
    """Prime Intellect's `verifiers` (the Environments Hub's format): `environment` is an environment id whose
    module has `load_environment(**args)` (an installed environment package, or a module under `paths`),
    or `module:callable`, e.g. `verifiers.envs.integrations.reasoninggym_env:ReasoningGymEnv`."""

    kind: ClassVar[str] = "verifiers"


@dataclass(frozen=True)
class TextArenaEnv(ThirdParty):
    """A single-player TextArena game: `environment` is its id, e.g. `GuessTheNumber-v0`."""

    kind: ClassVar[str] = "textarena"
