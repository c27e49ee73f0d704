"""The built wheel, installed in a fresh venv and used outside the checkout: `rl init`, `rl train tiny-test`.

The wheel is built from a copy of the sources (the checkout's build/ and egg-info stay as they
are). The new venv gets the project venv's dependencies hard-linked into its site-packages
rather than named by a .pth line: the reasoning-gym scorer runs in a sandbox that binds only
the interpreter's prefix, so, as in a real install, they must live inside it. The project's own
editable install is left out: only the wheel provides `rl`, and every command runs in a
temporary directory with no configs/ around it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import helpers.train as h
import pytest
import yaml

from rl.rundir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("rl", "rollout_workers", "verifiers", "configs", "pyproject.toml", "README.md")
OURS = ("rl", "rollout_workers", "verifiers")  # with the editable install, left out of the new venv
SHIPPED = ("*.yaml", "deepspeed/*.json", "nginx/*.conf")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src])
    (built,) = dist.glob("scatter_rl-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Iterator[dict]:
    """A fresh venv with the wheel installed; its `rl`, a working directory outside the checkout, an env.

    The venv is not under pytest's private (0700) temporary folder: the sandboxed scorer runs its
    Python as another user, who must be able to reach it, as with any install the sandbox serves.
    """
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests must run in the project's venv (its packages are the new venv's dependencies)")
    root = Path(tempfile.mkdtemp(prefix="scatter-rl-wheel-venv-"))
    root.chmod(0o755)
    try:
        yield _install(wheel, root, tmp_path_factory.mktemp("elsewhere"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install(wheel: Path, root: Path, work: Path) -> dict:
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = [p for p in Path(sysconfig.get_paths()["purelib"]).iterdir()
            if p.name not in OURS and not p.name.startswith(("__editable__", "scatter_rl"))]  # fmt: skip
    linked = subprocess.run(["cp", "-a", "--link", *map(str, deps), str(site)], capture_output=True, text=True)
    if linked.returncode != 0:
        pytest.skip(f"cannot hard-link the project venv's packages into {site}: {linked.stderr[-500:]}")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    env = {k: v for k, v in h.train_env().items() if k != "PYTHONPATH"}
    env |= {
        "SCATTER_RL_CACHE": str(work / "cache"),
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DeepSpeed's JIT ops built from this venv's paths differ from the project venv's build: kept apart, so
        # the shared cache is not rebuilt back and forth (a minute of compiling each time)
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
    }
    return {"root": root, "rl": root / "bin" / "rl", "python": python, "work": work, "env": env}


def test_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT / "configs") for pattern in SHIPPED for p in (ROOT / "configs").glob(pattern)]
    assert {f"rl/configs/{p}" for p in shipped} <= names
    assert "rl/configs/quickstart.yaml" in names and "rl/configs/deepspeed/zero3.json" in names
    assert not any(n.startswith(("scripts/", "tests/")) for n in names)


def test_the_wheel_not_the_checkout_provides_rl(venv):
    code = "import rl, rollout_workers, verifiers, rl.config as c; print(rl.__file__, c.SHIPPED_CONFIGS)"
    res = _run([venv["python"], "-c", code], cwd=venv["work"], env=venv["env"])
    for path in res.stdout.split():
        assert Path(path).is_relative_to(venv["root"]), res.stdout


def test_init_outside_the_checkout(venv):
    work, env = venv["work"], venv["env"]
    _run([venv["rl"], "init", "starter.yaml", "--model", "tiny-test"], cwd=work, env=env)
    dry = _run([venv["rl"], "train", "starter.yaml", "--dry-run"], cwd=work, env=env)
    assert yaml.safe_load(dry.stdout)["model"]["name"] == "tiny-test"
    again = subprocess.run([venv["rl"], "init", "starter.yaml"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_train_tiny_test_outside_the_checkout(venv):
    """The shipped tiny-test config by name, its default DeepSpeed JSON from the package: runs to the end."""
    run = RunDir(venv["work"] / "run")
    log = venv["work"] / "train.log"
    with open(log, "ab") as out:
        cmd = [venv["rl"], "train", "tiny-test", "--run-dir", str(run.root)]
        proc = subprocess.Popen(
            cmd, cwd=venv["work"], env=venv["env"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    code = h.finish(proc, log, timeout=600)
    assert code == 0, h.tail(log) + h.tail(run.hub_log, 3000)
    steps = h.by_step(h.read_jsonl(run.metrics))
    assert max(steps) == 4 and {1, 2, 3, 4} <= set(steps)  # step 0: the evaluation before training
    assert (run.final / "config.json").is_file()
