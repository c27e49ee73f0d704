"""Runs inside the sandbox (stdlib only, `python -I -S`): execute a program against its test cases.

Reads one JSON job from stdin, sets resource limits on itself before touching
untrusted code, then runs each case in a forked child in its own process
group: `assert` cases execute the program and then the test code, `stdio`
cases feed `input` on stdin and compare stdout with `output` (trailing
whitespace ignored). Writes one JSON object `{"results": [{"ok", "reason"}]}`
to the original stdout, which the children do not inherit.

An assert case passes only if the child writes a per-job nonce after the tests
ran, so `sys.exit(0)` or `os._exit(0)` in the program does not count as a pass.
The harness is not dumpable, so children cannot ptrace it or open its fds via
/proc; after each case every leftover process in the sandbox is killed.
"""

import contextlib
import ctypes
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback

PR_SET_DUMPABLE = 4
INSIDE_SANDBOX = False


def set_limits(job):
    mb = 1 << 20
    limits = {
        resource.RLIMIT_NPROC: job["max_processes"],
        resource.RLIMIT_AS: job["memory_mb"] * mb,
        resource.RLIMIT_FSIZE: job["file_size_mb"] * mb,
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def child(job, case, out_w, err_w, input_fd):
    """In the forked child: wire stdio, cap CPU, run the program (and the test); never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        os.dup2(input_fd, 0)
        os.dup2(out_w if job["mode"] == "stdio" else os.open("/dev/null", os.O_WRONLY), 1)
        os.dup2(err_w, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives until _exit
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        cpu = max(1, math.ceil(job["case_timeout_s"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        name = "__main__" if job["mode"] == "stdio" else "solution"
        scope = {"__name__": name, "__builtins__": __builtins__}
        try:
            exec(compile(job["program"], "<solution>", "exec"), scope)
            if job["mode"] == "assert":
                exec(compile(case, "<tests>", "exec"), scope)
                os.write(out_w, job["nonce"].encode())
            code = 0
        except SystemExit as e:
            code = 0 if job["mode"] == "stdio" and e.code in (None, 0) else 1
        except BaseException:
            traceback.print_exc(limit=3)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def inside_sandbox():
    """True only in our bubblewrap sandbox (non-root, bwrap is pid 1 of our pid namespace)."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return os.getuid() != 0 and f.read().startswith(b"bwrap\0")
    except OSError:
        return False


def kill_leftovers():
    """Kill every other process this uid can see (only this sandbox's, thanks to the pid namespace)."""
    if INSIDE_SANDBOX:  # outside one, kill(-1) would hit the user's own processes
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def run_case(job, case, index):
    limit = job["max_output_bytes"]
    input_fd = os.open("/dev/null", os.O_RDONLY)
    if job["mode"] == "stdio":
        path = f"/tmp/.case-{index}.in"
        with open(path, "w") as f:
            f.write(case.get("input", ""))
        input_fd = os.open(path, os.O_RDONLY)
        os.unlink(path)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        child(job, case, out_w, err_w, input_fd)
    for fd in (out_w, err_w, input_fd):
        os.close(fd)
    deadline = time.monotonic() + job["case_timeout_s"]
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds, reason = [out_r, err_r], None
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = f"timeout after {job['case_timeout_s']:g}s"
            break
        ready, _, _ = select.select(open_fds, [], [], left)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            bufs[fd] += chunk
        if len(bufs[out_r]) > limit:
            reason = f"output over {limit} bytes"
            break
    status = None
    while reason is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            reason = f"timeout after {job['case_timeout_s']:g}s"
            break
        time.sleep(0.002)
    for fd in (out_r, err_r):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    kill_leftovers()
    if reason is not None:
        return {"ok": False, "reason": reason}
    err_lines = bufs[err_r].decode("utf-8", "replace").strip().splitlines()
    last_err = err_lines[-1][:300] if err_lines else ""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = "cpu time limit" if sig == signal.SIGXCPU else f"killed by signal {sig}"
        return {"ok": False, "reason": why}
    if job["mode"] == "assert":
        ok = bytes(bufs[out_r]) == job["nonce"].encode()
        return {"ok": ok, "reason": "" if ok else (last_err or "tests did not complete")}
    if os.WEXITSTATUS(status) != 0:
        return {"ok": False, "reason": last_err or f"exit code {os.WEXITSTATUS(status)}"}
    got = [line.rstrip() for line in bufs[out_r].decode("utf-8", "replace").rstrip().splitlines()]
    want = [line.rstrip() for line in str(case.get("output", "")).rstrip().splitlines()]
    if got == want:
        return {"ok": True, "reason": ""}
    return {"ok": False, "reason": f"wrong output: got {chr(10).join(got)[:100]!r}, want {chr(10).join(want)[:100]!r}"}


def main():
    global INSIDE_SANDBOX
    INSIDE_SANDBOX = inside_sandbox()
    job = json.loads(sys.stdin.buffer.read())
    out = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    set_limits(job)
    results = [run_case(job, case, i) for i, case in enumerate(job["cases"])]
    os.write(out, json.dumps({"results": results}).encode())


if __name__ == "__main__":
    main()
