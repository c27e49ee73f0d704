"""A verifier worker process: scores items with the `worker`-site terms (math, custom functions).

Started by `VerifierPool` as `python -m verifiers.worker INIT_JSON`. Reads
pickled chunks of `(completion_text, example)` from stdin (the pool is trusted)
and answers each item with a JSON frame `{name: [value, components, info, error]}`
(JSON, so a compromised worker cannot run code in the pool). The first frame
out is `{"ready": true}` or `{"error": ...}`; anything a reward function prints
goes to stderr, never into the frame stream.

Being a process of its own is the point: math-verify's `signal.alarm` works
here, an address-space limit contains memory blow-ups, and the pool can kill a
stuck worker and start another.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import resource
import sys

from verifiers._ipc import read_frame_blocking
from verifiers.base import Reward, finite
from verifiers.custom import adapt, load_function

log = logging.getLogger("verifiers.worker")


def _load(targets: list[list]) -> list[tuple[str, object, dict]]:
    fns = []
    for name, target, params in targets:
        fn = load_function(target)
        prepare = getattr(importlib.import_module(target.partition(":")[0]), "prepare", None)
        if callable(prepare):
            prepare()  # pay slow imports now, not inside the first item's timeout
        fns.append((name, adapt(fn, name), params))
    return fns


def _encode(reward: Reward) -> list:
    components = {str(k): finite(v) for k, v in reward.components.items()}
    return [finite(reward.value), components, str(reward.info)[:1000], False]


def main() -> None:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from reward functions must not corrupt frames
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="verifier worker %(process)d: %(message)s")
    init = json.loads(sys.argv[1])
    if init.get("memory_mb"):
        limit = init["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def send(obj: object) -> None:
        data = json.dumps(obj).encode()
        out.write(len(data).to_bytes(4, "big") + data)

    try:
        fns = _load(init["terms"])
    except Exception as e:
        send({"error": str(e)})
        return
    send({"ready": True})
    stdin = sys.stdin.buffer
    while (data := read_frame_blocking(stdin)) is not None:
        for text, example in pickle.loads(data):  # a chunk; one reply per item, as soon as it is done
            results = {}
            for name, fn, params in fns:
                try:
                    results[name] = _encode(fn(text, example, **params))
                except MemoryError:
                    results[name] = [0.0, {}, "error: out of memory", True]
                except Exception as e:
                    log.debug("term %s failed", name, exc_info=True)
                    results[name] = [0.0, {}, f"error: {type(e).__name__}: {str(e)[:300]}", True]
            send(results)


if __name__ == "__main__":
    main()
