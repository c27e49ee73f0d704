"""Runs inside a sandbox (stdlib only, `python -I -S`): runs the model's program, and nothing else.

Everything here is reachable by the model's code (same uid, forked from this process), so it is
given no expected outputs, no test code, no pass/fail signal. Reads one JSON job from stdin, sets
resource limits on itself, then either
- `stdio`: runs the program once per input in a forked child (own process group, CPU and
  wall-clock limits) and writes `{"runs": [{"stdout", "error"}]}` to the original stdout; the
  trusted parent (`verifiers/coding.py`) compares the outputs; or
- `serve`: answers the test harness (`_code_harness.py`, another sandbox) over two pipes: for each
  `begin` a forked child executes the program, replies with the names it defined and answers
  `call`s in plain data (`_plain.py`; other objects stay here as numbered references) until `end`.
After each run or case every leftover process in the sandbox is killed.
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
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `-I` leaves the script dir off sys.path
import _plain  # noqa: E402
from _inside import inside_sandbox, reap_exited  # noqa: E402

PR_SET_DUMPABLE = 4
MAX_FD = 1024
MAX_NAMES = 2000
KILL_SLACK_S = 0.25  # the harness gives up first, at case_timeout_s; this process kills the child just after
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


def close_fds_except(keep):
    """In a child: close every fd above 2 but `keep` (the job's result fd must not reach the model)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def enter_child(stdin_fd, stdout_fd, stderr_fd, keep, timeout_s):
    """Common set-up of a forked child before it runs model code."""
    os.setpgid(0, 0)
    os.dup2(stdin_fd, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    close_fds_except(keep)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives until _exit
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    cpu = max(1, math.ceil(timeout_s))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def kill_leftovers():
    """Kill every other process this uid can see (only this sandbox's, thanks to the pid namespace)."""
    # A fork bomb forks while kill(-1) walks the process list: repeat until nothing is left to signal
    # (dying processes still count until reaped, so give pid 1 a moment to reap them).
    for _ in range(200 if INSIDE_SANDBOX else 0):  # outside one, kill(-1) would hit the user's own processes
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            break
        reap_exited()
        time.sleep(0.001)
    reap_exited()


def describe(status):
    """Why a child that did not finish normally ended, or "" if it exited 0."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "cpu time limit" if sig == signal.SIGXCPU else f"killed by signal {sig}"
    code = os.WEXITSTATUS(status)
    return f"exit code {code}" if code else ""


# ---------------------------------------------------------------------------------------------- stdio


def stdio_child(job, input_fd, out_w, err_w):
    code = 1
    try:
        enter_child(input_fd, out_w, err_w, (), job["case_timeout_s"])
        try:
            exec(compile(job["program"], "<solution>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            code = 0
        except SystemExit as e:
            code = 0 if e.code in (None, 0) else 1
        except BaseException:
            traceback.print_exc(limit=3)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_stdio(job, index, text):
    """Run the program on one input: {"stdout": what it printed, "error": why it failed or ""}."""
    limit = job["max_output_bytes"]
    path = f"/tmp/.case-{index}.in"
    with open(path, "w") as f:
        f.write(text)
    input_fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        stdio_child(job, input_fd, out_w, err_w)
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
            del bufs[err_r][:-4096]
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
    if reason is None:
        reason = describe(status)
        err_lines = bufs[err_r].decode("utf-8", "replace").strip().splitlines()
        if reason.startswith("exit code") and err_lines:
            reason = err_lines[-1][:300]
    stdout = "" if reason else bufs[out_r].decode("utf-8", "replace")
    return {"stdout": stdout, "error": reason}


# ---------------------------------------------------------------------------------------------- serve


def exported(scope, budget):
    """What the harness may use from the program: functions to call, plain values, stdlib modules.

    Values go along only while they fit in `budget` bytes of JSON (a big lookup table stays here,
    still usable by the program's functions), so the reply never outgrows the harness's limit.
    """
    names = {}
    for name, value in list(scope.items())[:MAX_NAMES]:
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            names[name] = {"module": str(getattr(value, "__name__", ""))}
        elif callable(value):
            names[name] = {"callable": True}
        else:
            try:
                encoded = _plain.encode(value)
                size = len(json.dumps(encoded))
            except (TypeError, ValueError):
                continue
            if size <= budget:
                names[name] = {"value": encoded}
                budget -= size
    return names


def error_text(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def reply(fd, case, message):
    """Send; a value JSON cannot carry (an int of over 4300 digits) becomes an error reply."""
    try:
        _plain.send(fd, {"case": case, **message})
    except ValueError as e:
        _plain.send(fd, {"case": case, "raise": ["ValueError", str(e)[:300]]})


def candidate_child(job, calls_r, replies_w, case):
    """Execute the program, then answer calls until `end`; never returns."""
    try:
        null = os.open("/dev/null", os.O_RDWR)
        enter_child(null, null, null, (calls_r, replies_w), job["case_timeout_s"])
        scope = {"__name__": "solution", "__builtins__": __builtins__}
        try:
            exec(compile(job["program"], "<solution>", "exec"), scope)
        except BaseException as e:
            scope.clear()  # a memory bomb's blocks would starve the reply
            reply(replies_w, case, {"error": error_text(e)})
            return
        reply(replies_w, case, {"names": exported(scope, job["max_message_bytes"] // 2)})
        objects = []  # what the harness holds references to: objects that are not plain data

        def keep(obj):
            objects.append(obj)
            return len(objects) - 1

        while True:
            msg = _plain.recv(calls_r, job["max_message_bytes"])
            if msg is None or msg.get("op") == "end":
                return
            try:
                target = scope[msg["name"]] if "name" in msg else objects[msg["ref"]]
                if msg["op"] == "getattr":
                    result = getattr(target, msg["attr"])
                else:
                    args = [_plain.decode(a, objects.__getitem__) for a in msg["args"]]
                    kwargs = {k: _plain.decode(v, objects.__getitem__) for k, v in msg["kwargs"].items()}
                    result = target(*args, **kwargs)
                answer = {"value": _plain.encode(result, keep)}
            except BaseException as e:
                answer = {"raise": [type(e).__name__, str(e)[:300]]}
            reply(replies_w, case, answer)
    finally:
        os._exit(0)


def wait_case(pid, deadline):
    """Wait for the case's child until `deadline`, then kill it; why it ended ("" for a normal end)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return describe(status)
        if time.monotonic() > deadline:
            return "killed at the case time limit"
        time.sleep(0.002)


def serve(job):
    calls_r, replies_w = job["call_fds"]
    _plain.send(replies_w, {"ready": True})  # the harness starts its case clocks from here, not from our start-up
    while True:
        msg = _plain.recv(calls_r, job["max_message_bytes"])
        if msg is None:
            return
        if msg.get("op") != "begin":
            continue  # left over from a case whose child died before reading it
        case = msg["case"]
        pid = os.fork()
        if pid == 0:
            candidate_child(job, calls_r, replies_w, case)
        reason = wait_case(pid, time.monotonic() + job["case_timeout_s"] + KILL_SLACK_S)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        kill_leftovers()
        _plain.send(replies_w, {"over": case, "reason": reason})


def main():
    global INSIDE_SANDBOX
    INSIDE_SANDBOX = inside_sandbox()
    job = json.loads(sys.stdin.buffer.read())
    out = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    set_limits(job)
    if job["mode"] == "serve":
        os.close(out)
        with contextlib.suppress(BrokenPipeError):
            serve(job)
        return
    runs = [run_stdio(job, i, text) for i, text in enumerate(job["inputs"])]
    os.write(out, json.dumps({"runs": runs}).encode())


if __name__ == "__main__":
    main()
