"""The bubblewrap sandbox that model-influenced code runs in (code tests, reasoning-gym scorers).

A sandboxed process gets every namespace of its own (no network, no view of host processes); a
root filesystem of read-only `/usr` and the Python it needs on an empty tmpfs (no home, /etc,
repository or host /tmp); a size-limited work dir (`/sandbox`, also /tmp); an empty environment
(bwrap itself starts through `env -i`, since it stays as pid 1, whose environ the sandbox can
read); uid 65534 without capabilities and with `no_new_privs`; rlimits it sets on itself, and a
wall-clock kill from outside. Process limits only hold for a non-root user, so a root caller gets
bwrap without a user namespace, then `setpriv` to uid 65534 and `unshare --user` (RLIMIT_NPROC
then counts only that sandbox's processes). Without bubblewrap nothing runs (`SandboxUnavailable`).
Threat model: docs/security.md, "Model-written code".
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from verifiers.base import VerifierError

SANDBOX_UID = 65534
WORKDIR = "/sandbox"
SCRIPTS = "/opt/scatter-rl"
INSIDE_HELPER = Path(__file__).with_name("_inside.py")
"""What the scripts that run inside import (from their own directory)."""
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


class SandboxUnavailable(VerifierError):
    """bubblewrap is missing or cannot create namespaces here; model code is never run unsandboxed."""


@dataclass(frozen=True)
class SandboxSpec:
    """What to expose inside the sandbox and how big its writable tmpfs is."""

    ro_paths: tuple[str, ...] = ()
    """Host paths bound read-only at the same place (beyond /usr)."""
    ro_files: tuple[tuple[str, str], ...] = ()
    """(host file, path inside) pairs bound read-only, e.g. our scripts under /opt/scatter-rl."""
    tmpfs_mb: int = 64
    """Size of the writable work dir (/sandbox) and of /tmp, each."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables (the host environment is never passed)."""


def script_binds(*scripts: Path) -> tuple[tuple[str, str], ...]:
    """`SandboxSpec.ro_files` that put `scripts` and the helper they import under `SCRIPTS`."""
    return tuple((str(path), f"{SCRIPTS}/{path.name}") for path in (*scripts, INSIDE_HELPER))


def _python_roots(with_site_packages: bool) -> tuple[str, list[str]]:
    """(interpreter to run, host directories it needs) for this Python installation."""
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    roots = {os.path.realpath(sys.base_prefix), os.path.dirname(base)}
    if with_site_packages:
        roots.add(os.path.realpath(sys.prefix))
        return sys.executable, sorted(roots)
    return base, sorted(roots)


def python_command(with_site_packages: bool = False) -> tuple[list[str], tuple[str, ...]]:
    """Command prefix to run Python code in the sandbox (`-I`: isolated; `-S` too without site-packages)."""
    exe, roots = _python_roots(with_site_packages)
    flags = ["-I"] if with_site_packages else ["-I", "-S"]
    return [exe, *flags], _outermost(tuple(roots))


def _outermost(paths: tuple[str, ...]) -> tuple[str, ...]:
    """Drop paths inside /usr or inside another listed path (one bind covers them)."""
    norm = sorted({os.path.normpath(p) for p in paths} | {"/usr"})
    kept: list[str] = []
    for path in norm:
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(p for p in kept if p != "/usr")


def _ancestors(paths: tuple[str, ...]) -> list[str]:
    """Parent directories bwrap creates for the binds; they must be traversable by the sandbox uid."""
    seen: list[str] = []
    for path in paths:
        parts = Path(path).parts[1:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if d not in seen:
                seen.append(d)
    return seen


def bwrap_argv(spec: SandboxSpec, command: list[str]) -> list[str]:
    """The full argv that runs `command` inside the sandbox described by `spec`."""
    as_root = os.geteuid() == 0
    size = str(spec.tmpfs_mb << 20)
    if as_root:
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    empty_env = [shutil.which("env") or "/usr/bin/env", "-i"]  # bwrap (pid 1 inside) must not hold host secrets
    argv = [*empty_env, shutil.which("bwrap") or "bwrap", *namespaces, "--die-with-parent", "--new-session"]
    argv += ["--hostname", "sandbox"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/lib32", "/sbin"):  # merged-/usr links, or real dirs elsewhere
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    for mount in (WORKDIR, "/tmp"):
        argv += ["--perms", "1777", "--size", size, "--tmpfs", mount]
    ro_paths = _outermost(spec.ro_paths)
    for path in ro_paths:
        argv += ["--ro-bind", path, path]
    for host, inside in spec.ro_files:
        argv += ["--ro-bind", host, inside]
    for d in _ancestors(ro_paths + tuple(inside for _, inside in spec.ro_files)):
        # A checkout under /tmp puts read-only binds inside the writable tmpfs mounts: keep those 1777.
        argv += ["--chmod", "1777" if d in (WORKDIR, "/tmp") else "0755", d]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": WORKDIR,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        **spec.env,
    }
    argv += ["--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--chdir", WORKDIR, "--"]
    if as_root:
        uid = str(SANDBOX_UID)
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        argv += ["--bounding-set=-all", "--no-new-privs", "--"]
        argv += ["unshare", "--user", f"--map-user={uid}", f"--map-group={uid}", "--"]
    return argv + command


@functools.cache
def _probe() -> str | None:
    """None when a trivial sandbox starts here, else why not (cached per process)."""
    needed = ["bwrap"] + (["setpriv", "unshare"] if os.geteuid() == 0 else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH; {INSTALL_HINT} (setpriv and unshare: util-linux)"
    python, roots = python_command(with_site_packages=False)
    argv = bwrap_argv(SandboxSpec(ro_paths=roots), [*python, "-c", "import os; print(os.getuid())"])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap failed to start: {e}"
    if done.returncode != 0 or done.stdout.strip() != str(SANDBOX_UID):
        return f"bubblewrap cannot create a sandbox here (exit {done.returncode}): {done.stderr.strip()[-400:]}"
    return None


def require_sandbox() -> None:
    """Raise `SandboxUnavailable` unless sandboxes work on this machine (checked once per process)."""
    reason = _probe()
    if reason is not None:
        raise SandboxUnavailable(f"cannot run model-influenced code: {reason}")
