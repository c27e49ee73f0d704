"""Runs inside the sandbox (`python -I`, venv site-packages): score reasoning-gym answers in batches.

Several reasoning-gym scorers `eval` or `sympy.parse_expr` the model's answer, so they only ever
run here. The server imports reasoning-gym once (about a second), then per request (a pickled
batch from the trusted pool) forks a child that scores the items one by one, a JSON line each; a
per-item alarm stops slow scorers, and an item that ignores it is killed from here, scored 0, and
a fresh child takes the rest of the batch. Each result goes to the pool as a JSON frame as soon as
it is known (never pickle: this side is untrusted), in request order, then `{"done": true}`, so if
a hostile answer kills the server the pool knows which item did it. Isolation `batch` forks once
per batch (a few ms), `item` once per item (about 4 ms each).
"""

import contextlib
import ctypes
import json
import math
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `-I` leaves the script dir off sys.path
from _inside import inside_sandbox, reap_exited  # noqa: E402

HEADER = struct.Struct(">I")
PR_SET_DUMPABLE = 4
INSIDE_SANDBOX = False


class ItemTimeout(BaseException):
    pass


def read_frame(stream):
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    return stream.read(size)


def write_frame(fd, obj):
    data = json.dumps(obj).encode()
    os.write(fd, HEADER.pack(len(data)) + data)


def score_child(items, indices, scorers, timeout_s, out_w):
    """Forked child: score `indices` in order, one JSON line each; never returns."""
    try:
        os.setpgid(0, 0)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        cpu = max(1, math.ceil(timeout_s * len(indices)) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

        def on_alarm(signum, frame):
            raise ItemTimeout()

        signal.signal(signal.SIGALRM, on_alarm)
        for i in indices:
            answer, entry, dataset = items[i]
            scorer = scorers.get(dataset)
            try:
                if isinstance(scorer, str):
                    score, info = 0.0, scorer
                else:
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                    try:
                        score, info = float(scorer(answer, entry)), ""
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except ItemTimeout:
                score, info = 0.0, f"timeout after {timeout_s:g}s"
            except BaseException as e:  # a scorer choking on a hostile answer
                score, info = 0.0, f"scorer error: {type(e).__name__}: {str(e)[:200]}"
            os.write(out_w, (json.dumps([i, score, info]) + "\n").encode())
    finally:
        os._exit(0)


def kill_leftovers():
    if INSIDE_SANDBOX:  # everything else this uid sees: only this sandbox's processes
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)
    reap_exited()


def run_batch(items, indices, scorers, timeout_s, report):
    """Fork a child for `indices`, `report(i, score, info)` each result; return the indices it did not get to."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        score_child(items, indices, scorers, timeout_s, w)
    os.close(w)
    todo = list(indices)
    buf = b""
    deadline = time.monotonic() + timeout_s + 0.5
    failure = None
    while todo:
        left = deadline - time.monotonic()
        if left <= 0:
            failure = f"timeout after {timeout_s:g}s (scorer killed)"
            break
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        chunk = os.read(r, 65536)
        if not chunk:
            failure = "scorer process died"
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                i, score, info = json.loads(line)
                score = float(score)
            except (ValueError, TypeError):
                failure = "scorer process wrote garbage"
                break
            if not todo or i != todo[0] or not math.isfinite(score):
                failure = "scorer process wrote an unexpected result"
                break
            report(i, min(1.0, max(0.0, score)), str(info)[:300])
            todo.pop(0)
            deadline = time.monotonic() + timeout_s + 0.5
        if failure:
            break
    os.close(r)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    kill_leftovers()
    if todo and failure:
        report(todo[0], 0.0, failure)
        todo.pop(0)
    return todo


def get_scorer(cache, name, config):
    key = (name, json.dumps(config, sort_keys=True, default=str))
    if key not in cache:
        from reasoning_gym.factory import DATASETS

        if name not in DATASETS:
            cache[key] = f"unknown reasoning-gym dataset {name!r}"
        else:
            dataset_cls, config_cls = DATASETS[name]
            try:
                cache[key] = dataset_cls(config=config_cls(**config)).score_answer
            except Exception as e:
                cache[key] = f"bad config for {name!r}: {type(e).__name__}: {e}"
    return cache[key]


def main():
    global INSIDE_SANDBOX
    INSIDE_SANDBOX = inside_sandbox()
    out = os.dup(1)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1)
    limits = json.loads(sys.argv[1])
    mb = 1 << 20
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb, limits["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * mb, 16 * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    err = os.dup(2)
    os.dup2(null, 2)  # import-time chatter (fontconfig, ...) is noise; failures are reported below
    try:
        import reasoning_gym  # noqa: F401 - the slow import happens once, before any request
    except Exception as e:
        write_frame(out, {"error": f"cannot import reasoning_gym in the sandbox: {e}"})
        return
    finally:
        os.dup2(err, 2)
    write_frame(out, {"ready": True})
    cache = {}
    stdin = sys.stdin.buffer

    def report(i, score, info):
        write_frame(out, {"i": i, "score": score, "info": info})

    while True:
        data = read_frame(stdin)
        if data is None:
            return
        req = pickle.loads(data)
        items, timeout_s = req["items"], req["timeout_s"]
        scorers = {ds: get_scorer(cache, ds, req["config"]) for ds in {it[2] for it in items}}
        pending = list(range(len(items)))
        while pending:
            batch = pending if req["isolation"] == "batch" else pending[:1]
            rest = run_batch(items, batch, scorers, timeout_s, report)
            pending = rest + pending[len(batch) :]
        write_frame(out, {"done": True})


if __name__ == "__main__":
    main()
