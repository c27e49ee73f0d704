"""What the scripts that run inside the sandbox (`_code_runner.py`, `_rg_server.py`) share: stdlib only.

They run as `python -I` scripts from /opt/scatter-rl, so they import this module from their own
directory (coding.py and procedural.py bind it there), never as `verifiers._inside`.
"""

import os


def inside_sandbox():
    """True only in our bubblewrap sandbox (non-root, bwrap is pid 1 of our pid namespace)."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
        return os.getuid() != 0 and os.path.basename(argv0) == b"bwrap"
    except OSError:
        return False


def reap_exited():
    """Collect every child that has exited, without waiting for the ones still running."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
