"""Runs inside its own sandbox (stdlib only, `python -I -S`): assert-style tests against a remote candidate.

The test code holds the expected values, so it never shares a process, a pid namespace or a
filesystem with the model's program: that runs in a second sandbox (`_code_runner.py serve`),
reachable only through two pipes. Here each of the program's functions is a `Remote` proxy;
arguments and results cross as plain data (`_plain.py`). What that rules out, and what the tests
of a stub task (HumanEval) see: docs/security.md, "Model-written code". A persistent server, one
per concurrent item: it reads a framed JSON job per item on stdin, receives that item's two pipe
ends over a unix socket (argv[1], fd passing), forks a child that runs the cases (no state left
for the next item), and writes one framed `{"results": [{"ok", "reason"}]}` per item to stdout, a
stream the candidate cannot reach. A case passes only if its test code ends within `case_timeout_s`.
"""

import builtins
import contextlib
import ctypes
import importlib
import json
import os
import resource
import signal
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `-I` leaves the script dir off sys.path
import _plain  # noqa: E402

PR_SET_DUMPABLE = 4
DRAIN_TIMEOUT_S = 2.0
NO_PASSTHROUGH = {"StopIteration", "StopAsyncIteration"}  # would end a caller's loop silently
IMPORTABLE = sys.stdlib_module_names - {"antigravity", "this", "__hello__", "__phello__", "webbrowser"}


class CaseTimeout(BaseException):
    pass


class CandidateLost(Exception):
    """The candidate's process died or broke the protocol."""


class RemoteError(Exception):
    """An exception in the candidate with no builtin of that name."""


def on_alarm(signum, frame):
    raise CaseTimeout()


def remote_exception(name, message):
    cls = getattr(builtins, str(name), None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__name__ not in NO_PASSTHROUGH:
        with contextlib.suppress(Exception):
            return cls(str(message))
    return RemoteError(f"{name}: {message}")


class Link:
    """The harness's end of the two pipes to the candidate's runner."""

    def __init__(self, calls_w, replies_r, max_message_bytes):
        self.calls_w, self.replies_r = calls_w, replies_r
        self.limit = max_message_bytes
        self.case = -1
        self.case_over = False
        self.broken = ""

    def _reply(self):
        """Next reply for the current case; `CandidateLost` if the case's process ended first."""
        while True:
            try:
                msg = _plain.recv(self.replies_r, self.limit)
            except ValueError as e:
                self.broken = f"candidate sent garbage: {e}"
                raise CandidateLost(self.broken) from None
            if msg is None:
                self.broken = "candidate's runner exited"
                raise CandidateLost(self.broken)
            if type(msg) is not dict:
                continue
            if msg.get("over") == self.case:
                self.case_over = True
                why = str(msg.get("reason") or "exit code 0")[:100]
                raise CandidateLost(f"the program's process ended before the tests completed ({why})")
            if msg.get("case") == self.case:
                return msg

    def wait_ready(self):
        """Wait (without a clock: the parent's item timeout covers it) until the runner's sandbox is up."""
        try:
            msg = _plain.recv(self.replies_r, self.limit)
        except ValueError:
            msg = None
        if msg != {"ready": True}:
            self.broken = "the program's sandbox did not start"

    def begin(self, case):
        """Start a fresh program for `case`: {name: description} of what it defined."""
        self.case, self.case_over = case, False
        _plain.send(self.calls_w, {"op": "begin", "case": case})
        msg = self._reply()
        if "error" in msg:
            raise RemoteError(f"the program failed: {str(msg['error'])[:300]}")
        names = msg.get("names")
        if type(names) is not dict:
            raise CandidateLost("candidate sent no names")
        return names

    def request(self, target, op, args=(), kwargs=None, attr=None):
        """Call (`op="call"`) or read an attribute of (`op="getattr"`) the candidate's `target`
        ({"name": ...} or {"ref": ...}); the result as plain data or `Remote` references."""
        message = {"op": op, **target}
        if op == "call":
            try:
                message["args"] = [_plain.encode(a, self._ref_of) for a in args]
                message["kwargs"] = {str(k): _plain.encode(v, self._ref_of) for k, v in (kwargs or {}).items()}
            except TypeError as e:
                raise TypeError(f"cannot pass this to the candidate: {e}") from None
        else:
            message["attr"] = attr
        _plain.send(self.calls_w, message)
        msg = self._reply()
        if "value" in msg:
            try:
                return _plain.decode(msg["value"], lambda ref: Remote(self, {"ref": ref}))
            except ValueError as e:
                raise TypeError(f"the candidate answered with something that is not plain data: {e}") from None
        raised = msg.get("raise")
        if type(raised) is list and len(raised) == 2:
            raise remote_exception(*raised)
        raise CandidateLost("candidate sent an unexpected reply")

    def _ref_of(self, obj):
        """Only the candidate's own objects, back to it, may cross as references."""
        if type(obj) is Remote and obj._link is self and "ref" in obj._target:
            return obj._target["ref"]
        raise TypeError(f"type {type(obj).__name__} is not plain data")

    def end(self):
        """Close the case and wait until the runner reports it over; `broken` is set if it does not."""
        if self.broken or self.case_over:
            return
        signal.setitimer(signal.ITIMER_REAL, DRAIN_TIMEOUT_S)
        try:
            _plain.send(self.calls_w, {"op": "end"})
            while not self.case_over:
                self._reply()
        except CandidateLost:
            pass
        except (CaseTimeout, OSError):
            self.broken = "candidate's runner stopped answering"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


class Remote:
    """A function, or another object, of the candidate's: callable, with attributes read over the link.

    Never compared by value: `==` is identity and truth testing raises, so an object with a custom
    `__eq__` or `__bool__` in the candidate cannot make a test's comparison or `assert` true.
    """

    def __init__(self, link, target):
        self._link, self._target = link, target

    def __call__(self, *args, **kwargs):
        return self._link.request(self._target, "call", args, kwargs)

    def __getattr__(self, attr):
        if attr.startswith("_") or "ref" not in self.__dict__.get("_target", {}):  # no dunder probes go remote
            raise AttributeError(attr)
        return self._link.request(self._target, "getattr", attr=attr)

    def __bool__(self):
        raise TypeError(f"{self!r} has no truth value in a test (compare a plain value instead)")

    def __repr__(self):
        what = self._target.get("name") or f"object #{self._target.get('ref')}"
        return f"<candidate's {what}>"


def trusted_scope(job, link, names):
    """For a function-stub task: the task's own stub (helpers like HumanEval's `poly` or `encode_cyclic`,
    which its tests call to judge the answer), executed here, plus the candidate's entry point; None if
    there is no stub or it does not run on its own. A program cannot redefine the helpers its tests use."""
    stub, entry = job.get("stub"), job.get("entry_point")
    if not (isinstance(stub, str) and isinstance(entry, str)):
        return None
    scope = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(stub, "<stub>", "exec"), scope)
    except Exception:
        return None
    scope.pop(entry, None)
    if (names.get(entry) or {}).get("callable") is True:
        scope[entry] = Remote(link, {"name": entry})
    return scope


def program_scope(job, link, names):
    """The program's names, as proxies (functions), copies (plain values) or stdlib modules."""
    scope = {"__name__": "solution", "__builtins__": builtins}
    for name, what in names.items():
        if not (type(name) is str and name.isidentifier()) or name.startswith("__") or type(what) is not dict:
            continue  # never `__builtins__` or `__name__` from the candidate
        if hasattr(builtins, name) and name != job.get("entry_point"):  # its own `len` must not judge its output
            continue
        if what.get("callable") is True:
            scope[name] = Remote(link, {"name": name})
        elif "value" in what:
            with contextlib.suppress(ValueError):
                scope[name] = _plain.decode(what["value"])
        elif type(what.get("module")) is str and what["module"].split(".")[0] in IMPORTABLE:
            with contextlib.suppress(Exception):
                scope[name] = importlib.import_module(what["module"])
    return scope


def last_line(e):
    lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]


def run_case(job, link, case, test_code):
    if link.broken:
        return {"ok": False, "reason": link.broken}
    verdict = {"ok": False, "reason": "tests did not complete"}
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, job["case_timeout_s"])
            names = link.begin(case)
            scope = trusted_scope(job, link, names) or program_scope(job, link, names)
            exec(compile(test_code, "<tests>", "exec"), scope)
            verdict = {"ok": True, "reason": ""}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CaseTimeout:
        verdict = {"ok": False, "reason": f"timeout after {job['case_timeout_s']:g}s"}
    except CandidateLost as e:
        verdict = {"ok": False, "reason": str(e)}
    except BaseException as e:
        verdict = {"ok": False, "reason": last_line(e)}
    try:
        link.end()
    except CaseTimeout:  # the drain's alarm, delivered just as it was disarmed
        link.broken = "candidate's runner stopped answering"
    return verdict


def run_item(job, calls_w, replies_r, out):
    """In a forked child: run the item's cases and write its verdicts; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGALRM, on_alarm)
        link = Link(calls_w, replies_r, job["max_message_bytes"])
        link.wait_ready()
        results = [run_case(job, link, i, test_code) for i, test_code in enumerate(job["cases"])]
        _plain.send(out, {"results": results})
        code = 0
    finally:
        os._exit(code)


def main():
    sock = socket.socket(fileno=int(sys.argv[1]))
    out = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1)
    mb = 1 << 20
    limits = json.loads(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    while True:
        job = _plain.recv(0, 1 << 30)
        if job is None:
            return
        _, fds, _, _ = socket.recv_fds(sock, 1, 2)
        if len(fds) != 2:
            _plain.send(out, {"error": "the item's pipes did not arrive"})
            continue
        pid = os.fork()
        if pid == 0:
            os.close(sock.fileno())
            run_item(job, *fds, out)
        for fd in fds:
            os.close(fd)  # the runner sees end of file once the child is done with them too
        _, status = os.waitpid(pid, 0)
        if status != 0:
            _plain.send(out, {"error": f"test harness child failed (wait status {status})"})


if __name__ == "__main__":
    main()
